"""The coordinator's moving average of the global model (run-config ``ema-decay``).

The average is what the sites evaluate and what the run saves; training itself must go
on from the plain aggregate, and a site's ε must not move.
"""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from fedcare.server import averaging
from fedcare.shared.config import RunConfig
from fedcare.shared.errors import ConfigError
from fedcare.simulation.runner import plan_federation, simulate

BASE = {"dataset": "breast-cancer", "partition": "iid", "num-sites": 2, "seed": 5}


def _run(tmp_path, name: str, epsilon: float, **changes):
    cfg = RunConfig.from_mapping({**BASE, **changes})
    return simulate(cfg, plan_federation(cfg, epsilon=epsilon, delta=1e-5), out=tmp_path / name)


def _weights(run) -> dict[str, torch.Tensor]:
    return torch.load(run / "model.pt", weights_only=True)


def _rounds(run) -> list[dict]:
    with (run / "rounds.csv").open(newline="") as fh:
        return list(csv.DictReader(fh))


def test_average_starts_at_the_first_aggregate_and_blends_floats_only():
    first = {"w": np.array([1.0, 2.0], np.float32), "n": np.array([3], np.int64)}
    avg = averaging.updated(None, first, 0.75)
    assert np.array_equal(avg["w"], first["w"]) and avg["w"] is not first["w"]
    avg = averaging.updated(avg, {"w": np.array([5.0, 6.0], np.float32), "n": np.array([4], np.int64)}, 0.75)
    assert np.allclose(avg["w"], [2.0, 3.0]) and avg["w"].dtype == np.float32
    assert avg["n"].tolist() == [4]  # a counter is taken as it is, never averaged


def test_saved_model_is_the_average_of_the_rounds_while_training_follows_the_aggregate(tmp_path):
    # Without DP a round's aggregate does not depend on how many rounds the run has.
    g1, g2 = (_weights(_run(tmp_path, f"r{r}", float("inf"), **{"num-rounds": r})) for r in (1, 2))
    plain_run = _run(tmp_path, "plain", float("inf"), **{"num-rounds": 3})
    averaged_run = _run(tmp_path, "avg", float("inf"), **{"num-rounds": 3, "ema-decay": 0.25})
    g3, averaged = _weights(plain_run), _weights(averaged_run)
    assert averaged.keys() == g3.keys()
    moved = False
    for k in g3:
        # Had round 3 trained from the average of rounds 1-2, g3 and this blend would differ.
        expected = 0.25 * (0.25 * g1[k] + 0.75 * g2[k]) + 0.75 * g3[k]
        assert torch.allclose(averaged[k], expected, atol=1e-6), k
        moved |= not torch.allclose(g2[k], g3[k])
    assert moved
    plain, avg = _rounds(plain_run), _rounds(averaged_run)
    assert plain[0] == avg[0]  # round 1: the average is the aggregate
    assert plain[2]["loss"] != avg[2]["loss"]  # round 3: the sites evaluated the average
    card = json.loads((averaged_run / "model_card.json").read_text())
    assert card["training"]["ema_decay"] == 0.25
    assert "moving average" in (averaged_run / "model_card.md").read_text()
    assert "moving average" not in (plain_run / "model_card.md").read_text()


def test_average_costs_no_epsilon(tmp_path):
    runs = [_run(tmp_path, f"dp{d}", 1.0, **{"num-rounds": 3, "reproducible-noise": True, "ema-decay": d})
            for d in (0.0, 0.5)]
    plain, averaged = (json.loads((r / "summary.json").read_text()) for r in runs)
    for site in plain["sites"]:
        assert averaged["sites"][site]["epsilon"] == plain["sites"][site]["epsilon"] > 0


def test_decay_outside_zero_to_one_is_refused_by_name():
    for bad in (1.0, -0.1):
        with pytest.raises(ConfigError, match="ema-decay"):
            RunConfig.from_mapping({"ema-decay": bad})
