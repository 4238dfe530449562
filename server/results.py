"""The run folder: files a person can open.

While a run is going it lives in ``<out>.partial/``; only a finished run is renamed to
``<out>/``, so a folder without the suffix is always complete.

* ``config.json``: the resolved run configuration.
* ``metrics.csv``: one row per round and site (train and test metrics, ε, δ, status).
* ``rounds.csv``: one row per round with the global (example-weighted) test metrics.
* ``summary.json``: final per-site test metrics, ε and δ, ``mean_site_<metric>``.
* ``model.pt``: final global weights (torch state dict); ``preprocess.npz``: the
  federation-wide preprocessing parameters the model expects.
* ``progress.png``: main metric and ε per round.
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
import torch

METRIC_COLUMNS = ["round", "site", "node_id", "status", "num_train", "num_test", "train_loss",
                  "steps", "noise_multiplier", "epsilon", "delta", "loss"]


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, (np.floating, np.integer)):
        return _clean(value.item())
    return value


def write_json(path: Path, payload: Mapping[str, Any]) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(_clean(dict(payload)), indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)


class RunFolder:
    """Writes a run's files into ``<final>.partial`` and publishes them on ``finish``."""

    def __init__(self, final: Path, *, resume: bool = False) -> None:
        self.final = Path(final)
        self.path = self.final.with_name(self.final.name + ".partial")
        if self.final.exists():
            raise FileExistsError(f"run folder {self.final} already exists")
        if self.path.exists() and not resume:
            raise FileExistsError(f"{self.path} exists (an interrupted run: resume it or remove it)")
        self.path.mkdir(parents=True, exist_ok=True)
        self._metric_keys: list[str] | None = None

    def file(self, name: str) -> Path:
        return self.path / name

    def write_config(self, config: Mapping[str, Any]) -> None:
        write_json(self.file("config.json"), config)

    def append_metrics(self, rows: Iterable[Mapping[str, Any]]) -> None:
        rows = list(rows)
        if not rows:
            return
        path = self.file("metrics.csv")
        if self._metric_keys is None and path.exists():
            with path.open(newline="") as fh:
                self._metric_keys = next(csv.reader(fh), None)
        if self._metric_keys is not None and all(k in self._metric_keys for row in rows for k in row):
            # Same columns as the file: append in place, so a round costs O(its rows), not
            # O(the whole history) (a thousand sites write thousands of rows a round).
            with path.open("a", newline="") as fh:
                writer = csv.DictWriter(fh, fieldnames=self._metric_keys, extrasaction="ignore")
                for row in rows:
                    writer.writerow({k: _fmt(row.get(k)) for k in self._metric_keys})
            return
        existing: list[dict[str, Any]] = []
        if path.exists():
            with path.open(newline="") as fh:
                existing = list(csv.DictReader(fh))
        keys = list(METRIC_COLUMNS)
        for row in existing + rows:
            for k in row:
                if k not in keys:
                    keys.append(k)
        tmp = path.with_suffix(".csv.tmp")
        with tmp.open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=keys, extrasaction="ignore")
            writer.writeheader()
            for row in existing + rows:
                writer.writerow({k: _fmt(row.get(k)) for k in keys})
        os.replace(tmp, path)
        self._metric_keys = keys

    def truncate(self, last_round: int) -> None:
        """Drop rows of rounds after ``last_round`` (written after the last checkpoint)."""
        for name in ("metrics.csv", "rounds.csv"):
            path = self.file(name)
            if not path.exists():
                continue
            with path.open(newline="") as fh:
                reader = csv.DictReader(fh)
                keys = list(reader.fieldnames or [])
                kept = [r for r in reader if _round_of(r) <= last_round]
            tmp = path.with_suffix(".csv.tmp")
            with tmp.open("w", newline="") as fh:
                writer = csv.DictWriter(fh, fieldnames=keys)
                writer.writeheader()
                writer.writerows(kept)
            os.replace(tmp, path)
        self._metric_keys = None

    def append_round(self, row: Mapping[str, Any]) -> None:
        path = self.file("rounds.csv")
        rows: list[dict[str, Any]] = []
        if path.exists():
            with path.open(newline="") as fh:
                rows = list(csv.DictReader(fh))
        rows.append(dict(row))
        keys: list[str] = []
        for r in rows:
            keys += [k for k in r if k not in keys]
        tmp = path.with_suffix(".csv.tmp")
        with tmp.open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=keys)
            writer.writeheader()
            for r in rows:
                writer.writerow({k: _fmt(r.get(k)) for k in keys})
        os.replace(tmp, path)

    def save_model(self, state: Mapping[str, np.ndarray], prep: Mapping[str, np.ndarray]) -> None:
        torch.save({k: torch.from_numpy(np.array(v)) for k, v in state.items()}, self.file("model.pt"))
        np.savez(self.file("preprocess.npz"), **{k: np.asarray(v) for k, v in prep.items()})

    def write_summary(self, summary: Mapping[str, Any]) -> None:
        write_json(self.file("summary.json"), summary)

    def finish(self) -> Path:
        os.replace(self.path, self.final)
        return self.final

    def discard(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def _round_of(row: Mapping[str, Any]) -> float:
    """A row's round; a line cut short by a kill mid-write counts as after everything."""
    try:
        return int(row["round"]) if None not in row.values() else math.inf
    except (TypeError, ValueError):
        return math.inf


def _fmt(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, float):
        if math.isnan(value):
            return ""
        return f"{value:.6g}"
    return value


#: Beyond this many sites the plot shows their median and 10-90 % band, not one line each.
MAX_PLOTTED_SITES = 12


def _plot_spread(ax, rows: list[dict[str, str]], column: str) -> None:
    by_round: dict[int, list[float]] = {}
    for r in rows:
        if r.get(column) not in (None, "") and r.get("phase", "evaluate") == "evaluate":
            by_round.setdefault(int(r["round"]), []).append(float(r[column]))
    if not by_round:
        return
    rounds = sorted(by_round)
    q = np.array([np.nanpercentile(by_round[k], [10, 50, 90]) for k in rounds])
    ax.fill_between(rounds, q[:, 0], q[:, 2], alpha=0.25, label="sites, 10-90 %")
    ax.plot(rounds, q[:, 1], marker="o", ms=3, label="sites, median")


def plot_progress(folder: Path, metric: str) -> Path:
    """PNG: the main test metric per site and globally, and ε per site, per round."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with (folder / "metrics.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    with (folder / "rounds.csv").open(newline="") as fh:
        rounds = list(csv.DictReader(fh))
    sites = sorted({r["site"] for r in rows})
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    if len(sites) > MAX_PLOTTED_SITES:
        _plot_spread(ax1, rows, metric)
        _plot_spread(ax2, rows, "epsilon")
        sites = []
    for site in sites:
        pts = [(int(r["round"]), float(r[metric])) for r in rows if r["site"] == site and r.get(metric)]
        if pts:
            ax1.plot(*zip(*pts), marker="o", ms=3, label=site)
        eps = [(int(r["round"]), float(r["epsilon"])) for r in rows
               if r["site"] == site and r.get("epsilon") not in (None, "")]
        if eps:
            ax2.plot(*zip(*eps), marker="o", ms=3, label=site)
    glob = [(int(r["round"]), float(r[metric])) for r in rounds if r.get(metric)]
    if glob:
        ax1.plot(*zip(*glob), color="black", lw=2.5, label="global")
    ax1.set(xlabel="round", ylabel=f"test {metric}", title=f"Test {metric} per round")
    ax2.set(xlabel="round", ylabel="ε spent (cumulative)", title="Privacy spent per site")
    ax1.legend(fontsize=8)
    ax1.grid(alpha=0.3)
    ax2.grid(alpha=0.3)
    if not ax2.lines:
        ax2.text(0.5, 0.5, "no DP (ε = ∞)", ha="center", va="center", transform=ax2.transAxes)
    else:
        ax2.legend(fontsize=8)
    fig.tight_layout()
    out = folder / "progress.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
