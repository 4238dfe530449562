"""Secure aggregation: exact sum, uniform-looking replies, dropouts; central DP on top."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats

from fedcare.client import privacy
from fedcare.shared import secagg
from fedcare.shared.config import RunConfig
from fedcare.simulation.runner import plan_federation, simulate


def test_shamir_threshold_and_fixed_point() -> None:
    secret = os.urandom(32)
    shares = secagg.share(secret, 3, [11, 22, 33, 44, 55])
    assert secagg.reconstruct({x: shares[x] for x in (22, 44, 55)}, 3) == secret
    with pytest.raises(ValueError):
        secagg.reconstruct({x: shares[x] for x in (22, 44)}, 3)
    x = np.array([-3.25, 0.0, 1e-7, 2.5e3])
    assert np.abs(secagg.dequantize(secagg.quantize(x)) - x).max() <= 2.0 ** -25
    with pytest.raises(ValueError):
        secagg.quantize(np.array([np.nan]))
    assert secagg.threshold(4, 0.66) == 3 and secagg.threshold(10, 0.3) == 6


def test_pairwise_masks_cancel() -> None:
    a, b = secagg.new_private_key(), secagg.new_private_key()
    ab = secagg.agree(a, secagg.public_key(b), b"mask", b"ctx")
    assert ab == secagg.agree(b, secagg.public_key(a), b"mask", b"ctx")
    v = np.zeros(5, dtype=np.uint64)
    secagg.apply_mask(v, ab, secagg.pair_sign(1, 2))
    secagg.apply_mask(v, ab, secagg.pair_sign(2, 1))
    assert not v.any()


def _cfg(**kw) -> RunConfig:
    return RunConfig.from_mapping({**RunConfig().to_mapping(), "num-rounds": 1, **kw})


def _model(out: Path, cfg: RunConfig, epsilon: float = math.inf, **kw) -> dict[str, torch.Tensor]:
    simulate(cfg, plan_federation(cfg, epsilon=epsilon, delta=1e-5), out=out, **kw)
    return torch.load(out / "model.pt")


def _max_diff(a, b) -> float:
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def test_secure_sum_equals_fedavg_and_replies_look_uniform(tmp_path: Path) -> None:
    seen: list = []

    def tap(msg) -> None:
        if msg.has_content() and "masked" in msg.content.array_records:
            seen.append((msg.metadata.src_node_id, msg.content.array_records["masked"]["masked"].numpy()))

    plain = _model(tmp_path / "plain", _cfg(model="mlp"))  # thousands of coordinates to test
    secure = _model(tmp_path / "secure", _cfg(model="mlp", **{"secure-aggregation": True}), tap=tap)
    assert _max_diff(plain, secure) < 1e-6  # quantisation error only (2^-25 per site)

    # The server's view of one hospital: uniform over Z_2^64, unlike its quantised update.
    assert sorted(n for n, _ in seen) == [1, 2, 3, 4]
    vector = seen[0][1]
    assert vector.dtype == np.uint64 and len(vector) > 2000
    top = (vector >> np.uint64(56)).astype(np.int64)
    assert stats.chisquare(np.bincount(top, minlength=256)).pvalue > 1e-4
    assert stats.kstest(vector.astype(np.float64) / 2.0 ** 64, "uniform").pvalue > 1e-4
    unmasked = secagg.quantize(np.concatenate([v.numpy().ravel() for v in plain.values()]))
    top_plain = (unmasked >> np.uint64(56)).astype(np.int64)
    assert stats.chisquare(np.bincount(top_plain, minlength=256)).pvalue < 1e-10


def test_dropout_during_masking_still_sums_the_survivors(tmp_path: Path) -> None:
    def drop(node: int, msg) -> bool:  # site 2 goes offline after sharing its keys
        return node == 2 and msg.metadata.message_type == "train"

    plain = _model(tmp_path / "plain", _cfg(), unreachable=drop)
    secure = _model(tmp_path / "secure", _cfg(**{"secure-aggregation": True}), unreachable=drop)
    assert _max_diff(plain, secure) < 1e-6

    # site 2 masks and sends, then misses the unmasking: its self mask is rebuilt from shares
    everyone = _model(tmp_path / "all", _cfg())
    late = _model(tmp_path / "late", _cfg(**{"secure-aggregation": True}),
                  unreachable=lambda node, msg: node == 2 and msg.metadata.message_type == "train.secagg_unmask")
    assert _max_diff(everyone, late) < 1e-6

    untrained = _model(tmp_path / "none", _cfg(**{"secure-aggregation": True}),
                       unreachable=lambda node, msg: node in (2, 3) and msg.metadata.message_type == "train")
    init = _model(tmp_path / "init", _cfg(**{"num-rounds": 1, "fraction-train": 1.0}),
                  unreachable=lambda node, msg: msg.metadata.message_type == "train")
    assert _max_diff(untrained, init) == 0.0  # below threshold (3 of 4): model unchanged


def test_central_dp_with_secure_aggregation_and_local_dp(tmp_path: Path) -> None:
    cfg = _cfg(**{"secure-aggregation": True, "central-dp": "client", "central-noise": 2.0,
                  "central-clip": 0.5, "num-rounds": 2, "reproducible-noise": True})
    out = tmp_path / "run"
    simulate(cfg, plan_federation(cfg, epsilon=3.0, delta=1e-5), out=out)
    summary = json.loads((out / "summary.json").read_text())
    central = summary["central_dp"]
    assert central["releases"] == 2 and central["weighting"] == "equal"
    assert central["epsilon"] == pytest.approx(privacy.epsilon([(2.0, 1.0, 2)], central["delta"]))
    assert all(0 < s["epsilon"] <= 3.0 for s in summary["sites"].values())  # local DP still accounted


def test_server_side_central_dp_noise_scales_with_clip(tmp_path: Path) -> None:
    plain = _model(tmp_path / "plain", _cfg())
    small = _model(tmp_path / "small", _cfg(**{"central-dp": "server", "central-noise": 1e-3, "central-clip": 10.0}))
    big = _model(tmp_path / "big", _cfg(**{"central-dp": "server", "central-noise": 1.0, "central-clip": 10.0}))
    # equal weights instead of example weights: a different mean from FedAvg's, but close
    assert 0 < _max_diff(plain, small) < 0.5
    assert _max_diff(plain, big) > 10 * _max_diff(plain, small)


def test_a_site_never_answers_unmasking_twice_or_out_of_order() -> None:
    from flwr.app import ConfigRecord, Context, Message, RecordDict

    from fedcare.client import secagg_client
    from fedcare.client.app import app
    from fedcare.shared import errors
    from fedcare.simulation.runner import _server_identity

    nodes = [1, 2, 3]
    ctx = {n: Context(run_id=1, node_id=n, node_config={}, state=RecordDict(),
                      run_config=RunConfig().to_mapping()) for n in nodes}
    base = {"round": 1, "session": os.urandom(16)}

    def send(node: int, action: str, **fields) -> Message:
        with _server_identity(1):
            msg = Message(RecordDict({"secagg": ConfigRecord({**base, **fields})}), dst_node_id=node,
                          message_type=f"train.{action}")
        msg.metadata.__dict__["_message_id"] = f"{action}-{node}"
        return app(msg, ctx[node])

    keys = {n: send(n, "secagg_keys").content["secagg"] for n in nodes}
    assert send(1, "secagg_unmask", survivors=nodes).error.code == errors.CONFIG_REJECTED  # out of order
    pk_c, pk_s = [keys[n]["pk-c"] for n in nodes], [keys[n]["pk-s"] for n in nodes]
    forged = [pk_c[1]] + pk_c[1:]
    assert send(1, "secagg_shares", nodes=nodes, **{"pk-c": forged, "pk-s": pk_s}).has_error()
    relay = {n: {} for n in nodes}
    for n in nodes:
        rec = send(n, "secagg_shares", nodes=nodes, **{"pk-c": pk_c, "pk-s": pk_s}).content["secagg"]
        for dst, sealed in zip(rec["to"], rec["ct"]):
            relay[dst][n] = sealed
    with _server_identity(1):
        train = Message(RecordDict({"secagg": ConfigRecord({**base, "nodes": nodes})}), dst_node_id=1,
                        message_type="train")
    secagg_client.masked_update(train, ctx[1], {"w": np.ones(3)}, 2.0)
    src = sorted(relay[1])
    ask = dict(survivors=[1, 2], dropped=[3], src=src, ct=[relay[1][s] for s in src])
    first = send(1, "secagg_unmask", **ask)
    assert not first.has_error() and first.content["secagg"]["sk-from"] == [3]
    assert sorted(first.content["secagg"]["b-from"]) == [1, 2]
    # asked again with site 2 now "dropped": that would reveal both of its secrets
    again = send(1, "secagg_unmask", **{**ask, "survivors": [1, 3], "dropped": [2]})
    assert again.error.code == errors.CONFIG_REJECTED
