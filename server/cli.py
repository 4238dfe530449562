"""``fedcare coordinator``: provision a federation, start its SuperLink, admit hospitals, run.

A federation lives in one folder (``--dir``, default ``./federation``): the CA, the
SuperLink's certificate and key, the hospitals' key pairs, the SuperLink's database and
``registered.json`` (which hospital got which SuperNode id). Commands that talk to a
running SuperLink go through a named connection in ``$FLWR_HOME/config.toml``
(``--connection``, default ``fedcare``), which ``start`` writes.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any, Optional

import typer
from rich.table import Table

from ..shared.atomic import write_text_atomic
from ..shared.config import RunConfig, parse_overrides
from ..shared.console import out as console
from ..shared.errors import ConfigError
from ..shared.keys import load_public_key
from . import provision as prov
from . import superlink
from .provision import Layout
from .results import read_csv_rows, refused_note

app = typer.Typer(help="Coordinator side: provision keys, start the SuperLink, admit hospitals, run rounds.",
                  no_args_is_help=True)

DIR_OPTION = typer.Option(Path("federation"), "--dir", help="The federation folder (keys, database).")
CONNECTION_OPTION = typer.Option(superlink.DEFAULT_CONNECTION, "--connection",
                                 help="SuperLink connection name in $FLWR_HOME/config.toml.")
REGISTRY = "registered.json"
#: Seconds between asking the SuperLink whether a followed run has ended.
STATUS_EVERY = 20.0


@app.command("provision")
def provision_cmd(
    host: list[str] = typer.Option([], "--host", help="A host name or IP address hospitals use to reach "
                                   "the coordinator; repeat for several (localhost is always added)."),
    hospital: list[str] = typer.Option([], "--hospital", help="A hospital to make a key pair for; repeat."),
    folder: Path = DIR_OPTION,
    days: int = typer.Option(825, help="Certificate validity in days."),
) -> None:
    """Create the CA, the SuperLink's TLS certificate and one key pair per hospital."""
    layout = Layout(folder)
    if layout.ca_cert.exists() and not layout.server_cert.exists():
        raise ConfigError(f"{folder} holds a CA but no SuperLink certificate: not a folder fedcare made")
    if layout.ca_cert.exists():
        pubs = prov.add_hospitals(folder, hospital)
        console.print(f"Added {len(pubs)} hospital key pair(s) to the existing federation in {folder}.")
    else:
        prov.provision(folder, host, hospital, days=days)
        console.print(f"Federation provisioned in [bold]{folder}[/]:")
        console.print(f"  CA certificate  {layout.ca_cert}  (give to every hospital)")
        console.print(f"  SuperLink       {layout.server_cert}, {layout.server_key} (stays here)")
        console.print(f"  CA key          {layout.ca_key} (stays here; offline if you can)")
    for name in hospital:
        console.print(f"  hospital {name}: {layout.hospital_key(name)} (send to {name} only), "
                      f"{layout.hospital_pub(name)} (register it)")


@app.command("start")
def start(
    folder: Path = DIR_OPTION,
    host: str = typer.Option("127.0.0.1", help="Address to bind. Hospitals on other machines need "
                             "0.0.0.0 (or the public interface); see deploy/README.md first."),
    port: int = typer.Option(superlink.DEFAULT_PORT, help="HTTPS port (Fleet, Control and runtime APIs)."),
    database: Optional[Path] = typer.Option(None, help="State database (default: DIR/superlink.db)."),
    connection: str = CONNECTION_OPTION,
    log_file: Optional[Path] = typer.Option(None, help="Also write the SuperLink's log to this file."),
) -> None:
    """Run the SuperLink in the foreground: TLS, SuperNode authentication, state kept in a file."""
    layout = Layout(folder)
    cmd = superlink.superlink_command(layout, host=host, port=port, database=database, log_file=log_file)
    local = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    config = superlink.write_connection(connection, f"{local}:{port}", layout.ca_cert)
    console.print(f"SuperLink connection '{connection}' -> {local}:{port} written to {config}")
    if host not in ("127.0.0.1", "localhost", "::1"):
        console.print("[yellow]warning:[/] in flwr 1.41 the Control API (register hospitals, start runs) "
                      f"shares this port and has no account authentication: expose {host}:{port} to hospitals "
                      "only through a proxy that forwards /v1/fleet/ (deploy/README.md).")
    os.execve(cmd[0], cmd, superlink.process_env())


@app.command("register")
def register(
    key: Path = typer.Argument(..., help="The hospital's public key (OpenSSH, EC P-384)."),
    name: str = typer.Option("", help="Hospital name (default: the key file's name)."),
    folder: Path = DIR_OPTION,
    connection: str = CONNECTION_OPTION,
) -> None:
    """Admit a hospital: only SuperNodes holding a registered key may connect."""
    load_public_key(key)
    name = name or key.name.removesuffix(".pub")
    registry = _read_registry(folder)
    if name in registry:
        raise ConfigError(f"a hospital named '{name}' is already registered (node {registry[name]['node_id']}); "
                          "unregister it first")
    node_id = superlink.register(key, connection, name)
    registry[name] = {"node_id": node_id, "public_key": key.read_text().split()[1]}
    _write_registry(folder, registry)
    console.print(f"[green]registered[/] {name}: SuperNode id {node_id}")


@app.command("unregister")
def unregister(
    hospital: str = typer.Argument(..., help="Hospital name, its public key file, or a SuperNode id."),
    folder: Path = DIR_OPTION,
    connection: str = CONNECTION_OPTION,
) -> None:
    """Remove a hospital: its SuperNode is refused from now on."""
    registry = _read_registry(folder)
    name, node_id = _resolve(hospital, registry)
    superlink.unregister(node_id, connection)
    if name is not None:
        registry.pop(name)
        _write_registry(folder, registry)
    console.print(f"[green]unregistered[/] {name or ''} (SuperNode id {node_id})")


@app.command("hospitals")
def hospitals(folder: Path = DIR_OPTION, connection: str = CONNECTION_OPTION) -> None:
    """Registered hospitals and whether their SuperNode is online."""
    names = {v["node_id"]: k for k, v in _read_registry(folder).items()}
    table = Table("hospital", "node id", "status", "online since")
    for node in superlink.list_nodes(connection):
        node_id = int(node["node-id"])
        table.add_row(names.get(node_id, "?"), str(node_id), str(node.get("status", "")),
                      str(node.get("online-at", "")))
    console.print(table)


@app.command("run")
def run(
    task: str = typer.Option("diagnosis", help="Registered task."),
    rounds: int = typer.Option(..., "--rounds", help="Federated rounds."),
    min_sites: Optional[int] = typer.Option(None, help="Sites that must take part (and reply) per round."),
    round_timeout: Optional[float] = typer.Option(None, help="Seconds to wait for replies in a round."),
    out: Optional[Path] = typer.Option(None, help="Run folder on the SuperLink's machine "
                                       "(default: runs/<task>-<time> here)."),
    overrides: list[str] = typer.Option([], "--set", help="Any run-config KEY=VALUE; repeatable."),
    connection: str = CONNECTION_OPTION,
    poll: float = typer.Option(2.0, help="Seconds between progress checks."),
) -> None:
    """Start a run on the federation through ``flwr run`` and follow it to its run folder."""
    values: dict[str, Any] = parse_overrides(overrides)
    values.update({"task": task, "num-rounds": rounds})
    if min_sites is not None:
        values["min-sites"] = min_sites
    if round_timeout is not None:
        values["round-timeout"] = round_timeout
    out = out or Path("runs") / f"{task}-{datetime.now():%Y%m%d-%H%M%S}"
    out = out.expanduser().resolve()
    if out.exists() or out.with_name(out.name + ".partial").exists():
        raise ConfigError(f"run folder {out} (or its .partial) already exists")
    values["out-dir"] = str(out)
    run_config = superlink.run_config_arg(values)
    cfg = RunConfig.from_mapping(values)

    with tempfile.TemporaryDirectory(prefix="fedcare-app-") as app_dir:
        superlink.write_app(Path(app_dir))
        answer = superlink.flwr_json("run", app_dir, connection, "--run-config", run_config)
    run_id = int(answer["run-id"])
    console.print(f"run {run_id} started on '{connection}': {task}, {rounds} round(s); results -> {out}")
    try:
        status = _follow(connection, run_id, out, cfg, poll)
    except KeyboardInterrupt:
        superlink.flwr_json("stop", str(run_id), connection)
        console.print(f"run {run_id} stopped")
        raise typer.Exit(130)
    summary = out / "summary.json"
    if status.get("status") != "finished:completed" or not summary.exists():
        detail = status.get("status-details") or status.get("status")
        raise ConfigError(f"run {run_id} did not complete: {detail}; see the SuperLink's log")
    _print_summary(json.loads(summary.read_text()))
    console.print(f"[green]done[/]: {out}")


def _follow(connection: str, run_id: int, out: Path, cfg: RunConfig, poll: float) -> dict[str, Any]:
    """Print each finished round until the run ends; return the SuperLink's last word on it.

    Progress comes from the run folder (the ServerApp writes ``rounds.csv`` as it goes; it
    is renamed from ``.partial`` when the run completes). The SuperLink is asked only
    every ``STATUS_EVERY`` seconds: each ask is a ``flwr`` process, and on a busy
    coordinator that costs more than the rounds' own bookkeeping.
    """
    partial = out.with_name(out.name + ".partial")
    shown, last_check = 0, time.monotonic()
    while True:
        done = out.exists()
        rows = read_csv_rows((out if done else partial) / "rounds.csv")
        for row in rows[shown:]:
            console.print(_round_line(row, cfg))
        shown = max(shown, len(rows))
        if done:
            return {"status": "finished:completed"}
        if time.monotonic() - last_check >= STATUS_EVERY:
            last_check = time.monotonic()
            status = superlink.run_status(connection, run_id)
            if str(status.get("status", "")).startswith("finished") and not out.exists():
                return status
        time.sleep(poll)


def _round_line(row: dict[str, str], cfg: RunConfig) -> str:
    metric = next((k for k in ("accuracy", "roc_auc", "loss") if row.get(k)), None)
    text = f"round {row.get('round')}/{cfg.num_rounds}: {row.get('sites_evaluated')} site(s) evaluated"
    if metric:
        text += f", {metric} {float(row[metric]):.4f}"
    if row.get("max_epsilon"):
        text += f", max ε {float(row['max_epsilon']):.3f}"
    return text


def _print_summary(summary: dict[str, Any]) -> None:
    metric = summary.get("main_metric", "accuracy")
    table = Table("site", metric, "test records", "ε spent", "missed rounds")
    for name, site in summary.get("sites", {}).items():
        value = site.get(metric)
        eps = site.get("epsilon")
        table.add_row(name, "" if value is None else f"{value:.4f}", str(site.get("num_examples", "")),
                      "no DP" if eps is None else f"{eps:.3f}", ",".join(map(str, site.get("missed_rounds", []))))
    console.print(table)
    if summary.get("missing_sites"):
        console.print(f"[yellow]missing at the end:[/] {', '.join(summary['missing_sites'])}")
    note = refused_note(summary)
    if note:
        console.print(note, style="yellow", markup=False)


def _read_registry(folder: Path) -> dict[str, Any]:
    path = Path(folder) / REGISTRY
    return json.loads(path.read_text()) if path.exists() else {}


def _write_registry(folder: Path, registry: dict[str, Any]) -> None:
    Path(folder).mkdir(parents=True, exist_ok=True)
    write_text_atomic(Path(folder) / REGISTRY, json.dumps(registry, indent=2, sort_keys=True) + "\n")


def _resolve(hospital: str, registry: dict[str, Any]) -> tuple[str | None, int]:
    """(registry name or None, SuperNode id) for a name, a public key file or an id."""
    if hospital in registry:
        return hospital, int(registry[hospital]["node_id"])
    path = Path(hospital)
    if path.is_file():
        load_public_key(path)
        blob = path.read_text().split()[1]
        for name, entry in registry.items():
            if entry.get("public_key") == blob:
                return name, int(entry["node_id"])
        raise ConfigError(f"{path} was not registered through 'fedcare coordinator register' here; "
                          "give its SuperNode id instead ('flwr supernode list')")
    if hospital.isdigit():
        node_id = int(hospital)
        name = next((k for k, v in registry.items() if int(v["node_id"]) == node_id), None)
        return name, node_id
    raise ConfigError(f"'{hospital}' is not a registered hospital name, a public key file or a SuperNode id")

