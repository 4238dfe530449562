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

from ..shared.atomic import atomic_path, write_text_atomic
from . import charts

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
    write_text_atomic(path, json.dumps(_clean(dict(payload)), indent=2, sort_keys=False) + "\n")


class CsvLog:
    """A CSV that grows by rows: appended in place while the rows fit its columns, so a
    round costs O(its rows), not O(the whole history); rewritten (atomically) with the
    union of columns when a row brings a new one."""

    def __init__(self, path: Path, first_columns: Iterable[str]) -> None:
        self.path, self.first_columns = path, list(first_columns)
        self._keys: list[str] | None = None

    def truncate(self, last_round: int) -> None:
        """Drop the rows of rounds after ``last_round``."""
        if not self.path.exists():
            return
        with self.path.open(newline="") as fh:
            reader = csv.DictReader(fh)
            keys = list(reader.fieldnames or [])
            kept = [r for r in reader if _round_of(r) <= last_round]
        with atomic_path(self.path) as tmp, tmp.open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=keys)
            writer.writeheader()
            writer.writerows(kept)
        self._keys = keys

    def append(self, rows: Iterable[Mapping[str, Any]]) -> None:
        rows = list(rows)
        if not rows:
            return
        if self._keys is None and self.path.exists():
            with self.path.open(newline="") as fh:
                self._keys = next(csv.reader(fh), None)
        if self._keys is not None and all(k in self._keys for row in rows for k in row):
            with self.path.open("a", newline="") as fh:
                writer = csv.DictWriter(fh, fieldnames=self._keys, extrasaction="ignore")
                for row in rows:
                    writer.writerow({k: _fmt(row.get(k)) for k in self._keys})
            return
        existing: list[dict[str, Any]] = read_csv_rows(self.path)
        keys = list(self.first_columns)
        for row in existing + rows:
            keys += [k for k in row if k not in keys]
        with atomic_path(self.path) as tmp, tmp.open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=keys, extrasaction="ignore")
            writer.writeheader()
            for row in existing + rows:
                writer.writerow({k: _fmt(row.get(k)) for k in keys})
        self._keys = keys


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
        self._metrics = CsvLog(self.file("metrics.csv"), METRIC_COLUMNS)
        self._rounds = CsvLog(self.file("rounds.csv"), ["round"])

    def file(self, name: str) -> Path:
        return self.path / name

    def write_config(self, config: Mapping[str, Any]) -> None:
        write_json(self.file("config.json"), config)

    def append_metrics(self, rows: Iterable[Mapping[str, Any]]) -> None:
        self._metrics.append(rows)

    def truncate(self, last_round: int) -> None:
        """Drop rows of rounds after ``last_round`` (written after the last checkpoint)."""
        self._metrics.truncate(last_round)
        self._rounds.truncate(last_round)

    def append_round(self, row: Mapping[str, Any]) -> None:
        self._rounds.append([row])

    def save_model(self, state: Mapping[str, np.ndarray], prep: Mapping[str, np.ndarray]) -> None:
        self.save_arrays("model.pt", state)
        np.savez(self.file("preprocess.npz"), **{k: np.asarray(v) for k, v in prep.items()})

    def save_arrays(self, name: str, state: Mapping[str, np.ndarray]) -> None:
        import torch  # here, not at the top: report and the CLIs read CSVs through this module

        with atomic_path(self.file(name)) as tmp:
            torch.save({k: torch.from_numpy(np.array(v)) for k, v in state.items()}, tmp)

    def write_summary(self, summary: Mapping[str, Any]) -> None:
        write_json(self.file("summary.json"), summary)

    def finish(self) -> Path:
        os.replace(self.path, self.final)
        return self.final

    def discard(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def refused_note(summary: Mapping[str, Any]) -> str | None:
    """One line naming the nodes that refused the preprocessing round (``refused_sites``)
    and why, for the console after a run; None when every node joined."""
    refused = summary.get("refused_sites") or {}
    if not refused:
        return None
    return "took no part (refused the preprocessing round): " + "; ".join(
        f"{name}: {reason}" for name, reason in refused.items())


def read_csv_rows(path: Path) -> list[dict[str, str]]:
    """A CSV file's rows as dicts of strings; no rows when the file does not exist (yet, or
    any more: a followed run's folder is renamed when it finishes)."""
    try:
        with Path(path).open(newline="") as fh:
            return list(csv.DictReader(fh))
    except FileNotFoundError:
        return []


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


def _spread(rows: list[dict[str, str]], column: str) -> list[charts.Band]:
    by_round: dict[int, list[float]] = {}
    for r in rows:
        if r.get(column) not in (None, "") and r.get("phase", "evaluate") == "evaluate":
            by_round.setdefault(int(r["round"]), []).append(float(r[column]))
    if not by_round:
        return []
    rounds = sorted(by_round)
    q = np.array([np.nanpercentile(by_round[k], [10, 50, 90]) for k in rounds])
    return [charts.Band("sites, median and 10-90 %", rounds, q[:, 0], q[:, 1], q[:, 2])]


def plot_progress(folder: Path, metric: str) -> Path:
    """PNG: the main test metric per site and globally, and ε per site, per round."""
    rows = read_csv_rows(folder / "metrics.csv")
    rounds = read_csv_rows(folder / "rounds.csv")
    sites = sorted({r["site"] for r in rows})
    left = charts.Panel(f"Test {metric} per round", "round", f"test {metric}")
    right = charts.Panel("Privacy spent per site", "round", "ε spent (cumulative)", note="no DP (ε = ∞)")
    if len(sites) > MAX_PLOTTED_SITES:
        left.bands = _spread(rows, metric)
        right.bands = _spread(rows, "epsilon")
        sites = []
    for site in sites:
        mine = [r for r in rows if r["site"] == site]
        pts = [(int(r["round"]), float(r[metric])) for r in mine if r.get(metric)]
        if pts:
            left.lines.append(charts.Line(site, pts))
        eps = [(int(r["round"]), float(r["epsilon"])) for r in mine if r.get("epsilon") not in (None, "")]
        if eps:
            right.lines.append(charts.Line(site, eps))
    glob = [(int(r["round"]), float(r[metric])) for r in rounds if r.get(metric)]
    if glob:
        left.lines.append(charts.Line("global", glob, color="#000000", width=3))
    return charts.save_png([left, right], folder / "progress.png")
