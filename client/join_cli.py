"""``fedcare hospital join`` and ``keygen``: a hospital joins a federation.

``join`` refuses before anything connects when the data fails the task's schema, the
budget is not a budget, or a key or certificate is unusable; then it becomes the
SuperNode process (exec), so signals and exit codes are Flower's own.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import typer

from ..shared.config import SiteConfig, parse_epsilon
from ..shared.console import err as console
from ..shared.errors import DataError
from ..shared.flower_tools import process_env
from ..shared.keys import generate_hospital_key
from ..shared.registry import get_task
from . import ledger as ledger_mod
from . import supernode



def register(app: typer.Typer) -> None:
    app.command("join")(join)
    app.command("keygen")(keygen)


def join(
    coordinator: str = typer.Option(..., help="The coordinator's SuperLink as HOST:PORT."),
    ca: Path = typer.Option(..., help="The federation's CA certificate (ca.pem) from the coordinator."),
    key: Path = typer.Option(..., help="This hospital's private key (OpenSSH, EC P-384)."),
    data: Path = typer.Option(..., help="This hospital's data file or folder."),
    epsilon: str = typer.Option(..., help="Privacy budget ε this hospital allows ('inf' = no DP)."),
    delta: float = typer.Option(..., help="Privacy budget δ."),
    task: str = typer.Option("diagnosis", help="Task whose schema the data must follow."),
    dataset: str = typer.Option("", help="Declared schema within the task (default: the task's default)."),
    site: str = typer.Option("", help="Name shown to the coordinator (default: the data file's name)."),
    ledger: str = typer.Option("", help="Privacy ledger folder (default ~/.fedcare/ledger; 'off' to keep none)."),
    strict: bool = typer.Option(False, help="Refuse the data if any record is unreadable."),
    max_noise: float = typer.Option(SiteConfig.max_noise, "--max-noise", help="Most noise multiplier accepted: "
                                    "a run that would need more to fit the remaining budget is refused."),
    min_records: int = typer.Option(SiteConfig.min_records, "--min-records", help="Fewest records this "
                                    "hospital shares sums or metrics over."),
    split_seed: int = typer.Option(SiteConfig.split_seed, "--split-seed", help="Seed of this hospital's own "
                                   "train/test split: the same records train in every run, whatever seed a "
                                   "coordinator sets."),
    val_fraction: Optional[float] = typer.Option(None, "--val-fraction", help="This hospital's own validation "
                                                 "share, used whenever a run asks for validation, whatever "
                                                 "share the coordinator sets (default: the run's)."),
    port: int = typer.Option(supernode.DEFAULT_RUNTIME_PORT, help="Local port of the SuperNode's runtime API "
                             "(distinct per SuperNode on one machine)."),
    trusted_entities: Optional[Path] = typer.Option(None, help="YAML of trusted app publishers' Ed25519 keys: "
                                                    "only apps they signed on Flower Hub will run."),
    max_wait: Optional[float] = typer.Option(None, help="Give up connecting after this many seconds."),
    anchor: Optional[Path] = typer.Option(None, help="Refuse to join if the privacy ledger was rewritten since "
                                          "this anchor ('fedcare hospital budget --write-anchor')."),
) -> None:
    """Check the data, then run this hospital's SuperNode (TLS, its own key, its own budget)."""
    t = get_task(task)
    dataset = dataset or t.defaults["dataset"]
    try:
        report = t.check_file(data, dataset)
        t.read_file(data, dataset, strict=strict)
    except DataError as exc:
        console.print(f"[red]refused:[/] {exc}")
        raise typer.Exit(2)
    if not report.ok:
        for problem in report.problems:
            console.print(f"[red]problem:[/] {problem}")
        console.print(f"[red]refused:[/] {data} does not fit the {task}/{dataset} schema "
                      f"(see 'fedcare hospital check --task {task} --data {data}')")
        raise typer.Exit(2)

    eps = parse_epsilon(epsilon)
    cfg = SiteConfig.from_mapping({"data": str(data.expanduser().resolve()), "site": site or data.stem,
                                   "epsilon": eps, "delta": delta, "ledger": ledger, "strict": strict,
                                   "max-noise": max_noise, "min-records": min_records,
                                   "split-seed": split_seed, "val-fraction": val_fraction})
    if anchor is not None:
        _check_anchor(anchor, cfg)
    supernode.check_ca(ca)
    supernode.check_private_key(key)
    if trusted_entities is not None:
        supernode.check_trusted_entities(trusted_entities)
    cmd = supernode.supernode_command(superlink=coordinator, ca=ca, key=key, site=cfg, port=port,
                                      trusted_entities=trusted_entities, max_wait=max_wait)
    budget = "no DP" if not cfg.private else f"ε={cfg.epsilon:g}, δ={cfg.delta:g}"
    console.print(f"{report.rows} record(s) OK for {task}/{dataset}; joining {coordinator} as "
                  f"'{cfg.site}' ({budget})")
    os.execve(cmd[0], cmd, process_env())


def _check_anchor(path: Path, cfg: SiteConfig) -> None:
    """Exit 2 for an unusable anchor or no ledger to check; exit 3 if the ledger lost or
    changed an entry the anchor saw (a rewrite that the ledger's own heads cannot show)."""
    directory = ledger_mod.directory_for(cfg)
    try:
        heads = ledger_mod.read_anchor(path)
        if directory is None:
            raise DataError("an anchor needs a privacy ledger to check (not --ledger off)", path=str(path))
    except DataError as exc:
        console.print(f"[red]refused:[/] {exc}")
        raise typer.Exit(2)
    problems = ledger_mod.anchor_problems(ledger_mod.Ledger(directory).chains(), heads)
    for problem in problems.values():
        console.print(f"[red]refused:[/] privacy ledger {directory}: {problem}", highlight=False)
    if problems:
        raise typer.Exit(3)


def keygen(
    out: Path = typer.Argument(..., help="Private key file to create (the public key goes beside it as .pub)."),
    name: str = typer.Option("", help="Comment in the public key (e.g. the hospital's name)."),
) -> None:
    """Make this hospital's key pair here; send only the .pub file to the coordinator."""
    pub = generate_hospital_key(out, comment=name)
    console.print(f"private key {out} (mode 600, never leaves this machine); public key {pub}")
