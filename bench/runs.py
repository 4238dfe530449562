"""One simulated federation in a throw-away folder: what most benchmarks measure."""

from __future__ import annotations

import argparse
import json
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from flwr.clientapp import ClientApp

from fedcare.shared.config import DEFAULT_SITE_DELTA, RunConfig, parse_overrides
from fedcare.shared.errors import ConfigError
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


def add_set_option(parser: argparse.ArgumentParser) -> None:
    """``--set KEY=VALUE`` (repeatable), checked as the arguments are parsed: a malformed
    pair, an unknown key or a bad value ends in argparse's usage error (exit 2), before
    any federation runs."""
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", type=_override,
                        help="run-config override (repeatable)")


def set_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The ``--set`` pairs as one run-config mapping (a later pair wins)."""
    return {key: value for pair in args.set for key, value in pair.items()}


def _override(text: str) -> dict[str, Any]:
    try:
        pair = parse_overrides([text])
        RunConfig.from_mapping(pair)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return pair
