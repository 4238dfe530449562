"""``flwr run`` of the repository's own Flower app on Flower's simulation engine.

The app folder is a copy of the repository's ``pyproject.toml`` (its components point at
the installed fedcare package), so nothing the run does can touch the checkout. The local
simulation SuperLink is started here with the command ``flwr run`` itself would use, on
free ports and with no startup deadline (flwr allows it 15 s, too little on a busy CI
machine); ``flwr run`` finds it and submits to it, and the test stops it afterwards,
with every helper it started.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: flwr's own dependency
    import tomli as tomllib

from .deploy_support import BIN, Processes, free_port, wait_until

REPO = Path(__file__).resolve().parents[1]


def _healthy(port: int) -> bool:
    import httpx

    try:
        return httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).is_success
    except httpx.HTTPError:
        return False


@pytest.mark.deploy
@pytest.mark.timeout(420)
def test_flwr_run_on_the_simulation_engine(tmp_path):
    app = tmp_path / "app"
    app.mkdir()
    shutil.copy(REPO / "pyproject.toml", app / "pyproject.toml")
    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["flwr"]
    assert declared["app"]["components"] == {"serverapp": "fedcare.server.app:app",
                                             "clientapp": "fedcare.client.app:app"}

    procs = Processes(tmp_path)
    http_port, control_port = free_port(), free_port()
    procs.env.update({"FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(http_port),
                      "FLWR_LOCAL_CONTROL_API_PORT": str(control_port),
                      "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
                      "FLWR_DISABLE_UPDATE_CHECK": "1", "RAY_DISABLE_USAGE_STATS": "1"})
    out = tmp_path / "runs" / "flwr-run"
    try:
        local = procs.flwr_home / "local-superlink"
        local.mkdir(parents=True)
        link = procs.start("local-superlink", [
            str(BIN / "flower-superlink"), "--insecure", "--simulation", "--isolation", "subprocess",
            "--control-api-address", f"127.0.0.1:{control_port}", "--host", "127.0.0.1", "--port", str(http_port),
            "--database", str(local / "state.db")])
        wait_until(lambda: link.poll() is not None or _healthy(http_port), 120, "the local SuperLink")
        assert link.poll() is None, procs.log(link)

        done = procs.run([str(BIN / "flwr"), "run", str(app), "--stream", "--federation-config",
                          "num-supernodes=4", "--run-config",
                          f'num-rounds=1 min-sites=4 out-dir="{out}"'], timeout=360)
        assert done.returncode == 0, done.stdout + done.stderr
    finally:
        procs.stop_all()
    assert procs.leftovers() == []

    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds"] == 1
    assert len(summary["sites"]) == 4 and summary["missing_sites"] == []
    assert all(site["evaluated_round"] == 1 for site in summary["sites"].values())
    assert (out / "model.pt").exists() and (out / "metrics.csv").exists()
