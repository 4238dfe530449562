"""Certificates and keys for a federation, made with ``cryptography`` alone.

What a federation needs, and who keeps what:

* ``ca.pem`` / ``ca.key``: a private certificate authority. The certificate goes to every
  hospital (they verify the coordinator with it); the key stays with the coordinator,
  offline if possible.
* ``superlink.pem`` / ``superlink.key``: the SuperLink's TLS certificate, signed by the
  CA, with the coordinator's host names and IP addresses as subject alternative names
  (TLS clients check those, not the common name).
* ``hospitals/NAME.key`` / ``hospitals/NAME.pub``: one ECDSA P-384 key pair per hospital
  in OpenSSH format, the format Flower's SuperNode authentication reads
  (``flower-supernode --auth-supernode-private-key``, ``flwr supernode register``).
  The private key goes to that hospital only; a hospital may instead make its own with
  ``fedcare hospital keygen`` and send just the public key.

Private keys are written with mode 0600. Nothing is ever overwritten: every target path
is checked before the first byte is written, so a refused call leaves no half-made
federation behind.
"""

from __future__ import annotations

import datetime as _dt
import ipaddress
import re
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ..shared.errors import ConfigError
from ..shared.keys import (CURVE, refuse_existing, write_hospital_key, write_private,
                           write_public)

#: Hospital names become file names and node-config values: keep them plain.
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")


@dataclass(frozen=True)
class Layout:
    """Where each file of a provisioned federation lives."""

    root: Path

    @property
    def ca_cert(self) -> Path:
        return self.root / "ca.pem"

    @property
    def ca_key(self) -> Path:
        return self.root / "ca.key"

    @property
    def server_cert(self) -> Path:
        return self.root / "superlink.pem"

    @property
    def server_key(self) -> Path:
        return self.root / "superlink.key"

    @property
    def hospitals(self) -> Path:
        return self.root / "hospitals"

    def hospital_key(self, name: str) -> Path:
        return self.hospitals / f"{name}.key"

    def hospital_pub(self, name: str) -> Path:
        return self.hospitals / f"{name}.pub"


def provision(root: Path, hosts: list[str], hospitals: list[str], *, days: int = 825) -> Layout:
    """Create a CA, the SuperLink's certificate and one key pair per hospital in ``root``.

    ``hosts`` are the names and addresses hospitals use to reach the coordinator
    (``localhost`` and ``127.0.0.1`` are always added so the coordinator can reach its
    own SuperLink). Refuses, writing nothing, if any file already exists.
    """
    layout = Layout(Path(root))
    names = _check_names(hospitals)
    if not hosts:
        raise ConfigError("give at least one host name or address of the coordinator (--host)")
    if days < 1:
        raise ConfigError("certificate validity must be at least one day")
    targets = [layout.ca_cert, layout.ca_key, layout.server_cert, layout.server_key]
    for name in names:
        targets += [layout.hospital_key(name), layout.hospital_pub(name)]
    refuse_existing(targets)

    ca_key = ec.generate_private_key(CURVE)
    ca_cert = _ca_certificate(ca_key, days)
    server_key = ec.generate_private_key(CURVE)
    server_cert = _server_certificate(server_key, ca_key, ca_cert, _with_loopback(hosts), days)
    pairs = {name: ec.generate_private_key(CURVE) for name in names}

    layout.root.mkdir(parents=True, exist_ok=True)
    write_private(layout.ca_key, _pem_key(ca_key))
    write_public(layout.ca_cert, ca_cert.public_bytes(serialization.Encoding.PEM))
    write_private(layout.server_key, _pem_key(server_key))
    write_public(layout.server_cert, server_cert.public_bytes(serialization.Encoding.PEM))
    for name, key in pairs.items():
        write_hospital_key(key, layout.hospital_key(name), layout.hospital_pub(name), comment=name)
    return layout


def add_hospitals(root: Path, hospitals: list[str]) -> list[Path]:
    """New hospital key pairs in an existing federation folder; returns the public keys."""
    layout = Layout(Path(root))
    names = _check_names(hospitals)
    targets = [p for n in names for p in (layout.hospital_key(n), layout.hospital_pub(n))]
    refuse_existing(targets)
    pubs = []
    for name in names:
        write_hospital_key(ec.generate_private_key(CURVE), layout.hospital_key(name), layout.hospital_pub(name),
                           comment=name)
        pubs.append(layout.hospital_pub(name))
    return pubs


def _check_names(names: list[str]) -> list[str]:
    bad = [n for n in names if not NAME_PATTERN.match(n)]
    if bad:
        raise ConfigError(f"hospital name(s) {', '.join(map(repr, bad))} must be letters, digits, '.', '_' "
                          "or '-' (at most 63 characters, not starting with a symbol)")
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError(f"hospital name(s) given twice: {', '.join(dupes)}")
    return list(names)


def _with_loopback(hosts: list[str]) -> list[str]:
    out = list(dict.fromkeys(h.strip() for h in hosts if h.strip()))
    for h in ("localhost", "127.0.0.1"):
        if h not in out:
            out.append(h)
    return out


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedcare federation"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common)])


def _validity(days: int) -> tuple[_dt.datetime, _dt.datetime]:
    now = _dt.datetime.now(_dt.timezone.utc)
    return now - _dt.timedelta(minutes=5), now + _dt.timedelta(days=days)


def _ca_certificate(key: ec.EllipticCurvePrivateKey, days: int) -> x509.Certificate:
    start, end = _validity(days)
    name = _name("fedcare federation CA")
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    return (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(start).not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False,
                                         encipher_only=False, decipher_only=False), critical=True)
            .add_extension(ski, critical=False)
            .sign(key, hashes.SHA384()))


def _server_certificate(key: ec.EllipticCurvePrivateKey, ca_key: ec.EllipticCurvePrivateKey,
                        ca_cert: x509.Certificate, hosts: list[str], days: int) -> x509.Certificate:
    start, end = _validity(days)
    sans: list[x509.GeneralName] = []
    for host in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            sans.append(x509.DNSName(host))
    return (x509.CertificateBuilder().subject_name(_name(hosts[0])).issuer_name(ca_cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA384()))


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())
