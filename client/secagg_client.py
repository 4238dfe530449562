"""The hospital's side of secure aggregation (see ``fedcare.shared.secagg``).

Four messages per round, all ``train`` category so a SuperNode routes them to this app:

1. ``train.secagg_keys``: fresh key pairs and self-mask seed; reply the public keys.
2. ``train.secagg_shares``: everyone's public keys; reply Shamir shares of this site's
   mask key and self-mask seed, each encrypted for its recipient.
3. ``train`` (the ordinary training message, plus the surviving set): train, then reply
   the masked, quantised update instead of the update (``masked_update``).
4. ``train.secagg_unmask``: who survived and who dropped; reply b-shares of survivors and
   key shares of the dropped, once, and never both for one site.

Every check here defends the site's own update: a coordinator that asks twice, mixes
the sets or lowers the threshold gets a refusal, never the shares that would unmask one
hospital.
"""

from __future__ import annotations

import hashlib
import logging
import os

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict

from ..shared import errors, secagg
from ..shared.config import RunConfig
from ..shared.errors import ConfigError
from .app import app, guard

STATE = "fedcare.secagg"


class ProtocolError(ConfigError):
    """The coordinator broke the secure-aggregation protocol; the site stops this round."""


#: Narrower than the app's: a refused protocol step is CONFIG_REJECTED, anything else INTERNAL_ERROR.
WIRE_CODES = ((ConfigError, errors.CONFIG_REJECTED, logging.WARNING, "secure aggregation refused: %s"),)


def _guard(handler):
    return guard(handler, WIRE_CODES)


def _request(msg: Message) -> ConfigRecord:
    if "secagg" not in msg.content.config_records:
        raise ProtocolError("secure-aggregation message without its 'secagg' record")
    return msg.content.config_records["secagg"]


def _session(req: ConfigRecord) -> tuple[int, bytes]:
    rnd, session = req.get("round"), req.get("session")
    if not isinstance(rnd, int) or not isinstance(session, bytes) or len(session) != 16:
        raise ProtocolError("malformed secure-aggregation round")
    return rnd, session


def _state(context: Context, req: ConfigRecord, stage: str) -> ConfigRecord:
    rnd, session = _session(req)
    state = context.state.config_records.get(STATE)
    if state is None or state["session"] != session or state["round"] != rnd or state["stage"] != stage:
        raise ProtocolError(f"secure-aggregation message out of order (expected after '{stage}')")
    return state


def _threshold(context: Context, n: int) -> int:
    cfg = RunConfig.from_mapping(dict(context.run_config))
    return secagg.threshold(n, cfg.secagg_threshold)


def _ids(value: object, what: str) -> list[int]:
    if not isinstance(value, list) or not all(isinstance(v, int) and v > 0 for v in value) \
            or len(set(value)) != len(value):
        raise ProtocolError(f"malformed {what}")
    return list(value)


@app.train("secagg_keys")
@_guard
def keys(msg: Message, context: Context) -> RecordDict:
    req = _request(msg)
    rnd, session = _session(req)
    sk_c, sk_s, b = secagg.new_private_key(), secagg.new_private_key(), os.urandom(32)
    context.state.config_records[STATE] = ConfigRecord({
        "round": rnd, "session": session, "stage": "keys", "sk-c": sk_c, "sk-s": sk_s, "b": b,
    })
    # The hash commits to b, so the coordinator can tell a corrupted share from a good one.
    return RecordDict({"secagg": ConfigRecord({"pk-c": secagg.public_key(sk_c), "pk-s": secagg.public_key(sk_s),
                                               "b-hash": hashlib.sha256(b).digest()})})


@app.train("secagg_shares")
@_guard
def shares(msg: Message, context: Context) -> RecordDict:
    req = _request(msg)
    state = _state(context, req, "keys")
    me = context.node_id
    nodes = _ids(req.get("nodes"), "participant list")
    pk_c, pk_s = req.get("pk-c"), req.get("pk-s")
    if not (isinstance(pk_c, list) and isinstance(pk_s, list) and len(pk_c) == len(pk_s) == len(nodes)) \
            or not all(isinstance(k, bytes) and len(k) == 32 for k in pk_c + pk_s):
        raise ProtocolError("malformed public keys")
    if me not in nodes:
        raise ProtocolError("this site is not among the participants")
    at = nodes.index(me)
    if pk_c[at] != secagg.public_key(state["sk-c"]) or pk_s[at] != secagg.public_key(state["sk-s"]):
        raise ProtocolError("the coordinator altered this site's public keys")
    t = _threshold(context, len(nodes))
    if len(nodes) < 2:
        raise ProtocolError("secure aggregation needs at least two sites")
    sk_shares = secagg.share(state["sk-s"], t, nodes)
    b_shares = secagg.share(state["b"], t, nodes)
    rnd, session = _session(req)
    to, sealed, share_keys = [], [], []
    for j, node in enumerate(nodes):
        blob = secagg.pack_shares(sk_shares[node], b_shares[node])
        if node == me:
            state["own-share"] = blob
            continue
        key = secagg.agree(state["sk-c"], pk_c[j], b"shares", session)
        to.append(node)
        share_keys.append(key)  # kept for opening the shares relayed back at unmasking
        sealed.append(secagg.seal(key, secagg.transport_context(0, rnd, me, node), blob))
    state.update({"stage": "shares", "nodes": nodes, "pk-s": pk_s, "threshold": t, "share-peers": to,
                  "share-keys": share_keys})
    return RecordDict({"secagg": ConfigRecord({"to": to, "ct": sealed})})


def masked_update(msg: Message, context: Context, arrays: dict[str, np.ndarray], weight: float) -> ArrayRecord:
    """The site's weighted arrays, quantised and masked for the surviving set of this round."""
    req = _request(msg)
    state = _state(context, req, "shares")
    me = context.node_id
    survivors = _ids(req.get("nodes"), "masking set")
    nodes = list(state["nodes"])
    if me not in survivors or not set(survivors) <= set(nodes) or len(survivors) < int(state["threshold"]):
        raise ProtocolError("masking set is not a large enough subset of the participants")
    _, session = _session(req)
    vector = secagg.quantize(secagg.Layout.of(arrays).flatten(
        {k: np.asarray(v, dtype=np.float64) * weight for k, v in arrays.items()}, weight))
    secagg.apply_mask(vector, state["b"], +1)
    pk_s = dict(zip(nodes, state["pk-s"]))
    for node in survivors:
        if node != me:
            seed = secagg.agree(state["sk-s"], pk_s[node], b"mask", session)
            secagg.apply_mask(vector, seed, secagg.pair_sign(me, node))
    state.update({"stage": "masked", "masked-set": survivors})
    return ArrayRecord({"masked": Array(vector)})


@app.train("secagg_unmask")
@_guard
def unmask(msg: Message, context: Context) -> RecordDict:
    req = _request(msg)
    state = _state(context, req, "masked")
    me = context.node_id
    survivors = set(_ids(req.get("survivors"), "survivor list"))
    dropped = set(_ids(req.get("dropped") or [], "dropped list")) if req.get("dropped") else set()
    masked_set = set(state["masked-set"])
    if survivors & dropped or survivors | dropped != masked_set or me not in survivors \
            or len(survivors) < int(state["threshold"]):
        raise ProtocolError("inconsistent survivor and dropped sets")
    src, sealed = _ids(req.get("src") or [], "share senders"), req.get("ct") or []
    if not isinstance(sealed, list) or len(sealed) != len(src):
        raise ProtocolError("malformed relayed shares")
    rnd, _ = _session(req)
    share_keys = dict(zip(state["share-peers"], state["share-keys"]))
    held = {me: state["own-share"]}
    for node, blob in zip(src, sealed):
        if node not in masked_set or node == me or not isinstance(blob, bytes):
            raise ProtocolError("relayed share from outside the masking set")
        key = share_keys[node]
        held[node] = secagg.open_sealed(key, secagg.transport_context(0, rnd, node, me), blob)
    b_from, b_out, sk_from, sk_out = [], [], [], []
    for node, blob in sorted(held.items()):
        sk_share, b_share = secagg.unpack_shares(blob)
        if node in survivors:
            b_from.append(node)
            b_out.append(b_share)
        elif node in dropped:
            sk_from.append(node)
            sk_out.append(sk_share)
    state["stage"] = "unmasked"  # answer once per round: never both shares of one site
    return RecordDict({"secagg": ConfigRecord({"b-from": b_from, "b": b_out, "sk-from": sk_from, "sk": sk_out})})
