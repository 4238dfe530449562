"""The coordinator's ServerApp (``flwr run .`` and the in-process simulator run this)."""

from __future__ import annotations

import logging

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from ..shared.config import RunConfig
from .rounds import run_federation

log = logging.getLogger("fedcare.server")

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = RunConfig.from_mapping(dict(context.run_config))
    folder = run_federation(grid, cfg)
    log.info("results in %s", folder.resolve())
