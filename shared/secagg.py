"""Secure-aggregation primitives both sides share (SecAgg / SecAgg+ of Bonawitz et al. 2017).

Each round every sampled hospital makes two fresh X25519 key pairs: one to encrypt the
Shamir shares it deals to the others (``c``), one to agree a pairwise mask seed with each
of them (``s``). It also draws a 32-byte self-mask seed ``b``. Its reply is

    y_i = q(x_i) + PRG(b_i) + sum_{j > i} PRG(s_ij) - sum_{j < i} PRG(s_ij)   (mod 2^64)

where ``q`` quantises the (weighted) update to fixed point. Pairwise masks cancel in the
sum over all sites; self masks are removed with ``b_i`` rebuilt from t Shamir shares held
by the others; a site that dropped after masking leaves its pairwise masks in the sum,
removed with its ``s`` private key rebuilt from shares. An honest site reveals, per round,
either the b-share or the s-share of another site, never both, so the coordinator can
unmask the sum but no single reply.

Primitives, all from ``cryptography``: X25519 key agreement, HKDF-SHA256 key derivation,
AES-256-GCM to encrypt shares between sites (the coordinator relays them), ChaCha20 as
the PRG. Shamir sharing is over the prime field GF(2^521 - 1); the masked vector lives in
Z_{2^64} (numpy's uint64 wraps exactly so).
"""

from __future__ import annotations

from functools import lru_cache

import math
import os
import secrets
from dataclasses import dataclass

import numpy as np
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

#: Fixed-point scale: quantisation error per coordinate and site is at most 2^-25.
SCALE_BITS = 24
#: Largest magnitude a site may put in one coordinate. With 2^24 fixed point, the sum of
#: up to 2^9 sites stays inside the signed 64-bit range (no wrap-around in the sum).
MAX_ABS = float(2 ** 29)
PRIME = 2 ** 521 - 1
_SHARE_BYTES = 66
RAW = serialization.Encoding.Raw


# ---- keys ----------------------------------------------------------------------------
def new_private_key() -> bytes:
    return X25519PrivateKey.generate().private_bytes(RAW, serialization.PrivateFormat.Raw,
                                                     serialization.NoEncryption())


def public_key(private: bytes) -> bytes:
    return _private(private).public_key().public_bytes(RAW, serialization.PublicFormat.Raw)


def agree(private: bytes, peer_public: bytes, purpose: bytes, context: bytes) -> bytes:
    """A 32-byte key both ends derive alone: HKDF over the X25519 shared secret."""
    shared = _private(private).exchange(_public(peer_public))
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=b"fedcare-secagg/" + purpose + b"/" + context
                ).derive(shared)


@lru_cache(maxsize=512)
def _private(raw: bytes) -> X25519PrivateKey:
    """Key objects per raw key: a site agrees with every peer twice a round from one key."""
    return X25519PrivateKey.from_private_bytes(raw)


@lru_cache(maxsize=4096)
def _public(raw: bytes) -> X25519PublicKey:
    return X25519PublicKey.from_public_bytes(raw)


# ---- PRG and fixed point -------------------------------------------------------------
def prg(seed: bytes, length: int) -> np.ndarray:
    """``length`` uniform elements of Z_{2^64}: the ChaCha20 keystream under ``seed``.

    Read-only (a view on the keystream bytes): masks are only ever added or subtracted.
    """
    encryptor = Cipher(algorithms.ChaCha20(seed, b"\0" * 16), mode=None).encryptor()
    return np.frombuffer(encryptor.update(b"\0" * (8 * length)), dtype=np.uint64)


def quantize(values: np.ndarray) -> np.ndarray:
    """Fixed point in Z_{2^64} (two's complement); refuses values outside ``MAX_ABS``."""
    values = np.asarray(values, dtype=np.float64)
    if not np.isfinite(values).all() or np.abs(values).max(initial=0.0) > MAX_ABS:
        raise ValueError("update outside the secure-aggregation range")
    return np.rint(values * 2.0 ** SCALE_BITS).astype(np.int64).view(np.uint64)


def dequantize(field: np.ndarray) -> np.ndarray:
    return field.view(np.int64).astype(np.float64) / 2.0 ** SCALE_BITS


# ---- Shamir sharing over GF(2^521 - 1) -----------------------------------------------
def share(secret: bytes, threshold: int, xs: list[int]) -> dict[int, bytes]:
    """Shares of a 32-byte secret at the points ``xs``; any ``threshold`` rebuild it."""
    coeffs = [int.from_bytes(secret, "big")] + [secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    out = {}
    for x in xs:
        y = 0
        for c in reversed(coeffs):
            y = (y * x + c) % PRIME
        out[x] = y.to_bytes(_SHARE_BYTES, "big")
    return out


def reconstruct(shares: dict[int, bytes], threshold: int) -> bytes:
    """Lagrange interpolation at 0 from ``threshold`` (or more) shares."""
    if len(shares) < threshold:
        raise ValueError("not enough shares")
    points = sorted(shares.items())[:threshold]
    secret = 0
    for i, (xi, yi) in enumerate(points):
        num, den = 1, 1
        for j, (xj, _) in enumerate(points):
            if i != j:
                num = num * (-xj) % PRIME
                den = den * (xi - xj) % PRIME
        secret = (secret + int.from_bytes(yi, "big") * num * pow(den, -1, PRIME)) % PRIME
    if secret >= 2 ** 256:
        raise ValueError("shares are inconsistent")
    return secret.to_bytes(32, "big")


# ---- share transport between sites (relayed, unreadable by the coordinator) ------------
def seal(key: bytes, associated: bytes, plaintext: bytes) -> bytes:
    nonce = os.urandom(12)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, associated)


def open_sealed(key: bytes, associated: bytes, sealed: bytes) -> bytes:
    return AESGCM(key).decrypt(sealed[:12], sealed[12:], associated)


def pack_shares(sk_share: bytes, b_share: bytes) -> bytes:
    return sk_share + b_share


def unpack_shares(blob: bytes) -> tuple[bytes, bytes]:
    if len(blob) != 2 * _SHARE_BYTES:
        raise ValueError("malformed share")
    return blob[:_SHARE_BYTES], blob[_SHARE_BYTES:]


def transport_context(run: int, rnd: int, src: int, dst: int) -> bytes:
    return f"{run}:{rnd}:{src}->{dst}".encode()


def mask_context(run: int, rnd: int) -> bytes:
    return f"{run}:{rnd}".encode()


# ---- protocol parameters ------------------------------------------------------------
def threshold(num_sites: int, fraction: float) -> int:
    """Shares needed to unmask: the configured fraction, never a minority, at least 2.

    More than half of the sites must take part so that no two disjoint groups could
    each rebuild a different secret of the same site (SecAgg's condition).
    """
    return min(num_sites, max(2, math.ceil(fraction * num_sites), num_sites // 2 + 1))


def pair_sign(me: int, other: int) -> int:
    """+1 if ``me`` adds the pairwise mask shared with ``other``, -1 if it subtracts it."""
    return 1 if me < other else -1


def apply_mask(vector: np.ndarray, seed: bytes, sign: int) -> None:
    mask = prg(seed, len(vector))
    if sign > 0:
        vector += mask
    else:
        vector -= mask


@dataclass(frozen=True)
class Layout:
    """How model arrays flatten into one vector (sorted names, then one weight slot)."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]

    @classmethod
    def of(cls, arrays: dict[str, np.ndarray]) -> "Layout":
        names = tuple(sorted(arrays))
        return cls(names, tuple(tuple(np.shape(arrays[n])) for n in names))

    @property
    def length(self) -> int:
        return sum(int(np.prod(s)) for s in self.shapes) + 1

    def flatten(self, arrays: dict[str, np.ndarray], weight: float) -> np.ndarray:
        parts = [np.asarray(arrays[n], dtype=np.float64).ravel() for n in self.names]
        return np.concatenate(parts + [np.array([weight], dtype=np.float64)])

    def unflatten(self, vector: np.ndarray) -> tuple[dict[str, np.ndarray], float]:
        out, at = {}, 0
        for name, shape in zip(self.names, self.shapes):
            size = int(np.prod(shape))
            out[name] = vector[at:at + size].reshape(shape)
            at += size
        return out, float(vector[at])
