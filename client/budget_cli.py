"""``fedcare hospital budget``: spent and remaining privacy budget per data set, from the ledger."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from ..shared.console import out as console
from . import ledger as ledger_mod


def rows(directory: Path, delta: float | None = None) -> list[dict[str, object]]:
    """One row per data set: runs, rounds, spent ε at δ, budget, remaining, verification."""
    out: list[dict[str, object]] = []
    for item in ledger_mod.Ledger(directory).chains():
        if isinstance(item, ledger_mod.LedgerTampered):
            out.append({"dataset": item.label or "?", "status": f"TAMPERED: {item}"})
            continue
        if not item.entries:
            continue
        last = item.entries[-1]
        at = float(delta if delta is not None else last["delta"])
        spent = ledger_mod.spent(item, at)
        budget = float(last["budget_epsilon"])
        out.append({"dataset": item.label, "runs": len(item.runs), "rounds": len(item.entries),
                    "spent": spent, "delta": at, "budget": budget,
                    "remaining": max(0.0, budget - spent) if math.isfinite(budget) else math.inf,
                    "status": "verified"})
    return out


def register(app: typer.Typer) -> None:
    @app.command("budget")
    def budget(
        ledger: Optional[Path] = typer.Option(None, help="Ledger directory (default: $FEDCARE_HOME/ledger "
                                              "or ~/.fedcare/ledger)."),
        delta: Optional[float] = typer.Option(None, help="Report ε at this δ (default: the last run's δ)."),
    ) -> None:
        """Privacy budget spent and remaining per data set, across every run (exit 3 if tampered)."""
        directory = ledger or ledger_mod.default_directory()
        table = Table("data set", "runs", "rounds", "ε spent", "δ", "ε budget", "ε left", "ledger",
                      title=f"Privacy ledger {directory}")
        table.columns[0].overflow = "fold"
        for column in table.columns[1:]:
            column.no_wrap = True  # numbers stay whole; only the data-set name folds
        found = rows(directory, delta)
        tampered = False
        for r in found:
            if str(r["status"]).startswith("TAMPERED"):
                tampered = True
                table.add_row(str(r["dataset"]), "", "", "", "", "", "", "[red]TAMPERED[/]")
                continue
            table.add_row(str(r["dataset"]), str(r["runs"]), str(r["rounds"]), f"{r['spent']:.4f}",
                          f"{r['delta']:g}", f"{r['budget']:g}", f"{r['remaining']:.4f}", "[green]verified[/]")
        if not found:
            console.print(f"No ledger entries in {directory}.")
            return
        console.print(table)
        for r in found:
            if str(r["status"]).startswith("TAMPERED"):
                console.print(f"[red]{r['status']}[/]", highlight=False)
        if tampered:
            console.print("[red]A ledger failed verification: the site refuses to train on that data set "
                          "until a person resolves it.[/]")
            raise typer.Exit(3)
