"""One simulated federation in a throw-away folder: what most benchmarks measure."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from flwr.clientapp import ClientApp

from fedcare.shared.config import DEFAULT_SITE_DELTA, RunConfig
from fedcare.simulation.runner import plan_federation, simulate


@contextmanager
def simulated(cfg: RunConfig, epsilon: float, *, data: Sequence[Path] = (),
              apps: Mapping[int, ClientApp] | None = None) -> Iterator[Path]:
    """The finished run folder, read inside the ``with`` and deleted after it."""
    fed = plan_federation(cfg, epsilon=epsilon, delta=DEFAULT_SITE_DELTA, data=data)
    with tempfile.TemporaryDirectory() as tmp:
        yield simulate(cfg, fed, out=Path(tmp) / "run", apps=apps)


def summary(cfg: RunConfig, epsilon: float, **kw: Any) -> dict:
    """The run's ``summary.json``, for benchmarks that need nothing else of it."""
    with simulated(cfg, epsilon, **kw) as out:
        return json.loads((out / "summary.json").read_text())
