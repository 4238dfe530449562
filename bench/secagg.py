"""Secure aggregation cost: one secure round ÷ one plain round, wall time, 10 hospitals.

    python bench/secagg.py [--sites 10] [--rounds 3] [--repeats 2]

Both federations are identical (heart disease dealt IID to N hospitals, DP-SGD at ε = 1
per hospital); only ``secure-aggregation`` differs. Only the train rounds are timed
(``_train_round``: for the secure run this is key exchange, share relay, training,
masking and unmasking). The in-process grid runs the hospitals one after another, so
every site's crypto is on the critical path here; deployed, sites work in parallel.
Prints ``secagg_over_plain=`` (target <= 1.5) and the per-round seconds.
"""

from __future__ import annotations

import sys
from pathlib import Path

import argparse
import statistics
import time

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script or with -m
from bench.runs import simulated
from fedcare.server import rounds
from fedcare.shared.config import RunConfig

_spent: list[float] = []
_inner = rounds._train_round


def _timed(*args, **kwargs):
    start = time.perf_counter()
    try:
        return _inner(*args, **kwargs)
    finally:
        _spent.append(time.perf_counter() - start)


def round_seconds(secure: bool, sites: int, num_rounds: int) -> float:
    cfg = RunConfig.from_mapping({"num-rounds": num_rounds, "partition": "iid", "num-sites": sites,
                                  "secure-aggregation": secure})
    _spent.clear()
    with simulated(cfg, 1.0):
        pass  # only the train rounds count, clocked by _timed
    return statistics.median(_spent)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sites", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    rounds._train_round = _timed
    round_seconds(False, args.sites, 1)  # warm caches (data, imports) before timing
    plain, secure = [], []
    for _ in range(args.repeats):  # interleaved, so machine load hits both alike
        plain.append(round_seconds(False, args.sites, args.rounds))
        secure.append(round_seconds(True, args.sites, args.rounds))
    p, s = statistics.median(plain), statistics.median(secure)
    print(f"plain_round_s={p:.4f}")
    print(f"secagg_round_s={s:.4f}")
    print(f"secagg_over_plain={s / p:.3f}")


if __name__ == "__main__":
    main()
