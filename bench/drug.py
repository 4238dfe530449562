"""Drug task targets of issue 4: Tox21 over 4 scaffold-split sites, and the DP step cost.

    python bench/drug.py [--seeds 1] [--rounds R] [--models mlp,cnn,lstm] [--set KEY=VALUE]

prints, for the default model,

* ``tox21_auc_nodp=``: mean per-site test ROC-AUC (mean over the 12 assays), federated
  without DP (target >= 0.80);
* ``tox21_auc_dp8=``: the same with DP-SGD at epsilon = 8, delta = 1e-5 per site
  (target >= 0.75);
* ``dp_step_ratio_drug=``: time of a DP-SGD step / time of a plain step, same model,
  data and batch size, measured in this run on CPU (target <= 3), with the absolute
  ``dp_step_ms_drug=`` and ``plain_step_ms_drug=`` (a ratio hides how cheap a step is);

and, for every model in ``--models``, ``tox21_auc_nodp_<model>=``,
``tox21_auc_dp8_<model>=`` and ``dp_step_ratio_drug_<model>=`` (how the default was
chosen).
"""

from __future__ import annotations

import sys
from pathlib import Path

import argparse
import math
import statistics
import time

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script or with -m
from bench.runs import add_set_option, set_overrides, summary
from fedcare.client import training
from fedcare.shared.config import RunConfig
from fedcare.shared.registry import get_task

TASK = get_task("drug")


def config(overrides: dict) -> RunConfig:
    return RunConfig.from_mapping({"task": "drug", **overrides})


def mean_site_auc(epsilon: float, seed: int, overrides: dict) -> float:
    return summary(config({**overrides, "seed": seed}), epsilon)["mean_site_roc_auc"]


def step_times(overrides: dict, steps: int = 30, repeats: int = 5) -> tuple[float, float, float]:
    """(median DP/plain ratio, DP ms per step, plain ms per step), runs interleaved."""
    cfg = config(overrides).resolved(TASK.defaults)
    site = TASK.builtin_sites(cfg.dataset, 0)[1]
    prep = TASK.finalize_stats(TASK.local_stats(site.train, cfg), cfg)
    subset = TASK.to_dataset(site.train, prep, cfg, train=True)
    batches = math.ceil(len(subset) / cfg.batch_size)
    cfg = cfg.replace(local_epochs=max(1, math.ceil(steps / batches)))  # about `steps` steps

    def timed(sigma: float | None) -> float:
        torch.manual_seed(0)
        model = TASK.build_model(cfg)
        start = time.perf_counter()
        outcome = training.train(TASK, model, subset, cfg, noise_multiplier=sigma, seed=0)
        return (time.perf_counter() - start) / outcome.steps

    timed(1.0), timed(None)  # warm-up: imports, allocator, Opacus hooks
    pairs = [(timed(1.0), timed(None)) for _ in range(repeats)]
    return (statistics.median(d / p for d, p in pairs), 1000 * statistics.median(d for d, _ in pairs),
            1000 * statistics.median(p for _, p in pairs))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--models", default=TASK.defaults["model"], help="comma-separated model kinds")
    parser.add_argument("--skip-auc", action="store_true", help="only the step-time ratios")
    add_set_option(parser)
    args = parser.parse_args()
    overrides: dict = {"num-rounds": args.rounds, **set_overrides(args)}
    torch.set_num_threads(1)
    default = TASK.defaults["model"]
    for model in args.models.split(","):
        suffix = "" if model == default else f"_{model}"
        per_model = {**overrides, "model": model}
        ratio, dp_ms, plain_ms = step_times(per_model)
        print(f"dp_step_ratio_drug{suffix}={ratio:.2f}")
        print(f"dp_step_ms_drug{suffix}={dp_ms:.1f}")
        print(f"plain_step_ms_drug{suffix}={plain_ms:.1f}", flush=True)
        if args.skip_auc:
            continue
        for name, eps in (("tox21_auc_nodp", math.inf), ("tox21_auc_dp8", 8.0)):
            aucs = [mean_site_auc(eps, seed, per_model) for seed in range(args.seeds)]
            print(f"{name}{suffix}={statistics.mean(aucs):.4f}")
            if args.seeds > 1:
                print(f"{name}{suffix}_std={statistics.pstdev(aucs):.4f}")
            sys.stdout.flush()


if __name__ == "__main__":
    main()
