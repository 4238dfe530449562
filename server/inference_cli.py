"""``fedcare predict``: apply a finished run's global model to new inputs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import typer

from ..shared.atomic import atomic_path
from ..shared.config import RunConfig
from ..shared.errors import ConfigError
from ..shared.registry import get_task


def load_run(run_dir: Path):
    """(task, cfg, model, prep) of a finished run folder."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.json").exists() or not (run_dir / "model.pt").exists():
        raise ConfigError(f"{run_dir} is not a finished fedcare run folder (config.json, model.pt)")
    cfg = RunConfig.from_mapping(json.loads((run_dir / "config.json").read_text()))
    task = get_task(cfg.task)
    cfg = cfg.resolved(task.defaults)
    model = task.build_model(cfg)
    state = torch.load(run_dir / "model.pt", map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=not task.local_prefixes)
    model.eval()
    with np.load(run_dir / "preprocess.npz") as npz:
        prep = {k: npz[k] for k in npz.files}
    return task, cfg, model, prep


def write_csv(frame, out: Path | None) -> bool:
    """The frame as CSV on stdout, or atomically into ``out`` (True when a file was written)."""
    if out is None:
        typer.echo(frame.to_csv(index=False), nl=False)
        return False
    with atomic_path(out) as tmp:
        frame.to_csv(tmp, index=False)
    return True


def register(app: typer.Typer) -> None:
    @app.command("predict")
    def predict(
        run_dir: Path = typer.Argument(..., help="A finished run folder."),
        inputs: list[str] = typer.Argument(..., help="Input file(s)/folder(s), or literal values (e.g. SMILES)."),
        task: Optional[str] = typer.Option(None, help="Expected task; refuses a run of another task."),
        out: Optional[Path] = typer.Option(None, help="CSV to write (default: stdout)."),
    ) -> None:
        """Write predictions (per-class/label probabilities) for new cases as CSV."""
        t, cfg, model, prep = load_run(run_dir)
        if task is not None and task != t.name:
            raise ConfigError(f"{run_dir} is a '{t.name}' run, not '{task}'")
        with torch.no_grad():
            frame = t.infer(model, prep, cfg, list(inputs))
        if write_csv(frame, out):
            typer.echo(f"wrote {len(frame)} prediction(s) to {out}")
