"""``fedcare recommend``: top-k treatments per patient from a finished recommendation run.

Runs where the patients are (a hospital applying the federation's model to its own
records): the input file is read and validated like training data (errors name file,
row and column) and nothing is written unless every row is valid.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..shared.errors import ConfigError


def register(app: typer.Typer) -> None:
    @app.command("recommend")
    def recommend(
        run_dir: Path = typer.Argument(..., help="A finished run folder of task 'recommendation'."),
        input: Path = typer.Argument(..., help="Patients: ACTG baseline covariates CSV, or treatment-history "
                                               "CSV (patient, treatment, response[, time]) for 'longitudinal'."),
        k: int = typer.Option(3, "--k", help="Treatments to recommend per patient."),
        out: Optional[Path] = typer.Option(None, "--out", help="CSV to write (default: stdout)."),
        include_tried: bool = typer.Option(False, help="Also rank treatments a patient already tried."),
    ) -> None:
        """Write each patient's top-k treatments with their predicted outcome as CSV."""
        from .inference_cli import load_run, write_csv

        if k < 1:
            raise ConfigError("--k must be >= 1")
        task, cfg, model, prep = load_run(run_dir)
        if not hasattr(task, "recommend"):
            raise ConfigError(f"{run_dir} is a '{task.name}' run; recommend needs a 'recommendation' run")
        frame = task.recommend(model, prep, cfg, input, k, include_tried=include_tried)
        if write_csv(frame, out):
            typer.echo(f"wrote {len(frame)} recommendation(s) for {frame['patient'].nunique()} patient(s) to {out}")
