"""Stopwatches the benchmarks wrap around the real code (no change to what runs)."""

from __future__ import annotations

import time
from collections import defaultdict
from typing import Any, Callable

#: Seconds accumulated per name, reset by the benchmark between runs.
clock: defaultdict[str, float] = defaultdict(float)


def timed(fn: Callable[..., Any], name: str) -> Callable[..., Any]:
    """``fn`` with the time spent inside it added to ``clock[name]``."""

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            clock[name] += time.perf_counter() - start

    return wrapper


def time_hospitals(loops: str = "loops") -> None:
    """Clock the training/evaluation loops under ``loops`` and whole ClientApp calls under "client"."""
    from fedcare.client import training
    from fedcare.simulation import runner

    runner.client_app = timed(runner.client_app, "client")
    training.train = timed(training.train, loops)
    training.evaluate = timed(training.evaluate, loops)
