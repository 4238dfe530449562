"""``fedcare simulate``: a whole federation in one process, for researchers."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

from ..shared.config import DEFAULT_SITE_DELTA, RunConfig, parse_epsilon, parse_overrides
from ..shared.console import out as console
from ..shared.errors import ConfigError

app = typer.Typer(help="Simulate a federation of virtual hospitals in one process.",
                  invoke_without_command=True, no_args_is_help=False)


def build_config(**options: Any) -> RunConfig:
    """Command-line options (None = not given) over RunConfig defaults, validated."""
    mapping = parse_overrides(options.pop("overrides") or [])
    names = {"task": "task", "dataset": "dataset", "model": "model", "rounds": "num-rounds",
             "strategy": "strategy", "seed": "seed", "partition": "partition", "sites": "num-sites",
             "alpha": "dirichlet-alpha", "val_fraction": "val-fraction"}
    for opt, key in names.items():
        if options.get(opt) is not None:
            mapping[key] = options[opt]
    return RunConfig.from_mapping(mapping)


@app.callback()
def simulate(
    ctx: typer.Context,
    task: str = typer.Option("diagnosis", help="Registered task (see `fedcare simulate tasks`)."),
    dataset: Optional[str] = typer.Option(None, help="Builtin dataset of the task (default: the task's first)."),
    model: Optional[str] = typer.Option(None, help="Model kind (default: the task's first)."),
    rounds: Optional[int] = typer.Option(None, "--rounds", help="Federated rounds."),
    strategy: Optional[str] = typer.Option(None, help="fedavg | fedprox | fedadam | median | trimmed-mean | krum | multi-krum"),
    epsilon: str = typer.Option("1.0", help="Each hospital's ε budget for the run; 'inf' trains without DP."),
    delta: float = typer.Option(DEFAULT_SITE_DELTA, help="Each hospital's δ."),
    seed: Optional[int] = typer.Option(None, help="Seed for splits, partitions, initialisation and sampling."),
    data: list[Path] = typer.Option([], "--data", help="A hospital's CSV/folder; give once per site."),
    partition: Optional[str] = typer.Option(None, help="natural | iid | dirichlet"),
    sites: Optional[int] = typer.Option(None, help="Number of virtual hospitals for iid/dirichlet."),
    alpha: Optional[float] = typer.Option(None, help="Dirichlet concentration (smaller = more skewed)."),
    val_fraction: Optional[float] = typer.Option(None, "--val-fraction", help="Share of each hospital's "
                                                 "training records held out for validation (default 0: none)."),
    out: Optional[Path] = typer.Option(None, help="Run folder (default runs/<task>-<time>)."),
    strict: bool = typer.Option(False, help="Refuse a data file with any unreadable record."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar or table; print the run folder."),
    overrides: list[str] = typer.Option([], "--set", help="Any run-config KEY=VALUE (e.g. --set lr=0.1)."),
    ledger: str = typer.Option("off", help="Privacy-ledger directory for the virtual hospitals (default: none)."),
    min_records: Optional[int] = typer.Option(None, "--min-records", help="Every virtual hospital's min-records "
                                              "(fewest records it shares sums or metrics over; default 5)."),
    resume: Optional[Path] = typer.Option(None, "--resume", help="Continue an interrupted run folder "
                                          "(or its .partial) from its last checkpoint; other options are "
                                          "taken from the checkpoint."),
    engine: str = typer.Option("inprocess", help="inprocess (default) | ray: Flower's Ray simulation engine "
                               "(builtin partitions, the default site budget; see README)."),
) -> None:
    """Run a simulated federation (default: the four UCI heart-disease hospitals with DP, ε = 1)."""
    if ctx.invoked_subcommand is not None:
        return
    from .progress import RichProgress, summary_table
    from .runner import plan_federation, resume as resume_run, simulate as run

    observer = None if quiet else RichProgress()
    if resume is not None:
        folder = resume_run(resume, observer=observer)
    else:
        cfg = build_config(task=task, dataset=dataset, model=model, rounds=rounds, strategy=strategy, seed=seed,
                           partition=partition, sites=sites, alpha=alpha, val_fraction=val_fraction,
                           overrides=overrides)
        eps = parse_epsilon(epsilon)
        if engine == "ray":
            from .ray_engine import simulate_ray

            if min_records is not None:
                raise ConfigError("--min-records: Flower's engine passes no per-node config; use the "
                                  "in-process engine")
            if data:
                raise ConfigError("--engine ray runs builtin partitions only (Ray's virtual nodes get no "
                                  "data path); use the in-process engine with --data")
            folder = simulate_ray(cfg, out=out, epsilon=eps, delta=delta)
        elif engine == "inprocess":
            federation = plan_federation(cfg, epsilon=eps, delta=delta, data=data, strict=strict, ledger=ledger,
                                         min_records=min_records)
            if federation.skipped:
                console.print(f"[yellow]{len(federation.skipped)} unreadable record(s)/file(s) skipped[/] "
                              "(listed in the run folder's skipped.csv; --strict refuses them)")
            folder = run(cfg, federation, out=out, observer=observer)
        else:
            raise ConfigError(f"--engine: inprocess or ray, not {engine!r}")
    if quiet:
        typer.echo(str(folder))
        return
    console.print(summary_table(folder))
    console.print(f"Run folder: [bold]{folder}[/] (report.html, summary.json, metrics.csv, rounds.csv, model.pt, "
                  "model.ts, model_card.md, progress.png)")


@app.command("tasks")
def list_tasks() -> None:
    """List registered tasks with their datasets and models."""
    from ..shared.registry import get_task, task_names

    for name in task_names():
        t = get_task(name)
        console.print(f"[bold]{name}[/]: datasets {', '.join(t.datasets)}; models {', '.join(t.models)}")


from . import experiments_cli as _experiments  # noqa: E402 - attaches compare and sweep to `app`

_experiments.register(app)
