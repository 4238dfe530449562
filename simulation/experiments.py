"""Research comparisons: the tables and plots a federated-learning paper reports.

``compare`` trains, for each seed, every method of FLamby's benchmark on the same sites
and the same per-site test records, each without and with DP:

* ``centralised``: all sites' training records pooled at one site (the upper bound a
  federation tries to approach), then evaluated on each site's own test records;
* ``local``: every site trains alone on its own records (what a hospital gets without
  federating), evaluated on its own test records;
* ``fedavg``, ``fedprox``, ``fedadam``: the federation.

Every method is scored the same way, the mean over sites of the task's main test metric,
and the table gives its mean and standard deviation over seeds. ``sweep`` trains one
federated strategy at several ε and reports the privacy-utility curve against the non-DP
result. Each individual run stays in ``OUT/runs/`` with its own report.
"""

from __future__ import annotations

import csv
import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ..shared.atomic import atomic_path
from ..shared.config import RunConfig
from ..shared.errors import ConfigError
from ..shared.registry import get_task
from .runner import Federation, plan_federation, simulate

METHODS = ("centralised", "local", "fedavg", "fedprox", "fedadam")


@dataclass
class Result:
    method: str
    dp: bool
    epsilon: float
    seed: int
    score: float
    per_site: dict[str, float]


def _label(dp: bool, epsilon: float) -> str:
    return f"DP ε={epsilon:g}" if dp else "no DP"


def _site_scores(folder: Path, metric: str) -> dict[str, float]:
    summary = json.loads((folder / "summary.json").read_text())
    return {name: float(s[metric]) if s.get(metric) is not None else math.nan
            for name, s in summary["sites"].items()}


def _evaluate_on_sites(folder: Path, sites, metric: str) -> dict[str, float]:
    """The run's final model on each given site's test records (centralised baseline)."""
    from ..client import training
    from ..server.inference_cli import load_run

    task, cfg, model, prep = load_run(folder)
    out = {}
    for site in sites:
        data = task.to_dataset(site.test, prep, cfg, train=False)
        scores, _ = training.evaluate(task, model, data)
        out[site.name] = float(scores.get(metric, math.nan))
    return out


def _mean(values: Sequence[float]) -> float:
    vals = [v for v in values if math.isfinite(v)]
    return float(np.mean(vals)) if vals else math.nan


def run_method(method: str, cfg: RunConfig, *, epsilon: float, delta: float, out: Path,
               observer=None) -> Result:
    """One method at one seed and one budget; ``out`` holds its run folder(s)."""
    from ..client.site import builtin_partition

    task = get_task(cfg.task)
    resolved = cfg.resolved(task.defaults)
    metric = task.main_metric
    sites = builtin_partition(task.name, resolved.dataset, resolved.partition, resolved.num_sites,
                              resolved.dirichlet_alpha, resolved.seed)
    n = len(sites)
    budget = {"epsilon": epsilon, "delta": delta}
    dp = math.isfinite(epsilon)
    if method in ("fedavg", "fedprox", "fedadam"):
        run_cfg = cfg.replace(strategy=method)
        folder = simulate(run_cfg, plan_federation(run_cfg, epsilon=epsilon, delta=delta), out=out,
                          observer=observer)
        per_site = _site_scores(folder, metric)
    elif method == "local":
        per_site = {}
        for i, site in enumerate(sites):
            fed = Federation({1: {"partition-id": i, "num-partitions": n, **budget}})
            folder = simulate(cfg.replace(min_sites=1), fed, out=out / site.name, observer=observer)
            per_site.update(_site_scores(folder, metric))
    elif method == "centralised":
        pooled = cfg.replace(partition="iid", num_sites=1, min_sites=1)
        folder = simulate(pooled, Federation({1: {"partition-id": 0, "num-partitions": 1, **budget}}),
                          out=out, observer=observer)
        per_site = _evaluate_on_sites(folder, sites, metric)
    else:
        raise ConfigError(f"unknown method {method!r} ({', '.join(METHODS)})")
    return Result(method, dp, epsilon, cfg.seed, _mean(list(per_site.values())), per_site)


def compare(cfg: RunConfig, *, seeds: int, epsilon: float, delta: float, out: Path,
            methods: Sequence[str] = METHODS, progress: Callable[[str], None] | None = None) -> list[Result]:
    """Every method, without and with DP, for ``seeds`` seeds; files into ``out``."""
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise ConfigError(f"--methods: unknown {', '.join(bad)} (known: {', '.join(METHODS)})")
    if not math.isfinite(epsilon):
        raise ConfigError("compare: --epsilon must be finite (the non-DP arm is always included)")
    _start(out)
    results = []
    for seed in range(cfg.seed, cfg.seed + seeds):
        for dp_eps in (math.inf, epsilon):
            for method in methods:
                tag = f"{method}-{'dp' if math.isfinite(dp_eps) else 'nodp'}-seed{seed}"
                if progress:
                    progress(tag)
                results.append(run_method(method, cfg.replace(seed=seed), epsilon=dp_eps, delta=delta,
                                          out=out / "runs" / tag))
    metric = get_task(cfg.task).main_metric
    _write_runs(out / "compare_runs.csv", results, metric)
    rows = _table_rows(results, key=lambda r: (r.method, r.dp), order=[(m, dp) for dp in (False, True)
                                                                       for m in methods])
    _write_table(out, "compare", rows, metric, first="method", epsilon=epsilon)
    _bar_plot(out / "compare.png", rows, metric, epsilon, cfg)
    return results


def sweep(cfg: RunConfig, *, epsilons: Sequence[float], seeds: int, delta: float, out: Path,
          progress: Callable[[str], None] | None = None) -> list[Result]:
    """One federated strategy at each ε (and without DP) for ``seeds`` seeds."""
    if not epsilons or any(not (e > 0 and math.isfinite(e)) for e in epsilons):
        raise ConfigError("--epsilons: a comma-separated list of finite values > 0")
    _start(out)
    results = []
    for seed in range(cfg.seed, cfg.seed + seeds):
        for eps in [math.inf, *epsilons]:
            tag = f"{cfg.strategy}-eps{eps:g}-seed{seed}"
            if progress:
                progress(tag)
            results.append(run_method(cfg.strategy, cfg.replace(seed=seed), epsilon=eps, delta=delta,
                                      out=out / "runs" / tag))
    metric = get_task(cfg.task).main_metric
    _write_runs(out / "sweep_runs.csv", results, metric)
    rows = _table_rows(results, key=lambda r: r.epsilon, order=[math.inf, *epsilons])
    _write_table(out, "sweep", rows, metric, first="epsilon")
    _curve_plot(out / "sweep.png", rows, metric, cfg)
    return results


# ---- files -----------------------------------------------------------------------------
def _start(out: Path) -> None:
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"output folder {out} already exists and is not empty")
    (out / "runs").mkdir(parents=True, exist_ok=True)


def _write_runs(path: Path, results: list[Result], metric: str) -> None:
    sites = sorted({s for r in results for s in r.per_site})
    with atomic_path(path) as tmp, tmp.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["method", "dp", "epsilon", "seed", f"mean_site_{metric}", *sites])
        for r in results:
            w.writerow([r.method, r.dp, "inf" if not r.dp else f"{r.epsilon:g}", r.seed, f"{r.score:.4f}",
                        *[f"{r.per_site[s]:.4f}" if s in r.per_site else "" for s in sites]])


def _table_rows(results: list[Result], key, order) -> list[dict]:
    rows = []
    for k in order:
        group = [r for r in results if key(r) == k]
        scores = [r.score for r in group if math.isfinite(r.score)]
        rows.append({"key": k, "method": group[0].method, "dp": group[0].dp, "epsilon": group[0].epsilon,
                     "mean": statistics.mean(scores) if scores else math.nan,
                     "std": statistics.pstdev(scores) if len(scores) > 1 else 0.0, "n": len(scores)})
    return rows


def _write_table(out: Path, name: str, rows: list[dict], metric: str, *, first: str,
                 epsilon: float | None = None) -> None:
    with atomic_path(out / f"{name}.csv") as tmp, tmp.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow([first, "dp", f"{metric}_mean", f"{metric}_std", "seeds"])
        for r in rows:
            label = r["method"] if first == "method" else ("inf" if not r["dp"] else f"{r['epsilon']:g}")
            w.writerow([label, r["dp"], f"{r['mean']:.4f}", f"{r['std']:.4f}", r["n"]])
    lines = [f"| {first} | DP | {metric} (mean ± std over seeds) |", "|---|---|---:|"]
    for r in rows:
        label = r["method"] if first == "method" else ("∞" if not r["dp"] else f"{r['epsilon']:g}")
        dp = _label(r["dp"], r["epsilon"])
        lines.append(f"| {label} | {dp} | {r['mean']:.3f} ± {r['std']:.3f} |")
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")


def _bar_plot(path: Path, rows: list[dict], metric: str, epsilon: float, cfg: RunConfig) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(dict.fromkeys(r["method"] for r in rows))
    x = np.arange(len(methods))
    fig, ax = plt.subplots(figsize=(8, 4))
    for i, (dp, colour) in enumerate(((False, "#3b7dd8"), (True, "#d8703b"))):
        vals = [next(r for r in rows if r["method"] == m and r["dp"] == dp) for m in methods]
        ax.bar(x + (i - 0.5) * 0.38, [v["mean"] for v in vals], 0.38, yerr=[v["std"] for v in vals],
               capsize=3, color=colour, label=_label(dp, epsilon))
    ax.set_xticks(x, methods)
    ax.set(ylabel=f"mean site test {metric}", title=f"{cfg.task} · {cfg.dataset or 'default'}: methods")
    if metric in ("accuracy", "f1", "roc_auc"):
        ax.set_ylim(0, 1)
    ax.grid(axis="y", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _curve_plot(path: Path, rows: list[dict], metric: str, cfg: RunConfig) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dp = [r for r in rows if r["dp"]]
    nodp = next(r for r in rows if not r["dp"])
    fig, ax = plt.subplots(figsize=(7, 4))
    eps = [r["epsilon"] for r in dp]
    ax.errorbar(eps, [r["mean"] for r in dp], yerr=[r["std"] for r in dp], marker="o", capsize=3,
                label=f"{cfg.strategy} with DP")
    ax.axhline(nodp["mean"], color="black", ls="--", label="no DP (ε = ∞)")
    if nodp["std"] > 0:
        ax.axhspan(nodp["mean"] - nodp["std"], nodp["mean"] + nodp["std"], color="grey", alpha=0.15)
    ax.set_xscale("log")
    ax.set_xticks(eps, [f"{e:g}" for e in eps])
    ax.set(xlabel="ε per hospital (δ fixed)", ylabel=f"mean site test {metric}",
           title=f"Privacy-utility: {cfg.task} · {cfg.dataset or 'default'}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
