"""Finding and starting Flower's executables from the environment fedcare runs in.

Flower processes start their helpers (``flower-superexec``, ``flwr-serverapp``,
``flwr-clientapp``) by bare name, so a SuperLink or SuperNode launched from a virtual
environment that is not on ``PATH`` fails at its first run. Both roles launch through
here.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from .errors import ConfigError


def tool(name: str) -> str:
    """A Flower executable from the same environment as this Python, else from PATH."""
    local = Path(sys.executable).parent / name
    if local.exists():
        return str(local)
    found = shutil.which(name)
    if found is None:
        raise ConfigError(f"'{name}' not found: install flwr 1.41 in this environment")
    return found


def process_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This environment, with its bin folder first on PATH."""
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.update(extra or {})
    return env


def toml_value(value: object) -> str:
    """A Python scalar as a TOML value (pyproject tables, ``--run-config``, ``--node-config``)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)  # inf and nan included: TOML spells them the same
    return json.dumps(str(value))


def config_arg(pairs: Iterable[tuple[str, object]], what: str) -> str:
    """``KEY=VALUE ...`` for flwr's ``--run-config`` / ``--node-config``.

    flwr splits these on quotes without escapes, so strings go as TOML literal strings
    and a value holding both quote kinds cannot be passed at all.
    """
    parts = []
    for key, value in pairs:
        if not isinstance(value, str):
            parts.append(f"{key}={toml_value(value)}")
        elif "'" not in value:
            parts.append(f"{key}='{value}'")
        elif '"' not in value and "\\" not in value:
            parts.append(f'{key}="{value}"')
        else:
            raise ConfigError(f"{what} '{key}': a value with both quote kinds cannot be passed to flwr")
    return " ".join(parts)


def write_app_pyproject(folder: Path, *, name: str, version: str, config: Mapping[str, object],
                        project: Sequence[str] = (), preamble: Sequence[str] = ()) -> Path:
    """A Flower app's ``pyproject.toml``: fedcare's ServerApp and ClientApp and ``config``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lines = [*preamble, "[project]", f'name = "{name}"', f'version = "{version}"', *project, "",
             "[tool.flwr.app]", 'publisher = "fedcare"', "",
             "[tool.flwr.app.components]",
             'serverapp = "fedcare.server.app:app"', 'clientapp = "fedcare.client.app:app"', "",
             "[tool.flwr.app.config]"]
    lines += [f"{key} = {toml_value(value)}" for key, value in config.items()]
    path = folder / "pyproject.toml"
    path.write_text("\n".join(lines) + "\n")
    return path
