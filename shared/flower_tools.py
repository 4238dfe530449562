"""Finding and starting Flower's executables from the environment fedcare runs in.

Flower processes start their helpers (``flower-superexec``, ``flwr-serverapp``,
``flwr-clientapp``) by bare name, so a SuperLink or SuperNode launched from a virtual
environment that is not on ``PATH`` fails at its first run. Both roles launch through
here.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import Mapping

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
