"""``fedcare audit RUN_DIR``: membership-inference audit of a finished run (``audit``)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from ..shared.console import out as console


def register(app: typer.Typer) -> None:
    @app.command("audit")
    def audit_cmd(
        run_dir: Path = typer.Argument(..., help="A finished run folder."),
        data: list[Path] = typer.Option([], "--data", help="The run's hospital files, if it used --data "
                                        "(in the same order); builtin sites are rebuilt from config.json."),
    ) -> None:
        """Attack the final model's membership privacy per site; writes audit.json beside ε."""
        from .audit import audit

        payload = audit(run_dir, data)
        table = Table("site", "ε", "δ", "members", "non-members", "attack AUC", "advantage", "calibrated AUC",
                      title="Loss-threshold membership inference")
        for name, r in payload["sites"].items():
            eps = r["epsilon"]
            table.add_row(name, "∞ (no DP)" if eps is None else f"{eps:.3f}",
                          "" if r["delta"] is None else f"{r['delta']:g}", str(r["members"]),
                          str(r["non_members"]), f"{r['mia_auc']:.3f}", f"{r['mia_advantage']:.3f}",
                          f"{r['mia_auc_calibrated']:.3f}" if "mia_auc_calibrated" in r else "n/a")
        console.print(table)
        console.print(f"wrote {Path(run_dir) / 'audit.json'} (and mia_auc into summary.json)")
