"""A real federation on loopback: flower-superlink and flower-supernode processes over HTTPS,
TLS with the federation's own CA, hospitals admitted by their registered keys.

Everything goes through fedcare's own commands (``fedcare coordinator ...``,
``fedcare hospital join``) except where a test needs what fedcare refuses to build (a
SuperNode without TLS). One SuperLink serves the whole module; each test starts the
hospitals it needs and stops them. Every wait is bounded; ``Processes.stop_all`` ends
every process the module started, Flower's detached helpers included.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path
from unittest import mock

import pytest
import torch
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from fedcare.server import superlink
from fedcare.server.cli import register
from fedcare.server.provision import provision
from fedcare.shared.keys import generate_hospital_key

from .deploy_support import BIN, Processes, free_port, wait_until

pytestmark = pytest.mark.deploy

FEDCARE = str(BIN / "fedcare")
BUDGET = 8.0


class Federation:
    def __init__(self, root: Path) -> None:
        from fedcare.shared.tasks.diagnosis import export_heart_csvs

        self.root = root
        self.procs = Processes(root)
        self.port = free_port()
        self.dir = root / "federation"
        self.names = ["a1", "a2", "a3", "a4", "a5", "gone"]
        provision(self.dir, ["coordinator.test"], self.names)
        self.csv = {p.stem: p for p in export_heart_csvs(root / "data")}
        self.superlink: subprocess.Popen | None = None

    def fedcare(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return self.procs.run([FEDCARE, *args], timeout=timeout)

    def start_superlink(self) -> None:
        self.superlink = self.procs.start("superlink", [FEDCARE, "coordinator", "start", "--dir", str(self.dir),
                                                        "--port", str(self.port)])
        wait_until(lambda: self.superlink.poll() is not None or self.procs.flwr_json(
            "supernode", "list", "fedcare").get("success"), 90, "the SuperLink to answer")
        assert self.superlink.poll() is None, self.procs.log(self.superlink)

    def nodes(self) -> dict[int, str]:
        answer = self.procs.flwr_json("supernode", "list", "fedcare")
        assert answer.get("success"), answer
        return {int(n["node-id"]): n["status"] for n in answer["nodes"]}

    def online(self) -> int:
        return sum(status == "online" for status in self.nodes().values())

    def join(self, name: str, key: Path, csv: str, ca: Path | None = None, extra: tuple[str, ...] = ()):
        return self.procs.start(name, [
            FEDCARE, "hospital", "join", "--coordinator", f"127.0.0.1:{self.port}",
            "--ca", str(ca or self.dir / "ca.pem"), "--key", str(key), "--data", str(self.csv[csv]),
            "--epsilon", str(BUDGET), "--delta", "1e-5", "--site", name, "--ledger", str(self.root / f"ledger-{name}"),
            "--port", str(free_port()), *extra])


COMPOSE = Path(__file__).resolve().parents[1] / "deploy" / "compose"


def _interpolate(text: str) -> str:
    """Compose's ${VAR:-default} / ${VAR:?message} with stand-in values."""
    import re

    return re.sub(r"\$\{([A-Z_]+)(?::[-?]([^}]*))?\}",
                  lambda m: {"COORDINATOR": "fl.example.org:8000", "EPSILON": "3", "DELTA": "1e-5"}.get(
                      m.group(1), "/x" if m.group(1) in ("CA", "KEY", "DATA") else (m.group(2) or "v")), text)


def _parse_fedcare(group_app, args: list[str]):
    """Parse a command line with fedcare's own click commands, without running it."""
    import typer

    group = typer.main.get_command(group_app)
    ctx = group.make_context("fedcare", list(args), resilient_parsing=False)
    sub = group.get_command(ctx, args[0])
    assert sub is not None, args[0]
    return sub.make_context(args[0], list(args[1:]))


def test_compose_files_use_flower_images_and_valid_flags(tmp_path):
    import importlib.metadata

    import yaml
    from flwr.superlink.cli.flower_superlink import _parse_args_run_superlink
    from flwr.supernode.cli.flower_supernode import _parse_args_run_supernode

    from fedcare.client import cli as hospital_cli
    from fedcare.client.supernode import supernode_command
    from fedcare.server import cli as coordinator_cli
    from fedcare.shared.config import SiteConfig

    version = importlib.metadata.version("flwr")
    for name, image, group, verb in (("coordinator", "flwr/superlink", coordinator_cli.app, "start"),
                                     ("hospital", "flwr/supernode", hospital_cli.app, "join")):
        compose = yaml.safe_load(_interpolate((COMPOSE / f"{name}.yml").read_text()))
        (service,) = compose["services"].values()
        dockerfile = Path(__file__).resolve().parents[1] / service["build"]["dockerfile"]
        lines = dockerfile.read_text().splitlines()
        assert f"FROM {image}:{version}" in lines, dockerfile
        assert any(line.startswith("ENTRYPOINT") and "fedcare" in line for line in lines)
        assert service["command"][0] == verb
        assert service["environment"]["FLWR_TELEMETRY_ENABLED"] == "0"  # nothing leaves but Flower's own traffic
        ctx = _parse_fedcare(group, service["command"])
        mounts = service["volumes"]
        assert all(m.endswith(":ro") for m in mounts if m.split(":")[0].endswith((".pem", ".key", ".csv"))
                   or "KEY" in m or "CA" in m)
        if name == "coordinator":
            assert ctx.params["host"] == "0.0.0.0" and ctx.params["port"] == 8000
            assert str(ctx.params["database"]).startswith("/app/state")
            assert any(m.endswith("/app/state") for m in mounts)  # registrations survive the container
            assert not any("ca.key" in m or "hospitals" in m for m in mounts)
            assert service["ports"] == ["8000:8000"]
        else:
            assert ctx.params["coordinator"] == "fl.example.org:8000"
            assert ctx.params["epsilon"] == "3" and ctx.params["delta"] == 1e-5
            assert "ports" not in service  # a hospital only connects out

    # What those commands launch: flags flwr 1.41 itself accepts, TLS and authentication on.
    layout = provision(tmp_path / "fed", ["fl.example.org"], ["site"])
    link = _parse_args_run_superlink().parse_args(
        superlink.superlink_command(layout, host="0.0.0.0", port=8000, database=tmp_path / "s.db")[1:])
    assert link.enable_supernode_auth and not link.insecure and link.ssl_certfile and link.ssl_keyfile
    assert link.database and link.runtime_dependency_install is False and link.host == "0.0.0.0"
    site = SiteConfig.from_mapping({"data": "/d/my site.csv", "site": "st-mary", "epsilon": 3.0, "delta": 1e-5})
    node = _parse_args_run_supernode().parse_args(supernode_command(
        superlink="fl.example.org:8000", ca=layout.ca_cert, key=layout.hospital_key("site"), site=site)[1:])
    assert not node.insecure and node.root_certificates and node.auth_supernode_private_key
    from flwr.common.config import parse_config_args

    assert parse_config_args([node.node_config]) == {"data": "/d/my site.csv", "site": "st-mary",
                                                     "epsilon": 3.0, "delta": 1e-5}
    # A hospital's own limits travel with it, and read back as the same SiteConfig.
    strict = SiteConfig.from_mapping({"data": "/d/a.csv", "epsilon": 3.0, "delta": 1e-5, "max-noise": 8.0,
                                      "min-records": 20, "split-seed": 3, "val-fraction": 0.25})
    node = _parse_args_run_supernode().parse_args(supernode_command(
        superlink="fl.example.org:8000", ca=layout.ca_cert, key=layout.hospital_key("site"), site=strict)[1:])
    assert SiteConfig.from_mapping(parse_config_args([node.node_config])) == strict


@pytest.fixture(scope="module")
def fed(tmp_path_factory):
    fed = Federation(tmp_path_factory.mktemp("deploy"))
    try:
        fed.start_superlink()
        first, *others = fed.names
        done = fed.fedcare("coordinator", "register", str(fed.dir / "hospitals" / f"{first}.pub"),
                           "--dir", str(fed.dir))
        assert done.returncode == 0, done.stdout + done.stderr
        with mock.patch.dict(os.environ, fed.procs.env):  # the same command, without a process per key
            for name in others:
                register(fed.dir / "hospitals" / f"{name}.pub", name=name, folder=fed.dir,
                         connection=superlink.DEFAULT_CONNECTION)
        yield fed
    finally:
        fed.procs.stop_all()
        assert fed.procs.leftovers() == []


@pytest.mark.timeout(300)  # includes the module's SuperLink start and registrations
def test_restart_keeps_registered_hospitals(fed):
    before = fed.nodes()
    assert len(before) == len(fed.names) and set(before.values()) == {"registered"}
    fed.procs.stop(fed.superlink)
    fed.start_superlink()
    assert fed.nodes() == before
    listing = fed.fedcare("coordinator", "hospitals", "--dir", str(fed.dir))
    assert listing.returncode == 0 and "a1" in listing.stdout, listing.stdout + listing.stderr


@pytest.mark.timeout(150)
def test_strangers_are_refused(fed):
    """Unregistered or removed keys, plaintext, and a foreign CA: none gets in."""
    stranger = generate_hospital_key(fed.root / "stranger" / "stranger.key")
    other = provision(fed.root / "other-federation", ["coordinator.test"], [])
    gone = fed.fedcare("coordinator", "unregister", "gone", "--dir", str(fed.dir))
    assert gone.returncode == 0, gone.stdout + gone.stderr
    assert "gone" not in json.loads((fed.dir / "registered.json").read_text())

    hospitals = fed.dir / "hospitals"
    attempts = {
        "unregistered": fed.join("unregistered", stranger.with_suffix(".key"), "cleveland"),
        "unregistered-after-removal": fed.join("removed", hospitals / "gone.key", "cleveland"),
        "foreign-ca": fed.join("foreign-ca", hospitals / "a1.key", "hungary", ca=other.ca_cert,
                               extra=("--max-wait", "15")),
        # Flower itself refuses a key without TLS, so the plaintext client comes without
        # one: what is tested is that the SuperLink does not speak plaintext at all.
        "plaintext": fed.procs.start("plaintext", [
            str(BIN / "flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{fed.port}",
            "--max-retries", "2", "--max-wait-time", "15", "--port", str(free_port()),
            "--node-config", f"data='{fed.csv['hungary']}' epsilon=1.0 delta=1e-05"]),
    }
    for why, proc in attempts.items():
        try:
            code = proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{why}: the SuperNode was neither admitted nor refused within 90 s")
        assert code != 0, f"{why}: exited 0\n{fed.procs.log(proc)}"
    assert fed.online() == 0
    for why in ("unregistered", "unregistered-after-removal"):
        assert "Failed to activate SuperNode" in fed.procs.log(attempts[why]), why
    assert "CERTIFICATE_VERIFY_FAILED" in fed.procs.log(attempts["foreign-ca"])
    assert "Failed to initialize the connection" in fed.procs.log(attempts["plaintext"])


@pytest.mark.timeout(480)
def test_two_rounds_over_tls_and_a_hospital_killed_mid_run(fed):
    """Four hospitals join with TLS and their own keys; one crashes while it trains in round 1.

    The three others complete both rounds with full results; the crashed one is dropped
    (the SuperLink marks it offline when its heartbeats stop), recorded as missing, and
    the run completes. A fifth, registered hospital trusts only one app publisher
    (``--trusted-entities``): it refuses fedcare's locally built app without running it
    and never becomes a site of the run. One run covers all of this, because each run
    costs a ServerApp start and a ClientApp process per message.
    """
    hospitals = fed.dir / "hospitals"
    sites = {"north": ("a1", "cleveland"), "south": ("a2", "hungary"), "east": ("a3", "switzerland"),
             "harbor": ("a4", "va_long_beach")}
    nodes = {site: fed.join(site, hospitals / f"{key}.key", csv) for site, (key, csv) in sites.items()}
    publisher = ed25519.Ed25519PrivateKey.generate().public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()
    trusted = fed.root / "trusted.yaml"
    trusted.write_text(f"fpk_publisher: '{publisher}'\n")
    nodes["careful"] = fed.join("careful", hospitals / "a5.key", "cleveland", extra=("--trusted-entities", str(trusted)))
    out = fed.root / "runs" / "tls"
    run = None
    try:
        wait_until(lambda: fed.online() == 5, 120, "five hospitals online")
        run = fed.procs.start("run", [FEDCARE, "coordinator", "run", "--task", "diagnosis", "--rounds", "2",
                                      "--min-sites", "3", "--round-timeout", "300", "--out", str(out),
                                      "--poll", "1"])
        victim = nodes["harbor"]
        wait_until(lambda: "Receiving: train message" in fed.procs.log(victim) or run.poll() is not None,
                   300, "harbor to receive its first training message")
        assert run.poll() is None, fed.procs.log(run)
        fed.procs.signal_group(victim, signal.SIGKILL)  # a crash: no goodbye to the SuperLink
        victim.wait(timeout=10)
        code = run.wait(timeout=400)
        assert code == 0, fed.procs.log(run)
    finally:
        if run is not None and run.poll() is None:
            fed.procs.stop(run)
        for proc in nodes.values():
            fed.procs.stop(proc)

    said = fed.procs.log(run)
    assert "round 1/2" in said and "round 2/2" in said and "missing at the end: harbor" in " ".join(said.split())
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["sites"]) == set(sites)  # not "careful"
    assert "could not be verified" in fed.procs.log(nodes["careful"])
    assert "Start `flwr-clientapp` process" not in fed.procs.log(nodes["careful"])
    assert summary["missing_sites"] == ["harbor"]
    assert summary["sites"]["harbor"]["missed_rounds"] == [1, 2]
    survivors = ("north", "south", "east")
    for name in survivors:
        site = summary["sites"][name]
        assert site["evaluated_round"] == 2 and site["missed_rounds"] == [], name
        assert 0 < site["epsilon"] <= BUDGET and site["delta"] == 1e-5, name
        assert 0.0 <= site["accuracy"] <= 1.0
    rows = (out / "metrics.csv").read_text().splitlines()
    for rnd in ("1", "2"):
        for name in survivors:
            assert any(r.startswith(f"{rnd},{name},") for r in rows), (rnd, name)
    rounds = (out / "rounds.csv").read_text().splitlines()
    assert [r.split(",")[:2] for r in rounds[1:]] == [["1", "3"], ["2", "3"]]
    state = torch.load(out / "model.pt", map_location="cpu", weights_only=True)
    assert state and all(torch.isfinite(v).all() for v in state.values())
    assert not out.with_name(out.name + ".partial").exists()
