"""Real Flower processes for the deployment tests: start them, wait on them, stop them all.

Every process runs in its own session with ``FLWR_HOME`` and ``FEDCARE_HOME`` inside the
test's temporary folder. Flower starts helpers in sessions of their own
(``flower-superexec``, ``flwr-serverapp``, ``flwr-clientapp``), so stopping the process
groups we started is not enough: ``Processes.stop_all`` also ends every process whose
environment carries this test's ``FLWR_HOME``, which they all inherit.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(check: Callable[[], object], timeout: float, what: str, every: float = 1.0) -> object:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(every)


class Processes:
    """The processes one test module started, and their environment."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.flwr_home = root / "flwr-home"
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        self.env = dict(os.environ)
        self.env.update({"FLWR_HOME": str(self.flwr_home), "FEDCARE_HOME": str(root / "fedcare-home"),
                         "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "PYTHONUNBUFFERED": "1",
                         "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"})
        self.started: list[subprocess.Popen] = []

    def start(self, name: str, cmd: list[str]) -> subprocess.Popen:
        log = (self.root / f"{name}.log").open("ab")
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=self.root,
                                start_new_session=True)
        log.close()
        proc.log_path = self.root / f"{name}.log"  # type: ignore[attr-defined]
        self.started.append(proc)
        return proc

    def run(self, cmd: list[str], timeout: float) -> subprocess.CompletedProcess:
        return subprocess.run(cmd, capture_output=True, text=True, env=self.env, cwd=self.root, timeout=timeout)

    def log(self, proc: subprocess.Popen) -> str:
        return proc.log_path.read_text(errors="replace")  # type: ignore[attr-defined]

    @staticmethod
    def signal_group(proc: subprocess.Popen, sig: int) -> None:
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass

    def stop(self, proc: subprocess.Popen, grace: float = 10.0) -> None:
        """SIGTERM the group (a SuperNode then leaves the federation), SIGKILL what stays."""
        self.signal_group(proc, signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            self.signal_group(proc, signal.SIGKILL)
            proc.wait(timeout=10)

    def stop_all(self) -> None:
        for proc in self.started:
            if proc.poll() is None:
                self.signal_group(proc, signal.SIGTERM)
        deadline = time.monotonic() + 10
        for proc in self.started:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for proc in self.started:
            if proc.poll() is None:
                self.signal_group(proc, signal.SIGKILL)
                proc.wait(timeout=10)
        self._sweep()

    def _sweep(self) -> None:
        """End every process, ours or Flower's detached helpers, that carries our FLWR_HOME."""
        marker = f"FLWR_HOME={self.flwr_home}".encode()
        for _ in range(3):
            found = []
            for entry in Path("/proc").iterdir():
                if not entry.name.isdigit() or int(entry.name) == os.getpid():
                    continue
                try:
                    if marker in (entry / "environ").read_bytes().split(b"\0"):
                        found.append(int(entry.name))
                except (OSError, PermissionError):
                    continue
            if not found:
                return
            for pid in found:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.5)

    def leftovers(self) -> list[int]:
        marker = f"FLWR_HOME={self.flwr_home}".encode()
        out = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit() and int(entry.name) != os.getpid():
                try:
                    status = (entry / "stat").read_text().split()[2]
                    if status != "Z" and marker in (entry / "environ").read_bytes().split(b"\0"):
                        out.append(int(entry.name))
                except (OSError, PermissionError, IndexError):
                    continue
        return out

    def flwr_json(self, *args: str, timeout: float = 60) -> dict:
        proc = self.run([str(BIN / "flwr"), *args, "--format", "json"], timeout=timeout)
        text = proc.stdout
        start = text.rfind("\n{") + 1 if "\n{" in text else text.find("{")
        try:
            return json.loads(text[start:])
        except (json.JSONDecodeError, ValueError):
            return {"success": False, "error-message": proc.stdout + proc.stderr}
