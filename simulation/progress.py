"""What a researcher sees while an in-process federation runs, and after."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Mapping

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from ..server.events import Observer
from ..server.results import refused_note
from ..shared.console import err


class RichProgress(Observer):
    """A progress bar over rounds with the live global metric and the largest ε spent."""

    def __init__(self, console: Console | None = None) -> None:
        self.console = console or err
        self.progress: Progress | None = None
        self.task_id = None

    def started(self, num_rounds: int, sites: Mapping[int, str], config: Mapping[str, Any]) -> None:
        self.console.print(f"[bold]{config['task']}[/] on {len(sites)} site(s): {', '.join(sites.values())}")
        self.progress = Progress(
            TextColumn("[bold blue]round"), MofNCompleteColumn(), BarColumn(),
            TextColumn("{task.fields[status]}"), TimeElapsedColumn(), console=self.console, transient=False)
        self.progress.start()
        self.task_id = self.progress.add_task("rounds", total=num_rounds, status="")

    def round_done(self, rnd: int, num_rounds: int, metric: str, value: float, max_epsilon: float,
                   problems: list[str]) -> None:
        if self.progress is None:
            return
        eps = "∞ (no DP)" if math.isinf(max_epsilon) else f"{max_epsilon:.3f}"
        self.progress.update(self.task_id, completed=rnd, status=f"global {metric} {value:.3f} · max ε {eps}")

    def rejected(self, rnd: int, site: str, reason: str) -> None:
        self.console.print(f"[yellow]round {rnd}: {site}: {reason}[/]")

    def finished(self, folder: str, summary: Mapping[str, Any]) -> None:
        self._stop()

    def _stop(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None

    def __del__(self) -> None:
        self._stop()


def summary_table(folder: Path) -> Table:
    """Per-site test metrics and ε spent, from a finished run's summary.json."""
    summary = json.loads((Path(folder) / "summary.json").read_text())
    main = summary.get("main_metric", "accuracy")
    present = set().union(*(site.keys() for site in summary["sites"].values())) if summary["sites"] else set()
    metrics = [m for m in ("accuracy", "precision", "recall", "f1", "roc_auc") if m in present]
    if main not in metrics:
        metrics.insert(0, main)
    deltas = {site.get("delta") for site in summary["sites"].values()} - {None}
    delta = f" · δ = {deltas.pop():g}" if len(deltas) == 1 else ""
    table = Table(title=f"{summary['task']} · {summary['strategy']} · {summary['rounds']} rounds{delta} · "
                        "test metrics per site")
    table.add_column("site", no_wrap=True)
    table.add_column("n", justify="right", no_wrap=True)
    for m in metrics:
        table.add_column(_SHORT.get(m, m), justify="right", no_wrap=True)
    table.add_column("ε spent", justify="right", no_wrap=True)
    for name, site in summary["sites"].items():
        eps = site.get("epsilon")
        table.add_row(name, str(site.get("num_examples", "")),
                      *[_fmt(site.get(m)) for m in metrics],
                      "∞ (no DP)" if eps is None else f"{eps:.3f}")
    table.add_row("[bold]mean", "", *[f"[bold]{_fmt(summary.get(f'mean_site_{m}'))}" for m in metrics], "")
    table.caption = refused_note(summary)
    return table


_SHORT = {"accuracy": "acc", "precision": "prec", "recall": "rec", "f1": "F1", "roc_auc": "AUC"}


def _fmt(value: Any) -> str:
    return "n/a" if value is None else f"{value:.3f}"
