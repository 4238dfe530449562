"""A run as one self-contained HTML page: what was run, on what, with what result.

``report.html`` is written into every finished run folder and by ``fedcare report
RUN_DIR``. Everything is inline (CSS, plots as base64 PNG), so the file can be mailed or
archived alone and opens in any browser without network access. Sections:
configuration, data per site, ε per site, final test metrics per site, global metrics
per round, metrics per round and site, and the plots.

The page is built only from the run folder's files, never from site data.
"""

from __future__ import annotations

import base64
import html
import json
import math
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from ..shared.atomic import write_text_atomic
from . import charts
from .results import read_csv_rows

FILE = "report.html"
#: Beyond this many sites the per-round, per-site table is summarised, not listed.
MAX_SITE_ROWS = 60

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;max-width:1100px;
color:#1d2733;padding:0 1rem}
h1{font-size:1.6rem;margin-bottom:.2rem}h2{font-size:1.2rem;margin-top:2rem;border-bottom:2px solid #dde3ea}
.sub{color:#5b6b7b;margin-top:0}table{border-collapse:collapse;margin:.6rem 0;font-size:.88rem}
th,td{border:1px solid #d6dde5;padding:.25rem .55rem;text-align:right}th{background:#eef2f6}
td:first-child,th:first-child{text-align:left}.kv td{text-align:left}img{max-width:100%;border:1px solid #e3e8ee}
.cards{display:flex;gap:1rem;flex-wrap:wrap}.card{background:#f4f7fa;border-radius:8px;padding:.7rem 1rem}
.card b{display:block;font-size:1.3rem}.note{color:#5b6b7b;font-size:.85rem}
"""


def _num(v: Any, digits: int = 3) -> str:
    if v is None or v == "":
        return "n/a"
    try:
        f = float(v)
    except (TypeError, ValueError):
        return html.escape(str(v))
    if not math.isfinite(f):
        return "n/a"
    return str(int(f)) if f.is_integer() and abs(f) >= 1 else f"{f:.{digits}f}"


def _table(headers: Sequence[str], rows: Iterable[Sequence[Any]], cls: str = "") -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _img(png: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def _site_bars(summary: Mapping[str, Any]) -> bytes | None:
    """Final main metric and ε per site as two bar charts."""
    sites = summary.get("sites", {})
    if not sites or len(sites) > MAX_SITE_ROWS:
        return None
    metric = summary.get("main_metric", "accuracy")
    names = list(sites)
    vals = [float(sites[n].get(metric) or math.nan) for n in names]
    eps = [sites[n].get("epsilon") for n in names]
    left = charts.Panel(f"Final test {metric} per site", bars=list(zip(names, vals)),
                        ylim=(0.0, 1.0) if metric in ("accuracy", "f1", "roc_auc") else None)
    right = charts.Panel("ε spent per site", bar_color="#d8703b", note="no DP (ε = ∞)")
    if any(e is not None for e in eps):
        right.bars = [(n, float(e or 0.0)) for n, e in zip(names, eps)]
    return charts.png_bytes([left, right], size=(1100, 380))


def build(folder: Path) -> str:
    """The report's HTML for a run folder (finished or ``.partial``)."""
    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text()) if (folder / "config.json").exists() else {}
    summary = json.loads((folder / "summary.json").read_text()) if (folder / "summary.json").exists() else {}
    rounds = read_csv_rows(folder / "rounds.csv")
    all_rows = read_csv_rows(folder / "metrics.csv")
    metrics = [r for r in all_rows if r.get("phase", "evaluate") == "evaluate"]
    rejected = [r for r in all_rows if r.get("status", "ok").startswith("rejected")]
    main = summary.get("main_metric", "accuracy")
    sites: dict[str, Any] = summary.get("sites", {})
    metric_names = [m for m in ("accuracy", "precision", "recall", "f1", "roc_auc", "loss") if
                    any(m in s for s in sites.values()) or (rounds and m in rounds[0])]
    if main not in metric_names:
        metric_names.insert(0, main)

    title = f"{config.get('task', '?')} · {config.get('dataset', '?')} · {config.get('strategy', '?')}"
    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>fedcare run: "
             f"{html.escape(title)}</title><style>{_CSS}</style></head><body>",
             f"<h1>fedcare run: {html.escape(title)}</h1>",
             f"<p class='sub'>{html.escape(folder.name.removesuffix('.partial'))} · {config.get('num-rounds', '?')} rounds · "
             f"{len(sites)} site(s)</p>"]
    eps_all = [s.get("epsilon") for s in sites.values() if s.get("epsilon") is not None]
    cards = [(f"mean site {main}", _num(summary.get(f"mean_site_{main}"))),
             ("sites", str(len(sites))), ("rounds", str(summary.get("rounds", len(rounds)))),
             ("max ε spent", _num(max(eps_all)) if eps_all else "∞ (no DP)")]
    parts.append("<div class='cards'>" + "".join(f"<div class='card'>{html.escape(k)}<b>{v}</b></div>"
                                                 for k, v in cards) + "</div>")

    parts.append("<h2 id='sites'>Data and privacy per site</h2>")
    audited = any("mia_auc" in s for s in sites.values())  # written by `fedcare audit`
    parts.append(_table(["site", "train records", "test records", "ε spent", "δ", "missed rounds"]
                        + (["membership attack AUC"] if audited else []),
                        [[html.escape(n), _num(s.get("num_train")), _num(s.get("num_examples")),
                          "∞ (no DP)" if s.get("epsilon") is None else _num(s["epsilon"], 4),
                          "" if s.get("delta") is None else f"{s['delta']:g}",
                          html.escape(", ".join(str(r) for r in s.get("missed_rounds", [])) or "none")]
                         + ([_num(s.get("mia_auc"))] if audited else [])
                         for n, s in list(sites.items())[:MAX_SITE_ROWS]], cls="sites"))
    if len(sites) > MAX_SITE_ROWS:
        parts.append(f"<p class='note'>{len(sites) - MAX_SITE_ROWS} more site(s) in summary.json.</p>")

    parts.append("<h2 id='final'>Final test metrics per site</h2>")
    rows = [[html.escape(n)] + [_num(s.get(m)) for m in metric_names if m != "loss"]
            for n, s in list(sites.items())[:MAX_SITE_ROWS]]
    rows.append(["<b>mean over sites</b>"] + [f"<b>{_num(summary.get(f'mean_site_{m}'))}</b>"
                                               for m in metric_names if m != "loss"])
    parts.append(_table(["site"] + [m for m in metric_names if m != "loss"], rows, cls="final"))

    parts.append("<h2 id='plots'>Plots</h2>")
    if (folder / "progress.png").exists():
        parts.append(_img((folder / "progress.png").read_bytes(), "metric and epsilon per round"))
    bars = _site_bars(summary) if summary else None
    if bars:
        parts.append(_img(bars, "final metric and epsilon per site"))

    parts.append("<h2 id='rounds'>Global test metrics per round</h2>")
    cols = [c for c in (rounds[0].keys() if rounds else []) if c != "round"]
    parts.append(_table(["round"] + cols, [[r["round"]] + [_num(r.get(c)) for c in cols] for r in rounds],
                        cls="rounds"))

    parts.append("<h2 id='per-site'>Test metrics per round and site</h2>")
    if len(sites) <= MAX_SITE_ROWS:
        parts.append(_table(["round", "site", "ε"] + metric_names,
                            [[r["round"], html.escape(r["site"]), _num(r.get("epsilon"), 4)]
                             + [_num(r.get(m)) for m in metric_names] for r in metrics], cls="per-site"))
    else:
        parts.append(f"<p class='note'>{len(metrics)} rows for {len(sites)} sites: see metrics.csv.</p>")
    if rejected:
        parts.append("<h2 id='rejected'>Rejected replies</h2>")
        parts.append(_table(["round", "site", "status"],
                            [[r["round"], html.escape(r["site"]), html.escape(r["status"])]
                             for r in rejected[:200]]))

    parts.append("<h2 id='config'>Configuration</h2>")
    parts.append(_table(["key", "value"], [[html.escape(k), html.escape(str(v))] for k, v in config.items()],
                        cls="kv"))
    if (folder / "model_card.md").exists():
        parts.append("<p class='note'>Model card: model_card.md / model_card.json; TorchScript: model.ts.</p>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(folder: Path, out: Path | None = None) -> Path:
    folder = Path(folder)
    out = Path(out) if out else folder / FILE
    write_text_atomic(out, build(folder), encoding="utf-8")
    return out
