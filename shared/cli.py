"""The ``fedcare`` command: one entry point, one sub-command group per role.

* ``fedcare simulate ...``: researchers (in-process federations).
* ``fedcare hospital ...``: a hospital (check data, join, budget).
* ``fedcare coordinator ...``: a coordinator (provision, start, register, run).
* ``fedcare predict`` / ``recommend`` / ``audit``: apply or inspect a finished run.

Each role's commands live beside its code (``client/cli.py``, ``server/cli.py``,
``simulation/cli.py``) and are attached here; a command group whose module is missing
its optional dependencies is simply not offered.
"""

from __future__ import annotations

import importlib
import logging
import sys

import typer

from .console import err
from .errors import FedcareError

app = typer.Typer(
    name="fedcare",
    help="Privacy-preserving federated learning for hospitals (Flower + Opacus DP-SGD).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

#: (module, attribute, name) of each sub-command group or command set.
_GROUPS = [
    ("fedcare.simulation.cli", "app", "simulate"),
    ("fedcare.client.cli", "app", "hospital"),
    ("fedcare.server.cli", "app", "coordinator"),
]
#: Modules exposing ``register(app)`` to add top-level commands (predict, audit, ...).
_COMMANDS = ["fedcare.server.inference_cli", "fedcare.server.recommend_cli", "fedcare.server.audit_cli",
             "fedcare.server.report_cli"]


_attached = False


def _attach() -> None:
    """Add the role groups and top-level commands (once)."""
    global _attached
    if _attached:
        return
    _attached = True
    for module, attr, name in _GROUPS:
        try:
            sub = getattr(importlib.import_module(module), attr)
        except ModuleNotFoundError as exc:
            if exc.name == module:
                continue
            raise
        app.add_typer(sub, name=name)
    for module in _COMMANDS:
        try:
            importlib.import_module(module).register(app)
        except ModuleNotFoundError as exc:
            if exc.name == module:
                continue
            raise


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    _attach()
    try:
        app()
    except FedcareError as exc:
        err.print(f"[bold red]error:[/] {exc}", highlight=False)
        sys.exit(exc.exit_code)


if __name__ == "__main__":
    main()
