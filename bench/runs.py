"""One simulated federation in a throw-away folder: what most benchmarks measure."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from flwr.clientapp import ClientApp

from fedcare.shared.config import RunConfig
from fedcare.simulation.runner import plan_federation, simulate


def run_config(overrides: Mapping[str, Any]) -> RunConfig:
    """The default run config with ``overrides`` (run-config keys) on top."""
    return RunConfig.from_mapping({**RunConfig().to_mapping(), **overrides})


@contextmanager
def simulated(cfg: RunConfig, epsilon: float, *, delta: float = 1e-5, data: Sequence[Path] = (),
              apps: Mapping[int, ClientApp] | None = None) -> Iterator[Path]:
    """The finished run folder, read inside the ``with`` and deleted after it."""
    fed = plan_federation(cfg, epsilon=epsilon, delta=delta, data=data)
    with tempfile.TemporaryDirectory() as tmp:
        yield simulate(cfg, fed, out=Path(tmp) / "run", apps=apps)


def summary(cfg: RunConfig, epsilon: float, **kw: Any) -> dict:
    """The run's ``summary.json``, for benchmarks that need nothing else of it."""
    with simulated(cfg, epsilon, **kw) as out:
        return json.loads((out / "summary.json").read_text())
