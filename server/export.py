"""The final model in forms other people can use, and the card that says what it is.

Written into the run folder when a run finishes (and again by ``fedcare report --export``):

* ``model.ts``: the global model as TorchScript (``torch.jit.script``, falling back to
  nothing rather than to a trace whose input shape fedcare would have to guess). It takes
  the *encoded* inputs the task's ``to_dataset`` produces with ``preprocess.npz``; raw
  records go through ``fedcare predict``.
* ``model_card.md`` and ``model_card.json``: task, data schema, sites and their sizes,
  rounds, strategy, per-site ε and δ, test metrics, intended use and limits.

The card states the privacy guarantee precisely because a reader will quote it: DP-SGD
covers each site's training records for the released model updates; the federation's
preprocessing sums were shared without noise and are outside that guarantee.
"""

from __future__ import annotations

import json
import logging
import math
import warnings
from pathlib import Path
from typing import Any, Mapping

import torch

from ..shared.atomic import atomic_path, write_text_atomic
from .results import write_json

log = logging.getLogger("fedcare.server")

TORCHSCRIPT = "model.ts"
CARD_MD = "model_card.md"
CARD_JSON = "model_card.json"


def write_all(folder: Path, task: Any, cfg: Any, summary: Mapping[str, Any]) -> dict[str, Any]:
    """TorchScript model and model card into ``folder`` (config.json, model.pt present)."""
    from .inference_cli import load_run

    folder = Path(folder)
    _, _, model, _ = load_run(folder)
    ts_note = export_torchscript(model, folder / TORCHSCRIPT)
    card = model_card(task, cfg, summary, torchscript=ts_note)
    write_json(folder / CARD_JSON, card)
    write_text_atomic(folder / CARD_MD, card_markdown(card))
    return card


def export_torchscript(model: torch.nn.Module, path: Path) -> str:
    """Script the model; return "ok" or why it could not be scripted."""
    model = model.eval()
    try:
        with warnings.catch_warnings():
            # torch 2.13 marks TorchScript deprecated; it is still what C++/Java runtimes load.
            warnings.simplefilter("ignore", DeprecationWarning)
            scripted = torch.jit.script(model)
    except Exception as exc:  # noqa: BLE001 - a model TorchScript cannot compile is a note, not a failure
        log.warning("TorchScript export skipped: %s", type(exc).__name__)
        path.unlink(missing_ok=True)
        return f"not exported: the model is not scriptable ({type(exc).__name__})"
    with atomic_path(path) as tmp:
        scripted.save(str(tmp))
    return "ok"


def data_schema(task: Any, dataset: str) -> dict[str, Any]:
    """The task's declared input schema (``Task.input_schema``)."""
    return task.input_schema(dataset)


def model_card(task: Any, cfg: Any, summary: Mapping[str, Any], *, torchscript: str = "ok") -> dict[str, Any]:
    sites = summary.get("sites", {})
    metric_names = [m for m in ("accuracy", "precision", "recall", "f1", "roc_auc", summary.get("main_metric"))
                    if m]
    per_site = []
    for name, s in sites.items():
        per_site.append({
            "site": name, "num_train": s.get("num_train"), "num_test": s.get("num_examples"),
            "epsilon": s.get("epsilon"), "delta": s.get("delta"), "dp": bool(s.get("dp")),
            "test_metrics": {m: s.get(m) for m in dict.fromkeys(metric_names) if m in s},
        })
    dp_sites = [p for p in per_site if p["dp"]]
    if not dp_sites:
        guarantee = "none: trained without differential privacy (ε = ∞)."
    else:
        worst = max(p["epsilon"] or 0.0 for p in dp_sites)
        deltas = sorted({p["delta"] for p in dp_sites if p["delta"] is not None})
        guarantee = (f"record-level (ε, δ)-differential privacy per site for its training records, "
                     f"ε ≤ {worst:.4g} at δ = {', '.join(f'{d:g}' for d in deltas)} over this run "
                     f"(DP-SGD, Poisson sampling, RDP and PRV accountants, the smaller bound)"
                     + ("" if len(dp_sites) == len(per_site) else "; some sites trained without DP"))
    means = {k[len("mean_site_"):]: v for k, v in summary.items() if k.startswith("mean_site_")}
    return {
        "model": {"task": cfg.task, "dataset": cfg.dataset, "architecture": cfg.model,
                  "files": {"weights": "model.pt", "torchscript": TORCHSCRIPT if torchscript == "ok" else None,
                            "preprocessing": "preprocess.npz"},
                  "torchscript": torchscript},
        "data_schema": data_schema(task, cfg.dataset),
        "training": {"rounds": cfg.num_rounds, "strategy": cfg.strategy, "local_epochs": cfg.local_epochs,
                     "batch_size": cfg.batch_size, "lr": cfg.lr, "optimizer": cfg.optimizer,
                     "max_grad_norm": cfg.max_grad_norm, "partition": cfg.partition, "seed": cfg.seed,
                     "ema_decay": cfg.ema_decay},
        "sites": per_site,
        "privacy": {"guarantee": guarantee,
                    "not_covered": "the federation's preprocessing statistics (per-site counts, sums and "
                                   "sums of squares) were shared without noise; site sizes are visible to "
                                   "the coordinator."},
        "test_metrics": {"main_metric": summary.get("main_metric"), "mean_over_sites": means,
                         "evaluated_on": "each site's held-out test records, the final global model"},
        "intended_use": "research on federated, privacy-preserving models for the task above; "
                        "decision support only after local clinical validation at the deploying site.",
        "limits": [
            "not a medical device; not validated prospectively",
            "sites are small: per-site test metrics have wide confidence intervals",
            "performance on populations unlike the training sites (other countries, devices, "
            "coding practices) is unknown",
            "inputs must follow the data schema; the model expects preprocess.npz's encoding",
        ],
    }


def card_markdown(card: Mapping[str, Any]) -> str:
    m, tr = card["model"], card["training"]
    lines = [f"# Model card: {m['task']} on {m['dataset']} ({m['architecture']})", "",
             "## Model", f"- Weights: `{m['files']['weights']}`; preprocessing: `{m['files']['preprocessing']}`",
             f"- TorchScript: {('`' + TORCHSCRIPT + '`') if m['torchscript'] == 'ok' else m['torchscript']}",
             "", "## Training",
             f"- {tr['rounds']} federated rounds, strategy **{tr['strategy']}**, {tr['local_epochs']} local "
             f"epoch(s) per round, batch {tr['batch_size']}, lr {tr['lr']}, optimiser {tr['optimizer']}, "
             f"clipping norm {tr['max_grad_norm']}, partition {tr['partition']}, seed {tr['seed']}",
             *([f"- The weights are the moving average of the rounds' global models (decay "
                f"{tr['ema_decay']:g}); training continued from each round's aggregate"]
               if tr.get("ema_decay") else []),
             "", "## Privacy", f"- Guarantee: {card['privacy']['guarantee']}",
             f"- Not covered: {card['privacy']['not_covered']}", "",
             "## Sites", "", "| site | train | test | ε | δ | " +
             " | ".join(_metric_names(card)) + " |",
             "|---|---:|---:|---:|---:|" + "---:|" * len(_metric_names(card))]
    for s in card["sites"]:
        eps = "∞ (no DP)" if not s["dp"] else _num(s["epsilon"])
        lines.append(f"| {s['site']} | {s['num_train']} | {s['num_test']} | {eps} | "
                     f"{'' if s['delta'] is None else format(s['delta'], 'g')} | "
                     + " | ".join(_num(s["test_metrics"].get(k)) for k in _metric_names(card)) + " |")
    means = card["test_metrics"]["mean_over_sites"]
    lines += ["", "## Test metrics (mean over sites)", ""]
    lines += [f"- {k}: {_num(v)}" for k, v in means.items()]
    schema = card["data_schema"]
    lines += ["", "## Data schema", ""]
    if schema.get("columns"):
        lines += ["| column | kind | range / categories | description |", "|---|---|---|---|"]
        for c in schema["columns"]:
            if "categories" in c:
                rng = ", ".join(str(v) for v in c["categories"])
            elif "min" in c or "max" in c:
                rng = f"{c.get('min', '')} to {c.get('max', '')}".strip()
            else:
                rng = "0, 1" if c["kind"] == "binary" else ""
            lines.append(f"| {c['name']} | {c['kind']} | {rng} | {c.get('description', '')} |")
        lines.append(f"\nLabel: `{schema['label']}` (positive: {schema['positive']}).")
    else:
        lines.append(schema.get("note", ""))
    lines += ["", "## Intended use", card["intended_use"], "", "## Limits"]
    lines += [f"- {x}" for x in card["limits"]]
    return "\n".join(lines) + "\n"


def _metric_names(card: Mapping[str, Any]) -> list[str]:
    names: list[str] = []
    for s in card["sites"]:
        names += [k for k in s["test_metrics"] if k not in names]
    return names


def _num(v: Any) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def load_card(folder: Path) -> dict[str, Any]:
    return json.loads((Path(folder) / CARD_JSON).read_text())
