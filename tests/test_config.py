"""Run and node configuration: parsed once, unknown keys rejected, pyproject agrees."""

from __future__ import annotations

import math
import tomllib
from pathlib import Path

import pytest

from fedcare.shared.config import RunConfig, SiteConfig
from fedcare.shared.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def test_pyproject_run_config_agrees_with_code_defaults():
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert declared == RunConfig().to_mapping()


def test_pyproject_run_config_parses():
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert RunConfig.from_mapping(declared) == RunConfig()


def test_unknown_run_config_key_is_rejected_by_name():
    with pytest.raises(ConfigError, match="num-round"):
        RunConfig.from_mapping({"num-round": 3})


def test_wrong_type_names_the_key():
    with pytest.raises(ConfigError, match="num-rounds"):
        RunConfig.from_mapping({"num-rounds": "many"})
    with pytest.raises(ConfigError, match="num-rounds"):
        RunConfig.from_mapping({"num-rounds": 2.5})


def test_invalid_values_are_rejected():
    with pytest.raises(ConfigError, match="strategy"):
        RunConfig.from_mapping({"strategy": "fedwhatever"})
    with pytest.raises(ConfigError, match="num-rounds"):
        RunConfig.from_mapping({"num-rounds": -1})


def test_budget_is_not_a_run_config_key():
    """The coordinator cannot set or raise a hospital's budget through run config."""
    for key in ("epsilon", "delta", "target-epsilon", "data"):
        with pytest.raises(ConfigError, match=key):
            RunConfig.from_mapping({key: 100.0})


def test_task_defaults_fill_sentinels_only():
    cfg = RunConfig.from_mapping({"lr": 0.3}).resolved({"lr": 0.05, "batch_size": 16, "dataset": "heart"})
    assert cfg.lr == 0.3 and cfg.batch_size == 16 and cfg.dataset == "heart"


def test_site_config_parses_budget_and_infinity():
    cfg = SiteConfig.from_mapping({"epsilon": "inf", "delta": 1e-6, "data": "/x.csv"})
    assert math.isinf(cfg.epsilon) and not cfg.private
    assert SiteConfig.from_mapping({"epsilon": 2}).private
    with pytest.raises(ConfigError, match="epsilon"):
        SiteConfig.from_mapping({"epsilon": -1})
    with pytest.raises(ConfigError, match="delta"):
        SiteConfig.from_mapping({"delta": 1.5})
    with pytest.raises(ConfigError, match="budget"):
        SiteConfig.from_mapping({"budget": 3})


def test_cosine_lr_schedule_decays_over_the_run_and_constant_stays():
    from fedcare.client.training import round_lr

    cosine = RunConfig.from_mapping({"lr": 0.1, "num-rounds": 10, "lr-schedule": "cosine"})
    rates = [round_lr(cosine, r) for r in range(1, 11)]
    assert rates[0] == pytest.approx(0.1) and rates[5] == pytest.approx(0.05)
    assert all(a > b for a, b in zip(rates, rates[1:])) and 0 < rates[-1] < 0.003
    assert round_lr(cosine, 99) == pytest.approx(0.0)  # a round number past the run is clamped
    constant = RunConfig.from_mapping({"lr": 0.1, "num-rounds": 10})
    assert {round_lr(constant, r) for r in range(1, 11)} == {0.1}
    with pytest.raises(ConfigError, match="lr-schedule"):
        RunConfig.from_mapping({"lr-schedule": "step"})
