"""Which diagnosis model under DP? The measurement behind the default (README table).

    python bench/heart_models.py [--seeds 3]

prints ``heart_<model>_nodp=`` and ``heart_<model>_dp1=`` (mean per-site test accuracy
over seeds, default settings otherwise) for the 64-32 MLP and logistic regression.
"""

from __future__ import annotations

import sys
from pathlib import Path

import argparse
import math
import statistics

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script or with -m
from bench.heart import mean_site_accuracy


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    for model in ("mlp", "logreg"):
        for name, eps in (("nodp", math.inf), ("dp1", 1.0)):
            accs = [mean_site_accuracy(eps, s, 0, {"model": model}) for s in range(args.seeds)]
            print(f"heart_{model}_{name}={statistics.mean(accs):.4f}", flush=True)


if __name__ == "__main__":
    main()
