"""The coordinator's Flower processes and commands: SuperLink, ``flwr`` CLI, the app.

fedcare does not reimplement Flower's deployment runtime; it builds the right command
lines and keeps their settings in one place:

* ``superlink_command``: ``flower-superlink`` with TLS, SuperNode authentication, a
  database file (registrations survive a restart) and no per-run ``uv sync`` (the apps
  import the installed fedcare package).
* ``write_connection``: a ``[superlink.NAME]`` entry in ``$FLWR_HOME/config.toml``, the
  place flwr 1.41 reads SuperLink addresses and CA certificates from, so ``flwr ls NAME``
  and ``flwr supernode list NAME`` work beside fedcare's own commands.
* ``flwr_json``: one ``flwr`` CLI call with ``--format json``, its answer parsed.
* ``write_app``: a one-file Flower app (``pyproject.toml`` naming fedcare's ServerApp and
  ClientApp, run-config defaults taken from ``RunConfig``) for ``flwr run``. Running the
  repository itself would also work, but flwr 1.41 then rewrites the repository's
  ``pyproject.toml`` (it comments out a legacy ``[tool.flwr.federations]`` table) and
  packs every file of the checkout into the app bundle.

In flwr 1.41 the SuperLink's Fleet API (what hospitals use), Control API (register,
start runs) and ServerApp runtime API share one HTTPS port, and the open-source Control
API has no account authentication. Hence the default bind address is loopback; expose
the port to hospitals only through something that forwards ``/v1/fleet/`` alone (see
deploy/README.md).
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any, Mapping

from ..shared.config import RunConfig
from ..shared.errors import ConfigError
from ..shared.flower_tools import config_arg, process_env, tool, write_app_pyproject
from .provision import Layout

#: flwr's own default port for the SuperLink's combined HTTPS API.
DEFAULT_PORT = 8000
DEFAULT_CONNECTION = "fedcare"


def _app_version() -> str:
    """The installed fedcare's version names the app bundle (flwr ls shows it)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("fedcare")
    except PackageNotFoundError:
        return "0.0.0"


def superlink_command(layout: Layout, *, host: str = "127.0.0.1", port: int = DEFAULT_PORT,
                      database: Path | None = None, log_file: Path | None = None) -> list[str]:
    """``flower-superlink`` with TLS and SuperNode authentication on."""
    for path in (layout.ca_cert, layout.server_cert, layout.server_key):
        if not path.is_file():
            raise ConfigError(f"{path} not found: run 'fedcare coordinator provision' first")
    database = Path(database) if database else layout.root / "superlink.db"
    cmd = [tool("flower-superlink"),
           "--ssl-ca-certfile", str(layout.ca_cert.resolve()),
           "--ssl-certfile", str(layout.server_cert.resolve()),
           "--ssl-keyfile", str(layout.server_key.resolve()),
           "--enable-supernode-auth",
           "--database", str(database.resolve()),
           "--disable-runtime-dependency-installation",
           "--host", host, "--port", str(port)]
    if log_file is not None:
        cmd += ["--log-file", str(Path(log_file).resolve())]
    return cmd


def flwr_home() -> Path:
    return Path(os.environ.get("FLWR_HOME") or Path.home() / ".flwr")


def write_connection(name: str, address: str, ca_cert: Path) -> Path:
    """Add or replace ``[superlink.NAME]`` in ``$FLWR_HOME/config.toml``; other entries stay."""
    from flwr.cli.flower_config import init_flwr_config, write_superlink_connection
    from flwr.cli.typing import SuperLinkConnection

    if not Path(ca_cert).is_file():
        raise ConfigError(f"CA certificate not found: {ca_cert}")
    _check_address(address)
    init_flwr_config()
    write_superlink_connection(SuperLinkConnection(
        name=name, address=address, root_certificates=str(Path(ca_cert).resolve())))
    return flwr_home() / "config.toml"


def _check_address(address: str) -> None:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"address must be HOST:PORT, got {address!r}")


def flwr_json(*args: str, timeout: float = 120) -> dict[str, Any]:
    """Run ``flwr ARGS --format json`` and return its answer (errors raise ConfigError)."""
    cmd = [tool("flwr"), *args, "--format", "json"]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=process_env())
    except subprocess.TimeoutExpired:
        raise ConfigError(f"'flwr {' '.join(args)}' did not answer within {timeout:g} s") from None
    answer = _last_json(proc.stdout)
    if answer is None or not answer.get("success", False):
        why = (answer or {}).get("error-message") or (proc.stderr or proc.stdout).strip()[-2000:]
        raise ConfigError(f"'flwr {' '.join(args)}' failed: {why}")
    return answer


def _last_json(text: str) -> dict[str, Any] | None:
    """flwr may print notices before its JSON answer: parse from the last line opening a
    ``{`` (its answer is pretty-printed), else from the first ``{``."""
    last = text.rfind("\n{")
    for begin in ([last + 1] if last >= 0 else []) + [text.find("{")]:
        if begin < 0:
            continue
        try:
            return json.loads(text[begin:])
        except json.JSONDecodeError:
            continue
    return None


def register(public_key: Path, connection: str, name: str = "") -> int:
    """Admit a hospital: register its public key; returns its SuperNode id."""
    args = ["supernode", "register", str(Path(public_key).resolve()), connection]
    if name:
        args += ["--name", name]
    return int(flwr_json(*args)["node-id"])


def unregister(node_id: int, connection: str) -> None:
    flwr_json("supernode", "unregister", str(node_id), connection)


def list_nodes(connection: str) -> list[dict[str, Any]]:
    return list(flwr_json("supernode", "list", connection).get("nodes", []))


def run_status(connection: str, run_id: int) -> dict[str, Any]:
    runs = flwr_json("ls", connection, "--run-id", str(run_id)).get("runs", [])
    if not runs:
        raise ConfigError(f"run {run_id} not found on SuperLink connection '{connection}'")
    return runs[0]


def write_app(folder: Path) -> Path:
    """The Flower app ``flwr run`` ships: fedcare's components and run-config defaults."""
    return write_app_pyproject(
        folder, name="fedcare", version=_app_version(), config=RunConfig().to_mapping(),
        preamble=["[build-system]", 'requires = ["hatchling"]', 'build-backend = "hatchling.build"', ""],
        project=['description = "fedcare: privacy-preserving federated learning for hospitals"',
                 'license = "Apache-2.0"',
                 "# The apps import the fedcare package installed on every SuperLink and SuperNode.",
                 "dependencies = []"])


def run_config_arg(values: Mapping[str, Any]) -> str:
    """``--run-config`` text for ``flwr run``: checked against RunConfig first, so a
    typo fails here and not on the SuperLink after the run started."""
    RunConfig.from_mapping(values)
    return config_arg(values.items(), "run-config")
