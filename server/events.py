"""How a running federation reports progress, independent of who is watching.

The ServerApp emits events to the observer in ``current``; the default one logs. The
in-process simulator sets a rich progress bar for the duration of a run; under
``flwr run`` the ServerApp's log lines are what the coordinator follows.
"""

from __future__ import annotations

import logging
from contextvars import ContextVar
from typing import Any, Mapping

log = logging.getLogger("fedcare.server")


class Observer:
    """Receives run events; subclasses override what they display."""

    def started(self, num_rounds: int, sites: Mapping[int, str], config: Mapping[str, Any]) -> None:
        log.info("run started: %d rounds, %d site(s): %s", num_rounds, len(sites), ", ".join(sites.values()))

    def round_done(self, rnd: int, num_rounds: int, metric: str, value: float, max_epsilon: float,
                   problems: list[str]) -> None:
        log.info("round %d/%d: global %s=%.4f, max ε=%.3f%s", rnd, num_rounds, metric, value, max_epsilon,
                 ("; " + "; ".join(problems)) if problems else "")

    def rejected(self, rnd: int, site: str, reason: str) -> None:
        log.warning("round %d: reply from %s rejected: %s", rnd, site, reason)

    def finished(self, folder: str, summary: Mapping[str, Any]) -> None:
        log.info("run finished: %s", folder)


current: ContextVar[Observer] = ContextVar("fedcare_observer", default=Observer())
