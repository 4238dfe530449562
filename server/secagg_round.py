"""The coordinator's side of a secure-aggregation round (protocol in ``fedcare.shared.secagg``).

The coordinator relays keys and encrypted shares, receives masked vectors, adds them up
and removes the masks it is allowed to remove: self masks of the sites whose vector is
in the sum, pairwise masks of the sites that dropped after the masking set was fixed. It
never holds a single site's unmasked update. A site is out of the round (and treated as
dropped) when it does not answer a stage, answers with an error, or sends a malformed
reply; if fewer than the threshold remain at any stage, the round's global model stays
unchanged.

What the coordinator can no longer check per site under secure aggregation: finiteness
and norm of one update (it cannot see one). Sites quantise only finite values within
range (``secagg.quantize``) and, under central DP, clip their own updates.
"""

from __future__ import annotations

import hashlib
import logging
import os
from typing import Callable

import numpy as np
from flwr.app import ConfigRecord, Message, RecordDict

from ..shared import secagg
from ..shared.config import RunConfig
from . import validation

log = logging.getLogger("fedcare.server")

Reject = Callable[[int, str], None]


def _ask(grid, nodes: list[int], action: str, records: Callable[[int], dict[str, ConfigRecord]],
         timeout: float) -> list[Message]:
    msgs = [Message(RecordDict(records(n)), dst_node_id=n, message_type=f"train.{action}") for n in nodes]
    return list(grid.send_and_receive(msgs, timeout=timeout))


def _secagg(msg: Message) -> ConfigRecord | None:
    if msg.has_error() or not msg.has_content() or set(msg.content.config_records) - {"secagg", "site"} \
            or "secagg" not in msg.content.config_records or msg.content.array_records:
        return None
    return msg.content.config_records["secagg"]


def run(grid, train_msgs: list[Message], rnd: int, reference: dict[str, np.ndarray], cfg: RunConfig,
        reject: Reject, accept: Callable[[Message], None], central=None,
        declared: dict[int, int] | None = None) -> dict[str, np.ndarray] | None:
    """One secure round; the new global arrays, or None if the sum could not be unmasked."""
    by_node = {m.metadata.dst_node_id: m for m in train_msgs}
    sampled = sorted(by_node)
    t = secagg.threshold(len(sampled), cfg.secagg_threshold)
    session = os.urandom(16)
    base = {"round": rnd, "session": session}
    layout = secagg.Layout.of(reference)

    def enough(stage: str, alive: int) -> bool:
        if alive >= t:
            return True
        log.warning("round %d: %d site(s) left at secure-aggregation stage %s < threshold %d; model unchanged",
                    rnd, alive, stage, t)
        return False

    # 1. keys
    keys: dict[int, tuple[bytes, bytes, bytes]] = {}
    for msg in _ask(grid, sampled, "secagg_keys", lambda n: {"secagg": ConfigRecord(dict(base))}, cfg.round_timeout):
        node, rec = msg.metadata.src_node_id, _secagg(msg)
        pk = (rec.get("pk-c"), rec.get("pk-s"), rec.get("b-hash")) if rec is not None else ()
        if node in by_node and len(pk) == 3 and all(isinstance(k, bytes) and len(k) == 32 for k in pk):
            keys[node] = pk  # type: ignore[assignment]
        else:
            reject(node, _why(msg, "malformed secure-aggregation keys"))
    u0 = sorted(keys)
    if not enough("keys", len(u0)):
        return None
    t = secagg.threshold(len(u0), cfg.secagg_threshold)  # as each site computes it from the key list

    # 2. encrypted shares, relayed
    announce = {**base, "nodes": u0, "pk-c": [keys[n][0] for n in u0], "pk-s": [keys[n][1] for n in u0]}
    relay: dict[int, dict[int, bytes]] = {n: {} for n in u0}  # dst -> src -> sealed
    u1 = []
    for msg in _ask(grid, u0, "secagg_shares", lambda n: {"secagg": ConfigRecord(dict(announce))}, cfg.round_timeout):
        node, rec = msg.metadata.src_node_id, _secagg(msg)
        to, ct = (rec.get("to"), rec.get("ct")) if rec is not None else (None, None)
        if node in keys and isinstance(to, list) and isinstance(ct, list) and sorted(to) == [n for n in u0 if n != node] \
                and len(ct) == len(to) and all(isinstance(c, bytes) for c in ct):
            for dst, sealed in zip(to, ct):
                relay[dst][node] = sealed
            u1.append(node)
        else:
            reject(node, _why(msg, "malformed secure-aggregation shares"))
    u1.sort()
    if not enough("shares", len(u1)):
        return None

    # 3. train and mask
    total = np.zeros(layout.length, dtype=np.uint64)
    u2 = []
    for node in u1:
        by_node[node].content["secagg"] = ConfigRecord({**base, "nodes": u1})
    for msg in sorted(grid.send_and_receive([by_node[n] for n in u1], timeout=cfg.round_timeout),
                      key=lambda m: m.metadata.src_node_id):
        node = msg.metadata.src_node_id
        if node not in u1 or node in u2:
            continue
        verdict = validation.check_masked_reply(msg, layout.length)
        if verdict.ok and declared is not None:
            verdict = validation.check_declared_count(msg, declared.get(node, 0))
        if not verdict.ok:
            reject(node, verdict.reason)
            continue
        total += msg.content.array_records["masked"]["masked"].numpy()
        u2.append(node)
        accept(msg)
    dropped = [n for n in u1 if n not in u2]
    if not enough("masking", len(u2)):
        return None

    # 4. unmask
    def unmask_request(n: int) -> dict[str, ConfigRecord]:
        src = sorted(relay[n])  # only sites that made it into u1 relayed shares
        return {"secagg": ConfigRecord({**base, "survivors": u2, "dropped": dropped, "src": src,
                                        "ct": [relay[n][s] for s in src]})}

    b_shares: dict[int, dict[int, bytes]] = {n: {} for n in u2}
    sk_shares: dict[int, dict[int, bytes]] = {n: {} for n in dropped}
    answered = 0
    for msg in _ask(grid, u2, "secagg_unmask", unmask_request, cfg.round_timeout):
        holder, rec = msg.metadata.src_node_id, _secagg(msg)
        try:
            assert rec is not None and holder in u2
            for kind, store in (("b", b_shares), ("sk", sk_shares)):
                for j, share in zip(rec[f"{kind}-from"], rec[kind], strict=True):
                    if j in store and isinstance(share, bytes):
                        store[j][holder] = share
            answered += 1
        except (AssertionError, KeyError, TypeError, ValueError):
            reject(holder, _why(msg, "malformed secure-aggregation unmasking shares"))
    if not enough("unmasking", answered):
        return None
    try:
        for node in u2:
            b = secagg.reconstruct(b_shares[node], t)
            if hashlib.sha256(b).digest() != keys[node][2]:
                raise ValueError(f"self-mask seed of node {node} does not match its commitment")
            secagg.apply_mask(total, b, -1)
        for node in dropped:
            sk = secagg.reconstruct(sk_shares[node], t)
            if secagg.public_key(sk) != keys[node][1]:
                raise ValueError(f"mask key of node {node} does not match its public key")
            for other in u2:
                seed = secagg.agree(sk, keys[other][1], b"mask", session)
                secagg.apply_mask(total, seed, -secagg.pair_sign(other, node))
    except ValueError as exc:
        log.warning("round %d: secure aggregation could not unmask the sum (%s); model unchanged", rnd, exc)
        return None

    weighted, weight = layout.unflatten(secagg.dequantize(total))
    if not weight > 0:
        return None
    mean = {k: v / weight for k, v in weighted.items()}
    if central is not None:
        mean = central.noisy_mean(mean, len(u2))
    return {k: mean[k].astype(reference[k].dtype) for k in reference}


def _why(msg: Message, default: str) -> str:
    if msg.has_error():
        return f"error reply (code {msg.error.code}): {msg.error.reason}"
    return default


__all__ = ["run"]
