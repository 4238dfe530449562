"""Membership-inference audit on heart disease: attack AUC at ε = 3 (and 1) beside no DP.

    python bench/audit.py [--rounds 20] [--seeds 1] [--model mlp]

Runs the default federation (four UCI heart-disease hospitals) per budget, attacks the
final global model with the loss-threshold attack (``fedcare audit``) and prints the
mean over sites (and seeds) of the attack ROC-AUC: ``mia_auc_eps3=`` (target <= 0.55),
``mia_auc_eps1=``, ``mia_auc_nodp=``, and the largest single-site AUC of each
(``mia_auc_max_*``), and the same for the difficulty-calibrated attack
(``mia_auc_calibrated_*``).
"""

from __future__ import annotations

import sys
from pathlib import Path

import argparse
import math
import statistics

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script or with -m
from bench.runs import simulated
from fedcare.server.audit import audit
from fedcare.shared.config import RunConfig


def aucs(epsilon: float, rounds: int, seed: int, model: str) -> list[tuple[float, float]]:
    cfg = RunConfig.from_mapping({"num-rounds": rounds, "seed": seed, "model": model})
    with simulated(cfg, epsilon) as out:
        return [(s["mia_auc"], s["mia_auc_calibrated"]) for s in audit(out)["sites"].values()]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--model", default="", help="diagnosis model (default: the task's, logreg)")
    args = parser.parse_args()
    for name, eps in (("eps3", 3.0), ("eps1", 1.0), ("nodp", math.inf)):
        pairs = [a for seed in range(args.seeds) for a in aucs(eps, args.rounds, seed, args.model)]
        plain, calibrated = [p for p, _ in pairs], [c for _, c in pairs]
        print(f"mia_auc_{name}={statistics.mean(plain):.4f}", flush=True)
        print(f"mia_auc_max_{name}={max(plain):.4f}", flush=True)
        print(f"mia_auc_calibrated_{name}={statistics.mean(calibrated):.4f}", flush=True)
        print(f"mia_auc_calibrated_max_{name}={max(calibrated):.4f}", flush=True)


if __name__ == "__main__":
    main()
