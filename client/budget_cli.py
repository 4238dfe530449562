"""``fedcare hospital budget``: spent and remaining privacy budget per data set, from the ledger."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from ..shared.atomic import write_text_atomic
from ..shared.console import err
from ..shared.console import out as console
from ..shared.errors import DataError
from . import ledger as ledger_mod


def rows(items: list[ledger_mod.Chain | ledger_mod.LedgerTampered], delta: float | None = None,
         problems: dict[str, ledger_mod.LedgerTampered] | None = None) -> list[dict[str, object]]:
    """One row per data set of ``Ledger.chains()``: runs, rounds, spent ε at δ, budget,
    remaining, verification (with ``problems`` against an anchor: a chain rewritten since,
    or gone with its head, is tampered)."""
    problems = problems or {}
    out: list[dict[str, object]] = []
    for item in items:
        if isinstance(item, ledger_mod.Chain):
            item = problems.get(item.key, item)
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
    seen = {item.key for item in items}
    for key, problem in problems.items():  # anchored, and gone with its head too
        if key not in seen:
            out.append({"dataset": problem.label or key, "status": f"TAMPERED: {problem}"})
    return out


def write_anchor(items: list[ledger_mod.Chain | ledger_mod.LedgerTampered], path: Path) -> dict[str, object]:
    """Write the anchor of ``Ledger.chains()`` to ``path`` (atomically); refuse, writing
    nothing, while any chain fails verification: an anchor must not bless a tampered one."""
    bad = [c for c in items if isinstance(c, ledger_mod.LedgerTampered)]
    if bad:
        raise ledger_mod.LedgerTampered(f"no anchor written: {bad[0].label or '?'}: {bad[0]}")
    doc = ledger_mod.anchor([c for c in items if isinstance(c, ledger_mod.Chain)])
    write_text_atomic(path, json.dumps(doc, indent=1, sort_keys=True) + "\n")
    return doc


def register(app: typer.Typer) -> None:
    @app.command("budget")
    def budget(
        ledger: Optional[Path] = typer.Option(None, help="Ledger directory (default: $FEDCARE_HOME/ledger "
                                              "or ~/.fedcare/ledger)."),
        delta: Optional[float] = typer.Option(None, help="Report ε at this δ (default: the last run's δ)."),
        anchor: Optional[Path] = typer.Option(None, help="Also check the ledger against this anchor (written "
                                              "earlier with --write-anchor and kept off this machine)."),
        write_anchor_to: Optional[Path] = typer.Option(None, "--write-anchor", help="Write an anchor of the "
                                                       "verified ledger (entry counts and hashes) to this file."),
    ) -> None:
        """Privacy budget spent and remaining per data set, across every run (exit 3 if tampered)."""
        directory = ledger or ledger_mod.default_directory()
        try:
            anchored = ledger_mod.read_anchor(anchor) if anchor else None
            if write_anchor_to is not None and not write_anchor_to.parent.is_dir():
                raise DataError("the anchor's folder does not exist", path=str(write_anchor_to))
        except DataError as exc:
            err.print(f"[bold red]error:[/] {exc}", highlight=False)
            raise typer.Exit(2)
        table = Table("data set", "runs", "rounds", "ε spent", "δ", "ε budget", "ε left", "ledger",
                      title=f"Privacy ledger {directory}")
        table.columns[0].overflow = "fold"
        for column in table.columns[1:]:
            column.no_wrap = True  # numbers stay whole; only the data-set name folds
        items = ledger_mod.Ledger(directory).chains()
        problems = ledger_mod.anchor_problems(items, anchored) if anchored else {}
        found = rows(items, delta, problems)
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
        else:
            console.print(table)
        for r in found:
            if str(r["status"]).startswith("TAMPERED"):
                console.print(f"[red]{r['status']}[/]", highlight=False)
        if tampered:
            console.print("[red]A ledger failed verification: the site refuses to train on that data set "
                          "until a person resolves it.[/]")
            raise typer.Exit(3)
        if anchored is not None:
            console.print(f"Every data set of the anchor {anchor} still holds the entries it saw.")
        if write_anchor_to is not None:
            doc = write_anchor(items, write_anchor_to)
            console.print(f"Anchor written to {write_anchor_to}: keep it (or these lines) off this machine.")
            for head in sorted(doc["heads"].values(), key=lambda h: h["label"]):  # type: ignore[union-attr]
                console.print(f"  {head['label']}: entries={head['count']} last={head['hash']}", highlight=False)
