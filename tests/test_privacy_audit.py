"""``fedcare audit``: the membership-inference audit writes its AUC next to each site's ε."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
from typer.testing import CliRunner

from fedcare.server.audit import attack
from fedcare.shared.cli import _attach, app
from fedcare.shared.config import RunConfig
from fedcare.simulation.runner import plan_federation, simulate


def test_attack_scores_separable_and_identical_losses() -> None:
    assert attack(np.array([0.1, 0.2]), np.array([1.0, 2.0]))["mia_auc"] == 1.0
    same = attack(np.full(50, 0.5), np.full(50, 0.5))
    assert same["mia_auc"] == 0.5 and same["mia_advantage"] == 0.0


def test_audit_command_writes_auc_beside_epsilon(tmp_path: Path) -> None:
    cfg = RunConfig.from_mapping({**RunConfig().to_mapping(), "num-rounds": 1})
    run = simulate(cfg, plan_federation(cfg, epsilon=2.0, delta=1e-5), out=tmp_path / "run")
    _attach()
    result = CliRunner().invoke(app, ["audit", str(run)], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    audit = json.loads((run / "audit.json").read_text())
    summary = json.loads((run / "summary.json").read_text())
    assert set(audit["sites"]) == set(summary["sites"]) == {"cleveland", "hungary", "switzerland", "va_long_beach"}
    for name, entry in audit["sites"].items():
        assert 0.0 <= entry["mia_auc"] <= 1.0 and 0.0 <= entry["mia_auc_calibrated"] <= 1.0
        assert entry["epsilon"] == summary["sites"][name]["epsilon"] <= 2.0
        assert summary["sites"][name]["mia_auc"] == entry["mia_auc"]
        assert entry["members"] > entry["non_members"] > 0
    assert math.isfinite(summary["mean_mia_auc"])
