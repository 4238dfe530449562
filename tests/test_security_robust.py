"""Robust aggregation (median, trimmed mean, Krum as screened means) against one hostile site of four."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from fedcare.server import robust
from fedcare.shared.config import RunConfig
from fedcare.simulation.runner import _server_identity, plan_federation, simulate

from .test_security_hostile import corrupting, scaled

RULES = ("median", "trimmed-mean", "krum")


def _msg(arrays: dict[str, np.ndarray], n: int) -> Message:
    with _server_identity(1):
        req = Message(RecordDict(), dst_node_id=1, message_type="train")
    req.metadata.__dict__["_message_id"] = "m1"
    return Message(RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
                               "metrics": MetricRecord({"num-examples": n}),
                               "site": ConfigRecord({"name": "s"})}), reply_to=req)


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("factor", [-1.0, 100.0])
def test_the_hostile_update_is_screened_out_and_the_rest_averaged(rule: str, factor: float) -> None:
    rng = np.random.default_rng(0)
    g = {"w": rng.normal(size=(5, 3)).astype(np.float32), "b": np.zeros(3, np.float32)}
    step = {k: rng.normal(size=v.shape).astype(np.float32) for k, v in g.items()}
    honest = [{k: g[k] + step[k] + 0.3 * rng.normal(size=v.shape).astype(np.float32) for k, v in g.items()}
              for _ in range(3)]
    hostile = {k: g[k] + factor * (honest[0][k] - g[k]) for k in g}
    replies = [_msg(hostile, 300)] + [_msg(h, n) for h, n in zip(honest, (100, 200, 50))]
    assert robust.kept(replies, rule) == [1, 2, 3]
    out = robust.screened_mean(replies, rule, "num-examples")
    expected = {k: sum(n * h[k].astype(np.float64) for h, n in zip(honest, (100, 200, 50))) / 350 for k in g}
    for k in g:
        assert np.allclose(out[k].numpy(), expected[k], atol=1e-5)


def test_with_two_updates_nothing_is_screened() -> None:
    a = {"w": np.zeros(2, np.float32)}
    b = {"w": np.ones(2, np.float32)}
    assert robust.kept([_msg(a, 1), _msg(b, 1)], "median") == [0, 1]


def test_a_sign_flipping_hospital_does_not_move_the_robust_aggregate(tmp_path: Path) -> None:
    """Heart disease, four hospitals, Cleveland (node 1) sign-flips: each robust rule's
    model after two rounds is the honest sites' own average; fedavg's is far from it."""
    def model(strategy: str, name: str, **kw) -> dict[str, torch.Tensor]:
        cfg = RunConfig.from_mapping({**RunConfig().to_mapping(), "num-rounds": 2, "strategy": strategy})
        out = simulate(cfg, plan_federation(cfg, epsilon=math.inf, delta=1e-5), out=tmp_path / name, **kw)
        return torch.load(out / "model.pt")

    def dist(a, b) -> float:
        return math.sqrt(sum(float(((a[k] - b[k]).double() ** 2).sum()) for k in a))

    flip = {1: corrupting(scaled(-1.0))}
    honest_only = model("fedavg", "honest", unreachable=lambda node, msg: node == 1
                        and msg.metadata.message_type == "train")
    damage = dist(model("fedavg", "fedavg-flip", apps=flip), honest_only)
    assert damage > 0.1
    for rule in RULES:
        assert dist(model(rule, f"{rule}-flip", apps=flip), honest_only) < 1e-3 * damage, rule
