"""A thousand simulated hospitals in one process: memory and harness overhead.

The diagnosis task on split data: the breast-cancer Wisconsin records dealt to N
hospitals, each given its own CSV file in the declared schema (as a real hospital joins
with ``data=FILE``). With 569 records and 1,000 sites, each site holds a random sample of
``--records`` of them (different samples, overlapping between sites): the benchmark
measures the system, not accuracy. DP-SGD with ε = 1 per site, FedAvg (streaming).

Prints:

* ``rss_mb_1000_sites``: peak resident memory of the process (target <= 1500);
* ``overhead_1000_sites``: wall time of the federation / the time the hospitals'
  ClientApps spent computing (query, DP-SGD training with its privacy accounting,
  evaluation), summed over all sites and rounds (target <= 1.2);
* ``overhead_vs_sgd_loops_1000_sites``: wall time / the time inside the training and
  evaluation loops only (``training.train`` / ``training.evaluate``), the stricter view.

    OMP_NUM_THREADS=1 python bench/scale.py [--sites 1000] [--rounds 3] [--records 24]
"""

from __future__ import annotations

import sys

import argparse
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script or with -m
from bench.timers import clock, time_hospitals
from fedcare.shared.config import RunConfig
from fedcare.simulation import runner

def write_sites(folder: Path, sites: int, records: int, seed: int) -> list[Path]:
    from sklearn.datasets import load_breast_cancer

    data = load_breast_cancer()
    names = [n.replace(" ", "_") for n in data.feature_names]
    frame = pd.DataFrame(data.data, columns=names)
    frame["malignant"] = (data.target == 0).astype(int)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(sites):
        idx = rng.choice(len(frame), size=records, replace=False)
        path = folder / f"h{i:04d}.csv"
        frame.iloc[idx].to_csv(path, index=False)
        paths.append(path)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sites", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--records", type=int, default=24)
    args = parser.parse_args()
    time_hospitals()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        paths = write_sites(tmp, args.sites, args.records, seed=0)
        cfg = RunConfig.from_mapping({"dataset": "breast-cancer", "num-rounds": args.rounds,
                                      "min-sites": args.sites})
        t = time.perf_counter()
        fed = runner.plan_federation(cfg, epsilon=1.0, delta=1e-5, data=paths)
        plan_s = time.perf_counter() - t
        t = time.perf_counter()
        runner.simulate(cfg, fed, out=tmp / "run")
        wall = time.perf_counter() - t
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    n = args.sites
    print(f"plan_s_{n}_sites={plan_s:.2f}")
    print(f"wall_s_{n}_sites={wall:.2f}")
    print(f"client_compute_s_{n}_sites={clock['client']:.2f}")
    print(f"sgd_loops_s_{n}_sites={clock['loops']:.2f}")
    print(f"rss_mb_{n}_sites={rss_mb:.0f}")
    print(f"overhead_{n}_sites={wall / clock['client']:.3f}")
    print(f"overhead_vs_sgd_loops_{n}_sites={wall / clock['loops']:.3f}")


if __name__ == "__main__":
    main()
