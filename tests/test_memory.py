"""The training process' heap reuse (client/memory.py): on where it can be, off on request."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

PROBE = "from fedcare.client.memory import keep_freed_memory as k; print(k(), k())"


def _probe(**env: str) -> str:
    base = {k: v for k, v in os.environ.items() if k != "FEDCARE_MALLOC"}
    out = subprocess.run([sys.executable, "-c", PROBE], env={**base, **env}, capture_output=True,
                         text=True, check=True)
    return out.stdout.strip()


@pytest.mark.skipif(sys.platform != "linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_heap_reuse_is_applied_once_on_glibc():
    assert _probe() == "True True"


def test_heap_reuse_can_be_turned_off():
    assert _probe(FEDCARE_MALLOC="system") == "False False"
