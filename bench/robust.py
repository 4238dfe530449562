"""Robust aggregation against one hostile hospital of four: final accuracy vs the clean run.

    python bench/robust.py [--rounds 20] [--epsilon inf] [--seed 0]

The four natural UCI heart-disease hospitals; hospital 1 (Cleveland, the largest) sends
its honest update scaled by 100 or sign-flipped (``g - (w - g)``), through the real
ClientApp wrapped by a corrupting one. For fedavg and each robust rule it prints the
final mean per-site test accuracy and its drop from the clean fedavg run:
``robust_<strategy>_<attack>_acc=`` and ``robust_<strategy>_<attack>_drop=`` (target:
drop <= 0.02 for median, trimmed-mean and krum).
"""

from __future__ import annotations

import sys
from pathlib import Path

import argparse

import numpy as np
from flwr.app import Array, ArrayRecord
from flwr.clientapp import ClientApp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script or with -m
from bench.runs import summary
from fedcare.client.app import app as honest_app
from fedcare.shared.config import RunConfig, parse_epsilon

ATTACKS = {"scaled": 100.0, "signflip": -1.0}


def corrupting(factor: float) -> ClientApp:
    app = ClientApp()

    @app.train()
    def train(msg, context):
        reply = honest_app(msg, context)
        if reply.has_error():
            return reply
        g = {k: v.numpy() for k, v in msg.content["arrays"].items()}
        w = {k: v.numpy() for k, v in reply.content["arrays"].items()}
        reply.content["arrays"] = ArrayRecord({k: Array(np.ascontiguousarray((g[k] + factor * (w[k] - g[k]))
                                                                             .astype(w[k].dtype))) for k in w})
        return reply

    app.query()(lambda msg, context: honest_app(msg, context))
    app.evaluate()(lambda msg, context: honest_app(msg, context))
    return app


def accuracy(strategy: str, attack: str | None, rounds: int, epsilon: float, seed: int) -> float:
    cfg = RunConfig.from_mapping({"num-rounds": rounds, "strategy": strategy, "seed": seed,
                                  "reproducible-noise": True})
    apps = {1: corrupting(ATTACKS[attack])} if attack else None
    return summary(cfg, epsilon, apps=apps)["mean_site_accuracy"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--epsilon", default="inf")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--strategies", default="fedavg,median,trimmed-mean,krum")
    args = parser.parse_args()
    eps = parse_epsilon(args.epsilon)
    clean = accuracy("fedavg", None, args.rounds, eps, args.seed)
    print(f"robust_fedavg_clean_acc={clean:.4f}", flush=True)
    for strategy in args.strategies.split(","):
        if strategy != "fedavg":
            own = accuracy(strategy, None, args.rounds, eps, args.seed)
            print(f"robust_{strategy}_clean_acc={own:.4f}", flush=True)
        for attack in ATTACKS:
            acc = accuracy(strategy, attack, args.rounds, eps, args.seed)
            print(f"robust_{strategy}_{attack}_acc={acc:.4f}", flush=True)
            print(f"robust_{strategy}_{attack}_drop={clean - acc:.4f}", flush=True)


if __name__ == "__main__":
    main()
