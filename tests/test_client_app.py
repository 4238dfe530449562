"""The hospital's ClientApp, called with real Flower Messages and Contexts.

Covers the privacy contract of issue 2: ε is cumulative and exact across rounds, a
round that would exceed the budget is refused without training, the server cannot
raise the budget, and error replies carry no data values.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from opacus.accountants import PRVAccountant, RDPAccountant

from fedcare.client.app import PRIVACY_STATE, app as client_app
from fedcare.client.privacy import ALPHAS
from fedcare.shared import errors
from fedcare.shared.arrays import to_numpy, to_record
from fedcare.shared.config import RunConfig, SiteConfig
from fedcare.shared.registry import get_task

from .conftest import small_config

pytestmark = pytest.mark.usefixtures("server_identity")


def _context(node_config: dict, run: RunConfig) -> Context:
    return Context(run_id=1, node_id=7, node_config=node_config, state=RecordDict(), run_config=run.to_mapping())


def _global_model(run: RunConfig) -> ArrayRecord:
    task = get_task(run.task)
    torch.manual_seed(0)
    return to_record(task.shared_state(task.build_model(run.resolved(task.defaults))))


def _ask(ctx: Context, mtype: str, content: dict) -> Message:
    return client_app(Message(RecordDict(content), dst_node_id=ctx.node_id, message_type=mtype), ctx)


def _prep(ctx: Context, run: RunConfig) -> ArrayRecord:
    reply = _ask(ctx, MessageType.QUERY, {"config": ConfigRecord({"server-round": 0})})
    assert not reply.has_error()
    task = get_task(run.task)
    prep = task.finalize_stats(to_numpy(reply.content["stats"]), run.resolved(task.defaults))
    return to_record(prep)


def _train(ctx, run, rnd, prep, extra_config=None):
    config = {"server-round": rnd, **(extra_config or {})}
    return _ask(ctx, MessageType.TRAIN, {"arrays": _global_model(run), "config": ConfigRecord(config),
                                         "preprocess": prep})


def test_stats_reply_holds_sums_not_rows(heart_csvs):
    run = small_config()
    ctx = _context({"data": str(heart_csvs[0]), "epsilon": 1.0}, run)
    reply = _ask(ctx, MessageType.QUERY, {"config": ConfigRecord({"server-round": 0})})
    stats = to_numpy(reply.content["stats"])
    assert set(stats) == {"count", "sum", "sumsq"}
    assert all(v.ndim == 1 and len(v) == 13 for v in stats.values())
    assert reply.content["site"]["name"] == heart_csvs[0].stem


def test_epsilon_is_cumulative_and_matches_an_independent_accountant(heart_csvs):
    run = small_config(num_rounds=3)
    ctx = _context({"data": str(heart_csvs[0]), "epsilon": 2.0, "delta": 1e-5}, run)
    prep = _prep(ctx, run)
    reported = []
    for rnd in (1, 2, 3):
        reply = _train(ctx, run, rnd, prep)
        assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
        m = reply.content["metrics"]
        reported.append((m["epsilon"], m["noise-multiplier"], m["steps"], m["num-examples"]))
    eps = [r[0] for r in reported]
    assert eps[0] < eps[1] < eps[2] <= 2.0
    assert eps[2] > 0.99 * 2.0, "noise is calibrated so the whole run ends at its budget"
    sigma, steps, n = reported[0][1], reported[0][2], reported[0][3]
    q = 1 / math.ceil(n / run.resolved(get_task("diagnosis").defaults).batch_size)  # Opacus' Poisson rate
    for r, e in enumerate(eps, start=1):
        rdp, prv = RDPAccountant(), PRVAccountant()
        rdp.history = prv.history = [(sigma, q, steps * r)]
        assert e == pytest.approx(min(rdp.get_epsilon(1e-5, alphas=ALPHAS), prv.get_epsilon(1e-5)), rel=1e-6)


def test_round_beyond_budget_is_refused_without_training(heart_csvs):
    run = small_config(num_rounds=2)
    ctx = _context({"data": str(heart_csvs[1]), "epsilon": 1.0}, run)
    prep = _prep(ctx, run)
    for rnd in (1, 2):
        assert not _train(ctx, run, rnd, prep).has_error()
    history_before = dict(ctx.state.config_records[PRIVACY_STATE])
    reply = _train(ctx, run, 3, prep)  # the server asks for more rounds than planned
    assert reply.has_error() and reply.error.code == errors.BUDGET_REFUSED
    assert "epsilon" in reply.error.reason and "budget 1" in reply.error.reason
    assert dict(ctx.state.config_records[PRIVACY_STATE]) == history_before


def test_server_cannot_raise_the_budget(heart_csvs):
    run = small_config()
    ctx = _context({"data": str(heart_csvs[0]), "epsilon": 1.0}, run)
    prep = _prep(ctx, run)
    reply = _train(ctx, run, 1, prep, extra_config={"epsilon": 100.0})
    assert reply.has_error() and reply.error.code == errors.CONFIG_REJECTED
    bad_run = dict(run.to_mapping(), epsilon=100.0)
    ctx2 = Context(run_id=1, node_id=8, node_config={"data": str(heart_csvs[0]), "epsilon": 1.0},
                   state=RecordDict(), run_config=bad_run)
    reply = _ask(ctx2, MessageType.QUERY, {"config": ConfigRecord({"server-round": 0})})
    assert reply.has_error() and reply.error.code == errors.CONFIG_REJECTED
    ok = _train(ctx, run, 1, prep)
    assert ok.content["metrics"]["epsilon"] <= 1.0


def test_train_reply_matches_the_global_model(heart_csvs):
    run = small_config()
    ctx = _context({"data": str(heart_csvs[0]), "epsilon": "inf"}, run)
    prep = _prep(ctx, run)
    reply = _train(ctx, run, 1, prep)
    sent = _global_model(run)
    arrays = reply.content["arrays"]
    assert set(arrays.keys()) == set(sent.keys())
    assert all(arrays[k].shape == sent[k].shape for k in sent.keys())
    assert any(not np.array_equal(arrays[k].numpy(), sent[k].numpy()) for k in sent.keys())
    assert reply.content["metrics"]["epsilon"] == -1.0  # no DP: reported as "not accounted"
    assert math.isfinite(reply.content["metrics"]["train-loss"])


def test_a_dp_site_sends_no_training_loss(heart_csvs):
    """The loss over a round's sampled records is exact, outside ε: a DP site keeps it."""
    run = small_config()
    ctx = _context({"data": str(heart_csvs[0]), "epsilon": 1.0}, run)
    reply = _train(ctx, run, 1, _prep(ctx, run))
    metrics = reply.content["metrics"]
    assert "train-loss" not in metrics
    assert metrics["epsilon"] > 0 and metrics["noise-multiplier"] > 0 and metrics["steps"] > 0


def test_evaluate_reply_has_task_metrics(heart_csvs):
    run = small_config()
    ctx = _context({"data": str(heart_csvs[0]), "epsilon": 1.0}, run)
    prep = _prep(ctx, run)
    reply = _ask(ctx, MessageType.EVALUATE, {"arrays": _global_model(run), "config": ConfigRecord({"server-round": 1}),
                                             "preprocess": prep})
    m = reply.content["metrics"]
    for key in ("accuracy", "precision", "recall", "f1", "roc_auc", "num-examples", "loss"):
        assert key in m
    assert not reply.content.array_records


def test_error_replies_carry_no_data_values(tmp_path, heart_csvs):
    text = heart_csvs[0].read_text().splitlines()
    secret = "731.25"
    text[5] = text[5].replace(text[5].split(",")[0], "SECRET" + secret, 1)
    bad = tmp_path / "bad.csv"
    bad.write_text("\n".join(text) + "\n")
    run = small_config()
    ctx = _context({"data": str(bad), "epsilon": 1.0}, run)
    reply = _ask(ctx, MessageType.QUERY, {"config": ConfigRecord({"server-round": 0})})
    assert reply.has_error() and reply.error.code == errors.DATA_INVALID
    assert secret not in reply.error.reason and "SECRET" not in reply.error.reason
    assert reply.error.reason == errors.WIRE_REASONS[errors.DATA_INVALID]
    assert not reply.has_content()


def test_malformed_global_model_is_an_error_reply_not_a_crash(heart_csvs):
    run = small_config()
    ctx = _context({"data": str(heart_csvs[0]), "epsilon": 1.0}, run)
    prep = _prep(ctx, run)
    bad = ArrayRecord({"weight": to_record({"x": np.zeros(3)})["x"]})
    reply = _ask(ctx, MessageType.TRAIN, {"arrays": bad, "config": ConfigRecord({"server-round": 1}), "preprocess": prep})
    assert reply.has_error() and reply.error.code in (errors.CONFIG_REJECTED, errors.INTERNAL_ERROR)
    assert math.isfinite(reply.error.code)


def test_a_site_too_small_for_aggregates_refuses_to_share_them(tmp_path, heart_csvs):
    """A sum over one record is that record: tiny sites share no statistics."""
    lines = heart_csvs[0].read_text().splitlines()
    tiny = tmp_path / "tiny.csv"
    tiny.write_text("\n".join(lines[:5]) + "\n")  # four patients: about three to train on
    run = small_config()
    ctx = _context({"data": str(tiny), "epsilon": 1.0}, run)
    reply = _ask(ctx, MessageType.QUERY, {"config": ConfigRecord({"server-round": 0})})
    assert reply.has_error() and reply.error.code == errors.DATA_INVALID
    assert not reply.has_content()
    ok = _context({"data": str(tiny), "epsilon": 1.0, "min-records": 2}, run)
    assert not _ask(ok, MessageType.QUERY, {"config": ConfigRecord({"server-round": 0})}).has_error()


def test_a_test_set_too_small_for_aggregates_is_not_evaluated(tmp_path, heart_csvs):
    """A loss over one test record names its label: tiny test sets report no metrics."""
    lines = heart_csvs[0].read_text().splitlines()
    small = tmp_path / "small.csv"
    small.write_text("\n".join(lines[:13]) + "\n")  # twelve patients: about three to test on
    run = small_config()
    evaluate = {"arrays": _global_model(run), "config": ConfigRecord({"server-round": 1})}
    ctx = _context({"data": str(small), "epsilon": 1.0, "min-records": 6}, run)
    assert not _ask(ctx, MessageType.QUERY, {"config": ConfigRecord({"server-round": 0})}).has_error()
    reply = _ask(ctx, MessageType.EVALUATE, {**evaluate, "preprocess": _prep(ctx, run)})
    assert reply.has_error() and reply.error.code == errors.DATA_INVALID
    assert not reply.has_content()
    ok = _context({"data": str(small), "epsilon": 1.0, "min-records": 2}, run)
    assert not _ask(ok, MessageType.EVALUATE, {**evaluate, "preprocess": _prep(ok, run)}).has_error()


def test_a_hospital_split_seed_fixes_its_training_records_whatever_the_run_seed(heart_csvs):
    """A hospital's split is its own (split-seed, 0 unless it sets another): its sums cover
    the same records in every run, so a coordinator varying the run seed cannot
    difference them."""
    def sums(run_seed: int, node: dict) -> dict[str, np.ndarray]:
        ctx = _context({"data": str(heart_csvs[0]), "epsilon": 1.0, **node}, small_config(seed=run_seed))
        reply = _ask(ctx, MessageType.QUERY, {"config": ConfigRecord({"server-round": 0})})
        return to_numpy(reply.content["stats"])

    def same(a, b) -> bool:
        return all(np.array_equal(a[k], b[k]) for k in a)

    default = [sums(seed, {}) for seed in (1, 2)]
    assert same(*default)
    pinned = [sums(seed, {"split-seed": 7}) for seed in (1, 2)]
    assert same(*pinned)
    assert not same(default[0], pinned[0])  # the seed does deal the split


def test_the_sums_cover_the_same_records_whatever_the_validation_share(heart_csvs):
    """A validation hold-out takes records from training but not from the sums: a
    coordinator varying val-fraction gets identical sums, nothing to difference."""
    def reply(val_fraction: float) -> Message:
        ctx = _context({"data": str(heart_csvs[0]), "epsilon": 1.0, "split-seed": 7},
                       small_config(val_fraction=val_fraction))
        return _ask(ctx, MessageType.QUERY, {"config": ConfigRecord({"server-round": 0})})

    replies = [reply(f) for f in (0.0, 0.1, 0.3)]
    sums = [to_numpy(r.content["stats"]) for r in replies]
    assert all(np.array_equal(sums[0][k], other[k]) for other in sums[1:] for k in sums[0])
    trained = [int(r.content["metrics"]["num-examples"]) for r in replies]
    assert trained[0] > trained[1] > trained[2]  # the hold-outs did take training records


def test_a_hospital_val_fraction_fixes_its_validation_records_whatever_the_run_share(heart_csvs):
    """With its own val-fraction a hospital evaluates the same validation records (and
    trains on the same others) whatever share the coordinator asks for."""
    def evaluate(val_fraction: float, node: dict) -> dict[str, float]:
        run = small_config(val_fraction=val_fraction)
        ctx = _context({"data": str(heart_csvs[0]), "epsilon": 1.0, "split-seed": 7, **node}, run)
        reply = _ask(ctx, MessageType.EVALUATE, {"arrays": _global_model(run), "preprocess": _prep(ctx, run),
                                                 "config": ConfigRecord({"server-round": 1})})
        return dict(reply.content["metrics"])

    pinned = [evaluate(share, {"val-fraction": 0.25}) for share in (0.1, 0.3)]
    assert pinned[0]["num-val"] == pinned[1]["num-val"] > 0
    assert pinned[0]["val_accuracy"] == pinned[1]["val_accuracy"]
    free = [evaluate(share, {}) for share in (0.1, 0.3)]
    assert free[0]["num-val"] < free[1]["num-val"]
    assert "num-val" not in evaluate(0.0, {"val-fraction": 0.25})  # the run asked for no validation


@pytest.mark.parametrize("bad", [0.0, 0.6, -0.1, "a lot"])
def test_a_hospital_val_fraction_out_of_range_is_refused(bad):
    with pytest.raises(errors.ConfigError, match="val-fraction"):
        SiteConfig.from_mapping({"val-fraction": bad})
