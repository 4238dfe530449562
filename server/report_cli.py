"""``fedcare report RUN_DIR``: (re)write a run's single-file HTML report and model card."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..shared.errors import ConfigError


def register(app: typer.Typer) -> None:
    @app.command("report")
    def report(
        run_dir: Path = typer.Argument(..., help="A run folder (finished, or an interrupted .partial)."),
        out: Optional[Path] = typer.Option(None, help="HTML file to write (default RUN_DIR/report.html)."),
        export: bool = typer.Option(False, "--export", help="Also (re)write model.ts and the model card."),
    ) -> None:
        """Write a self-contained HTML report (configuration, sites, ε, metrics, plots)."""
        from .report import write_report

        if not (run_dir / "config.json").exists() or not (run_dir / "rounds.csv").exists():
            raise ConfigError(f"{run_dir} is not a fedcare run folder with at least one round "
                              "(config.json, rounds.csv)")
        if export:
            import json

            from ..shared.config import RunConfig
            from ..shared.registry import get_task
            from . import export as exporter

            if not (run_dir / "summary.json").exists():
                raise ConfigError(f"{run_dir} is not finished: nothing to export")
            cfg = RunConfig.from_mapping(json.loads((run_dir / "config.json").read_text()))
            task = get_task(cfg.task)
            exporter.write_all(run_dir, task, cfg.resolved(task.defaults),
                               json.loads((run_dir / "summary.json").read_text()))
            typer.echo(f"wrote {run_dir / exporter.TORCHSCRIPT} and {run_dir / exporter.CARD_MD}")
        path = write_report(run_dir, out)
        typer.echo(f"wrote {path}")
