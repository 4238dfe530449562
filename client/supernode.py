"""The hospital's Flower SuperNode: what ``fedcare hospital join`` checks and runs.

The node config built here is the hospital's side of the privacy contract: the data
path, the site's name and its (ε, δ) budget are fixed when the SuperNode starts, and
the ClientApp reads them only from there (``SiteConfig``); no run config or message can
change them.

Trusted app publishers (``--trusted-entities``): flwr 1.41's SuperNode accepts a YAML
file mapping public-key ids to Ed25519 public keys and then runs only apps whose bundle
carries a valid signature by one of them. In 1.41 those signatures come only from Flower
Hub reviews (``flwr app review``), attached by the SuperLink when a run names a Hub app
(``flwr run @publisher/app==version``); a bundle built from a local folder, as
``fedcare coordinator run`` sends, carries none, so a SuperNode with trusted entities
refuses it (error reply, no code runs). fedcare passes the file through and checks it
parses; restricting publishers therefore means publishing fedcare on Flower Hub.
"""

from __future__ import annotations

from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key

from ..shared.config import SiteConfig
from ..shared.errors import ConfigError
from ..shared.flower_tools import config_arg, tool

#: flwr's default runtime API port of a SuperNode; several on one host need distinct ports.
DEFAULT_RUNTIME_PORT = 9094


def check_ca(path: Path) -> None:
    try:
        x509.load_pem_x509_certificate(Path(path).read_bytes())
    except FileNotFoundError:
        raise ConfigError(f"CA certificate not found: {path}") from None
    except ValueError:
        raise ConfigError(f"{path} is not a PEM certificate (expected the federation's ca.pem)") from None


def check_private_key(path: Path) -> None:
    try:
        key = load_ssh_private_key(Path(path).read_bytes(), None)
    except FileNotFoundError:
        raise ConfigError(f"key file not found: {path}") from None
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{path} is not an unencrypted OpenSSH private key: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ConfigError(f"{path}: SuperNode authentication needs an EC (NIST curve) key")
    if Path(path).stat().st_mode & 0o077:
        raise ConfigError(f"{path} is readable by other users; chmod 600 it")


def check_trusted_entities(path: Path) -> None:
    """The same checks flwr makes, made before anything starts."""
    import yaml

    try:
        entities = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"trusted-entities file not found: {path}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from None
    if not isinstance(entities, dict) or not entities:
        raise ConfigError(f"{path} must map public-key ids to 'ssh-ed25519 ...' public keys")
    for key_id, text in entities.items():
        try:
            key = load_ssh_public_key(str(text).encode())
        except (ValueError, TypeError):
            key = None
        if not isinstance(key, ed25519.Ed25519PublicKey):
            raise ConfigError(f"{path}: entry '{key_id}' is not an ssh-ed25519 public key")


def node_config(site: SiteConfig) -> str:
    """``--node-config`` text; strings as TOML literals (no escapes, Windows paths survive).

    The data, name and budget always; any other setting the hospital changed from its
    default (ledger, strict, max-noise, min-records, split-seed, ...).
    """
    always = ("data", "site", "epsilon", "delta")
    defaults = SiteConfig().to_mapping()
    pairs: list[tuple[str, object]] = [(k, v) for k, v in site.to_mapping().items()
                                       if k in always or v != defaults[k]]
    return config_arg(pairs, "node config")


def supernode_command(*, superlink: str, ca: Path, key: Path, site: SiteConfig, port: int = DEFAULT_RUNTIME_PORT,
                      trusted_entities: Path | None = None, max_wait: float | None = None) -> list[str]:
    cmd = [tool("flower-supernode"),
           "--superlink", superlink,
           "--root-certificates", str(Path(ca).resolve()),
           "--auth-supernode-private-key", str(Path(key).resolve()),
           "--node-config", node_config(site),
           "--port", str(port)]
    if trusted_entities is not None:
        cmd += ["--trusted-entities", str(Path(trusted_entities).resolve())]
    if max_wait is not None:
        cmd += ["--max-wait-time", f"{max_wait:g}"]
    return cmd
