"""Hospital authentication keys: ECDSA P-384 pairs in OpenSSH format.

That is the format flwr 1.41's SuperNode authentication reads
(``flower-supernode --auth-supernode-private-key``, ``flwr supernode register``). The
coordinator can make them when it provisions a federation; a hospital can make its own
(``fedcare hospital keygen``) and send only the public key, so its private key never
leaves its machine. Private files are created with mode 0600 from the first byte, and
nothing is overwritten.
"""

from __future__ import annotations

import os
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from .errors import ConfigError

CURVE = ec.SECP384R1()


def generate_hospital_key(private_path: Path, comment: str = "") -> Path:
    """A key pair at ``private_path`` and ``<stem>.pub`` beside it; returns the public path."""
    private_path = Path(private_path)
    stem = private_path.name[:-4] if private_path.name.endswith(".key") else private_path.name
    public_path = private_path.with_name(stem + ".pub")
    refuse_existing([private_path, public_path])
    private_path.parent.mkdir(parents=True, exist_ok=True)
    write_hospital_key(ec.generate_private_key(CURVE), private_path, public_path, comment=comment)
    return public_path


def write_hospital_key(key: ec.EllipticCurvePrivateKey, private_path: Path, public_path: Path, *,
                       comment: str = "") -> None:
    """Write an OpenSSH private key (0600) and its one-line public key."""
    private_path.parent.mkdir(parents=True, exist_ok=True)
    write_private(private_path, key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()))
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    write_public(public_path, public + (f" {comment}".encode() if comment else b"") + b"\n")


def load_public_key(path: Path) -> ec.EllipticCurvePublicKey:
    """A hospital's public key, checked to be one Flower's authentication accepts."""
    try:
        key = serialization.load_ssh_public_key(Path(path).read_bytes().strip())
    except FileNotFoundError:
        raise ConfigError(f"public key file not found: {path}") from None
    except (ValueError, TypeError, IndexError) as exc:
        raise ConfigError(f"{path} is not an OpenSSH public key: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise ConfigError(f"{path}: SuperNode authentication needs an EC (NIST curve) key")
    return key


def refuse_existing(paths: list[Path]) -> None:
    existing = [str(p) for p in paths if Path(p).exists()]
    if existing:
        raise ConfigError("refusing to overwrite existing key material: " + ", ".join(existing))


def write_private(path: Path, data: bytes) -> None:
    """Create with 0600 (O_EXCL: never replaces a file, never world-readable meanwhile)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def write_public(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
