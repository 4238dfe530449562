"""Provisioning and the checks made before any Flower process starts (no network)."""

from __future__ import annotations

import ipaddress
import stat
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key

from fedcare.server.provision import add_hospitals, provision
from fedcare.shared.errors import ConfigError
from fedcare.shared.keys import generate_hospital_key, load_public_key

from .deploy_support import BIN

FEDCARE = str(BIN / "fedcare")


def test_provision_makes_a_verifiable_chain_with_sans_and_private_keys_0600(tmp_path):
    layout = provision(tmp_path / "fed", ["fl.example.org", "203.0.113.7"], ["st-mary", "city"])
    ca = x509.load_pem_x509_certificate(layout.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(layout.server_cert.read_bytes())
    server.verify_directly_issued_by(ca)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(sans.get_values_for_type(x509.DNSName)) == {"fl.example.org", "localhost"}
    assert set(sans.get_values_for_type(x509.IPAddress)) == {ipaddress.ip_address("203.0.113.7"),
                                                             ipaddress.ip_address("127.0.0.1")}
    for private in (layout.ca_key, layout.server_key, layout.hospital_key("st-mary"), layout.hospital_key("city")):
        assert stat.S_IMODE(private.stat().st_mode) == 0o600, private
    key = load_ssh_private_key(layout.hospital_key("city").read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1"
    assert load_public_key(layout.hospital_pub("city")).public_numbers() == key.public_key().public_numbers()


def test_provision_refuses_to_overwrite_and_writes_nothing(tmp_path):
    layout = provision(tmp_path / "fed", ["fl.example.org"], ["a"])
    before = {p: p.read_bytes() for p in layout.root.rglob("*") if p.is_file()}
    with pytest.raises(ConfigError, match="refusing to overwrite"):
        provision(tmp_path / "fed", ["other.example.org"], ["b"])
    with pytest.raises(ConfigError, match="refusing to overwrite"):
        add_hospitals(tmp_path / "fed", ["b", "a"])
    after = {p: p.read_bytes() for p in layout.root.rglob("*") if p.is_file()}
    assert after == before  # not even b's key was written
    with pytest.raises(ConfigError, match="must be letters"):
        provision(tmp_path / "fed2", ["h"], ["../evil"])
    assert not (tmp_path / "fed2").exists()
    pub = generate_hospital_key(tmp_path / "own" / "site.key")
    assert pub.name == "site.pub"
    with pytest.raises(ConfigError, match="refusing to overwrite"):
        generate_hospital_key(tmp_path / "own" / "site.key")


def _join(tmp_path: Path, layout, data: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([FEDCARE, "hospital", "join", "--coordinator", "127.0.0.1:1", "--ca", str(layout.ca_cert),
                           "--key", str(layout.hospital_key("a")), "--data", str(data), "--epsilon", "3",
                           "--delta", "1e-5", "--max-wait", "1", *extra],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)


def _said(done: subprocess.CompletedProcess) -> str:
    return " ".join((done.stdout + done.stderr).split())  # rich wraps long lines


def test_join_refuses_bad_data_and_bad_settings_before_connecting(tmp_path, heart_csvs):
    layout = provision(tmp_path / "fed", ["localhost"], ["a"])
    bad = tmp_path / "bad.csv"
    bad.write_text("age,sex\n63,1\n")
    done = _join(tmp_path, layout, bad)
    assert done.returncode == 2
    assert "refused" in _said(done) and "label column is missing" in _said(done)
    assert "Starting Flower SuperNode" not in _said(done)

    done = _join(tmp_path, layout, heart_csvs[0], "--trusted-entities", str(bad))
    assert done.returncode == 2 and "ssh-ed25519" in _said(done)
    layout.hospital_key("a").chmod(0o644)
    done = _join(tmp_path, layout, heart_csvs[0])
    assert done.returncode == 2 and "chmod 600" in _said(done)


def test_join_refuses_a_ledger_rewritten_since_its_anchor(tmp_path, heart_csvs):
    from fedcare.client import ledger as L
    from fedcare.client.budget_cli import write_anchor

    entry = {"history": [[1.0, 0.1, 10]], "epsilon": 0.5, "delta": 1e-5, "budget_epsilon": 3.0}
    book = L.Ledger(tmp_path / "ledger")
    for run in ("r1", "r2"):
        book.append("k", "cleveland", {"run": run, **entry})
    anchor = tmp_path / "anchor.json"
    write_anchor(book.chains(), anchor)
    layout = provision(tmp_path / "fed", ["localhost"], ["a"])
    layout.hospital_key("a").chmod(0o644)  # a later check refuses, so no SuperNode starts either way

    done = _join(tmp_path, layout, heart_csvs[0], "--ledger", str(book.dir), "--anchor", str(anchor))
    assert done.returncode == 2 and "chmod 600" in _said(done)  # the anchor check passed

    forged = L.Ledger(tmp_path / "forged")  # the same data set without run r2's spending
    forged.append("k", "cleveland", {"run": "r1", **entry})
    for name in ("k.jsonl", L.HEADS):
        (book.dir / name).write_text((forged.dir / name).read_text())
    done = _join(tmp_path, layout, heart_csvs[0], "--ledger", str(book.dir), "--anchor", str(anchor))
    assert done.returncode == 3 and "rewritten since the anchor" in _said(done)
    assert "Starting Flower SuperNode" not in _said(done)

    done = _join(tmp_path, layout, heart_csvs[0], "--ledger", "off", "--anchor", str(anchor))
    assert done.returncode == 2 and "needs a privacy ledger" in _said(done)
