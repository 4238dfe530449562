"""``fedcare hospital``: what a hospital runs on its own machine."""

from __future__ import annotations

import math
from pathlib import Path

import typer
from rich.table import Table

from ..shared.console import out as console
from ..shared.registry import get_task

app = typer.Typer(help="Hospital side: check local data, join a federation, see the privacy budget.",
                  no_args_is_help=True)


@app.command("check")
def check(
    task: str = typer.Option(..., help="Task whose schema the data must follow (e.g. diagnosis)."),
    data: Path = typer.Option(..., help="The hospital's data file or folder."),
    dataset: str = typer.Option("", help="Declared schema within the task (default: the task's default)."),
    strict: bool = typer.Option(False, "--strict", help="Treat any unreadable record (skipped otherwise) as a "
                                "problem, as 'fedcare simulate/hospital join --strict' would refuse the data."),
) -> None:
    """Validate local data against the task's schema and print a report (exit 2 on problems)."""
    t = get_task(task)
    dataset = dataset or t.defaults["dataset"]
    report = t.check_file(data, dataset)
    if strict and report.unreadable:
        report.problems.append(f"{report.unreadable} unreadable record(s): refused with --strict")
    console.print(f"[bold]{report.path}[/]: {report.rows} record(s), schema {task}/{dataset}")
    if report.columns:
        table = Table("column", "type", "missing", "min", "max")
        for c in report.columns:
            table.add_row(str(c["column"]), str(c["kind"]), str(c["missing"]),
                          _num(c.get("min")), _num(c.get("max")))
        console.print(table)
    if report.label_counts:
        total = sum(report.label_counts.values())
        console.print("labels: " + ", ".join(f"{k} {v} ({v / total:.0%})" for k, v in report.label_counts.items()))
    for note in report.notes:
        console.print(f"[cyan]note:[/] {note}")
    for problem in report.problems:
        console.print(f"[red]problem:[/] {problem}")
    if not report.ok:
        raise typer.Exit(2)
    console.print("[green]OK[/]: the data can join a federation for this task.")


def _num(value: object) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return f"{value:g}" if isinstance(value, (int, float)) else str(value)


def _attach_extensions() -> None:
    """Commands that live in their own modules (join, budget) add themselves here."""
    import importlib

    for name in ("join_cli", "budget_cli"):
        module = f"{__package__}.{name}"
        try:
            importlib.import_module(module).register(app)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise


_attach_extensions()
