"""Issue 2's harness targets, measured in one process, one run each.

* ``sim_overhead``: wall time of the in-process federation (``simulate``: ServerApp,
  grid, ClientApp, validation, aggregation, run-folder files) divided by the pure local
  compute of the same job, the time spent inside ``training.train`` and
  ``training.evaluate`` summed over every site and round. Target <= 1.10.
* ``sim_overhead_vs_clientapp``: the same wall time divided by the time spent inside
  the hospitals' ClientApps (everything a hospital computes: data, DP noise calibration
  and accounting, training, evaluation): the harness' own share.
* ``ray_over_inprocess``: the same 4-site, 3-round heart job on Flower's Ray simulation
  engine divided by the in-process harness. Target >= 20.
* ``sim_overhead_pathology``: ``sim_overhead`` of a job whose training is not tiny: the
  four shipped pathology hospitals, 2 rounds at ε = 8 (what the harness adds to real
  training, where the heart job's ~0.1 s of fixed work no longer dominates).

    OMP_NUM_THREADS=1 python bench/sim_overhead.py [--rounds R] [--no-ray] [--no-pathology]

(the default job: the heart federation with DP, ε = 1, the task's default rounds).

The first in-process run warms imports and caches (as any second run in a session
would be) and is not counted. ``sim_overhead_nodp`` is the same job with ε = ∞:
with DP, most of the hospitals' time goes to calibrating the noise for the run (the RDP
and PRV bounds at ~30 noise levels), which the strict ratio counts as overhead.
"""

from __future__ import annotations

import sys

import argparse
import math
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script or with -m
from bench.timers import clock, time_hospitals
from fedcare.shared.config import RunConfig
from fedcare.simulation.runner import plan_federation, simulate

def inprocess(rounds: int, tmp: Path, tag: str, epsilon: float = 1.0,
              task: str = "diagnosis") -> tuple[float, float]:
    cfg = RunConfig.from_mapping({"task": task, "num-rounds": rounds})
    fed = plan_federation(cfg, epsilon=epsilon, delta=1e-5)
    clock.clear()
    t = time.perf_counter()
    simulate(cfg, fed, out=tmp / tag)
    return time.perf_counter() - t, clock["compute"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=RunConfig().num_rounds)
    parser.add_argument("--no-ray", action="store_true")
    parser.add_argument("--no-pathology", action="store_true")
    args = parser.parse_args()
    time_hospitals(loops="compute")
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        inprocess(2, tmp, "warm")
        wall, compute = inprocess(args.rounds, tmp, "job")
        print(f"rounds={args.rounds or 'task default'}")
        print(f"inprocess_wall_s={wall:.3f}")
        print(f"local_compute_s={compute:.3f}")
        print(f"clientapp_s={clock['client']:.3f}")
        print(f"sim_overhead={wall / compute:.3f}")
        print(f"sim_overhead_vs_clientapp={wall / clock['client']:.3f}", flush=True)
        # The same job without DP: what the harness costs when no noise is calibrated.
        wall, compute = inprocess(args.rounds, tmp, "nodp", epsilon=math.inf)
        print(f"sim_overhead_nodp={wall / compute:.3f}")
        print(f"sim_overhead_nodp_vs_clientapp={wall / clock['client']:.3f}", flush=True)
        if not args.no_pathology:
            wall, compute = inprocess(2, tmp, "pathology", epsilon=8.0, task="pathology")
            print(f"pathology_wall_s={wall:.1f}")
            print(f"sim_overhead_pathology={wall / compute:.3f}")
            print(f"sim_overhead_pathology_vs_clientapp={wall / clock['client']:.3f}", flush=True)
        if args.no_ray:
            return
        small, _ = inprocess(3, tmp, "small")
        from fedcare.simulation.ray_engine import simulate_ray

        cfg = RunConfig.from_mapping({"num-rounds": 3})
        t = time.perf_counter()
        simulate_ray(cfg, out=tmp / "ray")
        ray_wall = time.perf_counter() - t
        print(f"inprocess_3_rounds_s={small:.3f}")
        print(f"ray_3_rounds_s={ray_wall:.3f}")
        print(f"ray_over_inprocess={ray_wall / small:.1f}")


if __name__ == "__main__":
    main()
