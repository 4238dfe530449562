"""Heart disease targets of issue 2: mean per-site test accuracy over 5 seeds.

FLamby's per-centre split sizes (train/test 199/104, 172/89, 30/16, 85/45), four
hospitals, federated without DP and with DP at ε = 1 per hospital.

    python bench/heart.py [--seeds 5] [--rounds R]

prints ``heart_acc_nodp=`` and ``heart_acc_dp1=`` (and their spread over seeds).
"""

from __future__ import annotations

import sys
from pathlib import Path

import argparse
import math
import statistics

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script or with -m
from bench.runs import add_set_option, set_overrides, summary
from fedcare.shared.config import RunConfig


def mean_site_accuracy(epsilon: float, seed: int, rounds: int, overrides: dict) -> float:
    # rounds == 0: the task's default
    cfg = RunConfig.from_mapping({"num-rounds": rounds, "seed": seed, **overrides})
    return summary(cfg, epsilon)["mean_site_accuracy"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=RunConfig().num_rounds)
    add_set_option(parser)
    args = parser.parse_args()
    overrides = set_overrides(args)
    for name, eps in (("heart_acc_nodp", math.inf), ("heart_acc_dp1", 1.0)):
        accs = [mean_site_accuracy(eps, seed, args.rounds, overrides) for seed in range(args.seeds)]
        print(f"{name}={statistics.mean(accs):.4f}")
        print(f"{name}_std={statistics.pstdev(accs):.4f}")
        print(f"{name}_per_seed={','.join(f'{a:.3f}' for a in accs)}", flush=True)


if __name__ == "__main__":
    main()
