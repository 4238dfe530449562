"""``fedcare simulate compare`` and ``fedcare simulate sweep`` (see ``experiments``)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..shared.config import DEFAULT_SITE_DELTA, parse_epsilon
from ..shared.console import err as console



def _common_config(task, dataset, model, rounds, strategy, seed, partition, sites, alpha, overrides):
    from .cli import build_config

    return build_config(task=task, dataset=dataset, model=model, rounds=rounds, strategy=strategy, seed=seed,
                        partition=partition, sites=sites, alpha=alpha, overrides=overrides)


def register(app: typer.Typer) -> None:
    @app.command("compare")
    def compare_cmd(
        task: str = typer.Option("diagnosis", help="Registered task."),
        dataset: Optional[str] = typer.Option(None, help="Builtin dataset (default: the task's first)."),
        model: Optional[str] = typer.Option(None, help="Model kind."),
        rounds: Optional[int] = typer.Option(None, help="Rounds (local epochs per round as in the run config)."),
        seeds: int = typer.Option(3, min=1, help="Seeds (first is --seed); the table gives mean and std."),
        seed: Optional[int] = typer.Option(None, help="First seed."),
        epsilon: str = typer.Option("1.0", help="ε per hospital for the DP arm (the non-DP arm always runs)."),
        delta: float = typer.Option(DEFAULT_SITE_DELTA, help="δ per hospital."),
        partition: Optional[str] = typer.Option(None, help="natural | iid | dirichlet"),
        sites: Optional[int] = typer.Option(None, help="Virtual hospitals for iid/dirichlet."),
        alpha: Optional[float] = typer.Option(None, help="Dirichlet concentration."),
        methods: str = typer.Option(",".join(("centralised", "local", "fedavg", "fedprox", "fedadam")),
                                    help="Comma-separated subset of the methods."),
        out: Path = typer.Option(Path("runs/compare"), help="Output folder (must be new or empty)."),
        overrides: list[str] = typer.Option([], "--set", help="Run-config KEY=VALUE for every run."),
    ) -> None:
        """Centralised, local-only, FedAvg, FedProx and FedAdam, without and with DP: table and plot."""
        from .experiments import compare

        cfg = _common_config(task, dataset, model, rounds, None, seed, partition, sites, alpha, overrides)
        eps = parse_epsilon(epsilon)
        wanted = [m.strip() for m in methods.split(",") if m.strip()]
        compare(cfg, seeds=seeds, epsilon=eps, delta=delta, out=out, methods=wanted,
                progress=lambda tag: console.print(f"[dim]running {tag}[/]"))
        typer.echo((out / "compare.md").read_text())
        typer.echo(f"wrote {out}/compare.csv, compare.md, compare.png, compare_runs.csv and runs/")

    @app.command("sweep")
    def sweep_cmd(
        epsilons: str = typer.Option("0.5,1,3,8", help="Comma-separated ε values per hospital."),
        task: str = typer.Option("diagnosis", help="Registered task."),
        dataset: Optional[str] = typer.Option(None, help="Builtin dataset."),
        model: Optional[str] = typer.Option(None, help="Model kind."),
        strategy: Optional[str] = typer.Option(None, help="Federated strategy (default fedavg)."),
        rounds: Optional[int] = typer.Option(None, help="Rounds."),
        seeds: int = typer.Option(3, min=1, help="Seeds (first is --seed)."),
        seed: Optional[int] = typer.Option(None, help="First seed."),
        delta: float = typer.Option(DEFAULT_SITE_DELTA, help="δ per hospital."),
        partition: Optional[str] = typer.Option(None, help="natural | iid | dirichlet"),
        sites: Optional[int] = typer.Option(None, help="Virtual hospitals for iid/dirichlet."),
        alpha: Optional[float] = typer.Option(None, help="Dirichlet concentration."),
        out: Path = typer.Option(Path("runs/sweep"), help="Output folder (must be new or empty)."),
        overrides: list[str] = typer.Option([], "--set", help="Run-config KEY=VALUE for every run."),
    ) -> None:
        """Privacy-utility curve: the main metric at each ε, against the non-DP run."""
        from ..shared.errors import ConfigError
        from .experiments import sweep

        try:
            values = [float(e) for e in epsilons.split(",") if e.strip()]
        except ValueError:
            raise ConfigError(f"--epsilons: expected numbers separated by commas, got {epsilons!r}") from None
        cfg = _common_config(task, dataset, model, rounds, strategy, seed, partition, sites, alpha, overrides)
        sweep(cfg, epsilons=values, seeds=seeds, delta=delta, out=out,
              progress=lambda tag: console.print(f"[dim]running {tag}[/]"))
        typer.echo((out / "sweep.md").read_text())
        typer.echo(f"wrote {out}/sweep.csv, sweep.md, sweep.png, sweep_runs.csv and runs/")
