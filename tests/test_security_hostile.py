"""Hostile and broken hospitals: every bad reply is rejected with a reason; the run goes on."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedcare.client.app import app as honest_app
from fedcare.server import validation
from fedcare.shared.config import RunConfig
from fedcare.simulation.runner import _server_identity, plan_federation, simulate

REF = {"w": np.ones((3, 2), dtype=np.float32), "b": np.zeros(2, dtype=np.float32)}


def _reply(content: RecordDict | Error, node: int = 7) -> Message:
    with _server_identity(1):  # Flower stamps messages with the running task's identity
        req = Message(RecordDict(), dst_node_id=node, message_type="train")
    req.metadata.__dict__["_message_id"] = "m1"
    return Message(content, reply_to=req)


def _good(**changes) -> RecordDict:
    arrays = {k: v.copy() + 0.01 for k, v in REF.items()}
    metrics: dict = {"num-examples": 100, "train-loss": 0.5, "epsilon": 0.3, "delta": 1e-5}
    records = {"arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
               "metrics": MetricRecord(metrics), "site": ConfigRecord({"name": "honest"})}
    for key, value in changes.items():
        if value is None:
            records.pop(key)
        else:
            records[key] = value
    return RecordDict(records)


def _arrays(**arrays) -> ArrayRecord:
    return ArrayRecord({k: Array(np.asarray(v)) for k, v in arrays.items()})


HOSTILE: dict[str, Callable[[], Message]] = {
    "error reply": lambda: _reply(Error(4199, "boom")),
    "no metrics": lambda: _reply(_good(metrics=None)),
    "missing arrays": lambda: _reply(_good(arrays=None)),
    "missing array name": lambda: _reply(_good(arrays=_arrays(w=REF["w"]))),
    "extra array name": lambda: _reply(_good(arrays=_arrays(w=REF["w"], b=REF["b"], x=REF["b"]))),
    "wrong shape": lambda: _reply(_good(arrays=_arrays(w=np.ones((2, 3), np.float32), b=REF["b"]))),
    "wrong dtype": lambda: _reply(_good(arrays=_arrays(w=REF["w"].astype(np.float64), b=REF["b"]))),
    "NaN": lambda: _reply(_good(arrays=_arrays(w=np.full((3, 2), np.nan, np.float32), b=REF["b"]))),
    "Inf": lambda: _reply(_good(arrays=_arrays(w=REF["w"], b=np.array([np.inf, 0], np.float32)))),
    "huge norm": lambda: _reply(_good(arrays=_arrays(w=REF["w"] * 1e6, b=REF["b"]))),
    "zero examples": lambda: _reply(_good(metrics=MetricRecord({"num-examples": 0}))),
    "negative examples": lambda: _reply(_good(metrics=MetricRecord({"num-examples": -5}))),
    "absurd examples": lambda: _reply(_good(metrics=MetricRecord({"num-examples": 10 ** 12}))),
    "fractional examples": lambda: _reply(_good(metrics=MetricRecord({"num-examples": 2.5}))),
    "non-scalar metric": lambda: _reply(_good(metrics=MetricRecord({"num-examples": 5, "train-loss": [1.0, 2.0]}))),
    "non-finite metric": lambda: _reply(_good(metrics=MetricRecord({"num-examples": 5, "train-loss": math.inf}))),
    "extra array record": lambda: _reply(_good(extra=_arrays(x=REF["b"]))),
    "extra metric record": lambda: _reply(_good(more=MetricRecord({"x": 1}))),
    "extra config record": lambda: _reply(_good(smuggled=ConfigRecord({"rows": "1,2,3"}))),
}


def test_a_good_reply_passes() -> None:
    assert validation.check_train_reply(_reply(_good()), REF, 1e4).ok


@pytest.mark.parametrize("kind", sorted(HOSTILE))
def test_hostile_reply_is_rejected_with_a_reason(kind: str) -> None:
    verdict = validation.check_train_reply(HOSTILE[kind](), REF, 1e4)
    assert not verdict.ok and verdict.reason


def test_a_count_above_the_declared_one_is_rejected() -> None:
    msg = _reply(_good())  # claims 100 examples
    assert validation.check_declared_count(msg, 100).ok and validation.check_declared_count(msg, 250).ok
    verdict = validation.check_declared_count(msg, 99)
    assert not verdict.ok and "100" in verdict.reason and "the 99 declared" in verdict.reason
    assert validation.check_declared_count(msg, 0).ok  # nothing declared (no SiteStatus): no bound


@pytest.mark.parametrize("name", ["../../etc/passwd", "a" * 200, "", "x y", "naïve"])
def test_garbage_site_names_fall_back_to_node_id(name: str) -> None:
    msg = _reply(_good(site=ConfigRecord({"name": name})), node=9)
    assert validation.site_name(msg) == "node-9"


# ---- hostile hospitals inside a real in-process run --------------------------------------
def _global(msg: Message) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in msg.content["arrays"].items()}


def corrupting(corrupt: Callable[[Message, Message], Message]) -> ClientApp:
    """The real ClientApp, with its honest train reply corrupted before it is sent."""
    app = ClientApp()

    @app.train()
    def train(msg, context):
        return corrupt(msg, honest_app(msg, context))

    @app.query()
    def query(msg, context):
        return honest_app(msg, context)

    @app.evaluate()
    def evaluate(msg, context):
        return honest_app(msg, context)

    return app


def _replace_arrays(reply: Message, fn) -> Message:
    arrays = {k: v.numpy() for k, v in reply.content["arrays"].items()}
    reply.content["arrays"] = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in fn(arrays).items()})
    return reply


def _nan(msg, reply):
    return _replace_arrays(reply, lambda a: {k: np.full_like(v, np.nan) for k, v in a.items()})


def _shape(msg, reply):
    return _replace_arrays(reply, lambda a: {k: v.reshape(-1) for k, v in a.items()})


def _count(msg, reply):
    reply.content["metrics"]["num-examples"] = 10 ** 9 + 1
    return reply


def _inflate(msg, reply):  # plausible in itself, but 10x what the site declared
    reply.content["metrics"]["num-examples"] = 10 * int(reply.content["metrics"]["num-examples"])
    return reply


def _smuggle(msg, reply):
    reply.content["rows"] = ConfigRecord({"record": "63,1,1,145,233"})
    return reply


def _crash(msg, reply):
    raise RuntimeError("patient 63,1,1,145,233")  # the grid must not forward this text


def scaled(factor: float):
    def corrupt(msg, reply):
        g = _global(msg)
        return _replace_arrays(reply, lambda a: {k: (g[k] + factor * (v - g[k])).astype(v.dtype) for k, v in a.items()})
    return corrupt


def _statuses(run: Path) -> dict[int, str]:
    with (run / "metrics.csv").open() as fh:
        return {int(r["node_id"]): r["status"] for r in csv.DictReader(fh) if r["phase"] == "train"}


def test_hostile_hospitals_are_excluded_and_the_run_goes_on(tmp_path: Path) -> None:
    cfg = RunConfig.from_mapping({**RunConfig().to_mapping(), "num-rounds": 1, "partition": "iid",
                                  "num-sites": 8})
    fed = plan_federation(cfg, epsilon=math.inf, delta=1e-5)
    hostile = {1: _nan, 2: _shape, 3: _count, 4: _smuggle, 5: _crash, 6: _inflate}
    out = simulate(cfg, fed, out=tmp_path / "hostile", apps={n: corrupting(f) for n, f in hostile.items()})
    statuses = _statuses(out)
    assert "NaN" in statuses[1] and "shape" in statuses[2] and "num-examples" in statuses[3]
    assert "unexpected record" in statuses[4] and "code 4199" in statuses[5] and "declared" in statuses[6]
    assert "patient" not in (out / "metrics.csv").read_text()
    assert not any(n in statuses for n in (7, 8))  # honest sites: accepted, no rejection row

    # The aggregate is exactly that of the honest sites alone.
    clean = simulate(cfg, fed, out=tmp_path / "honest-only",
                     unreachable=lambda node, msg: node in hostile and msg.metadata.message_type == "train")
    a, b = torch.load(out / "model.pt"), torch.load(clean / "model.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_hospital_inflating_its_count_after_preprocessing_is_rejected(tmp_path: Path) -> None:
    """Honest in the preprocessing round, then 100x the count in every (valid) train reply."""
    cfg = RunConfig.from_mapping({**RunConfig().to_mapping(), "num-rounds": 2})  # the heart hospitals
    fed = plan_federation(cfg, epsilon=math.inf, delta=1e-5)
    honest: list[int] = []

    def inflate(msg, reply):
        honest.append(int(reply.content["metrics"]["num-examples"]))
        reply.content["metrics"]["num-examples"] = 100 * honest[-1]
        return reply

    out = simulate(cfg, fed, out=tmp_path / "inflated", apps={2: corrupting(inflate)})
    n = honest[0]
    assert honest == [n, n]  # the update itself was the honest one, in both rounds
    with (out / "metrics.csv").open() as fh:
        rows = [r for r in csv.DictReader(fh) if r["phase"] == "train"]
    assert [(int(r["round"]), int(r["node_id"])) for r in rows] == [(1, 2), (2, 2)]  # others: accepted
    for r in rows:
        assert r["status"] == f"rejected: num-examples {100 * n} exceeds the {n} declared in the preprocessing round"

    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds"] == 2 and len(summary["sites"]) == fed.size
    assert summary["sites"][rows[0]["site"]]["num_train"] == n  # the declared count, never the inflated one

    # The run went on: the global model is exactly the aggregate of the three honest sites.
    clean = simulate(cfg, fed, out=tmp_path / "honest-only",
                     unreachable=lambda node, msg: node == 2 and msg.metadata.message_type == "train")
    a, b = torch.load(out / "model.pt"), torch.load(clean / "model.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_robust_aggregation_resists_a_scaled_update(tmp_path: Path) -> None:
    def model(strategy: str, attack: bool) -> dict[str, torch.Tensor]:
        cfg = RunConfig.from_mapping({**RunConfig().to_mapping(), "num-rounds": 1, "strategy": strategy})
        apps = {4: corrupting(scaled(100.0))} if attack else None
        out = simulate(cfg, plan_federation(cfg, epsilon=math.inf, delta=1e-5),
                       out=tmp_path / f"{strategy}-{attack}", apps=apps)
        return torch.load(out / "model.pt")

    def dist(a, b) -> float:
        return math.sqrt(sum(float(((a[k] - b[k]).double() ** 2).sum()) for k in a))

    clean_median, attacked_median = model("median", False), model("median", True)
    attacked_avg = model("fedavg", True)
    assert dist(attacked_median, clean_median) < 0.1 * dist(attacked_avg, clean_median)
