"""Shared fixtures: small run configs, heart-disease hospital CSVs, real Flower messages."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from fedcare.shared.config import RunConfig

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _private_fedcare_home(tmp_path_factory, monkeypatch):
    """A hospital's privacy ledger defaults to ~/.fedcare/ledger: tests never touch it."""
    monkeypatch.setenv("FEDCARE_HOME", str(tmp_path_factory.mktemp("fedcare-home")))


def small_config(**changes) -> RunConfig:
    """Heart disease, few rounds: the spine's smallest real federation."""
    base = RunConfig().to_mapping()
    base.update({"num-rounds": 2})
    base.update({k.replace("_", "-"): v for k, v in changes.items()})
    return RunConfig.from_mapping(base)


@pytest.fixture
def heart_csvs(tmp_path: Path) -> list[Path]:
    from fedcare.shared.tasks.diagnosis import export_heart_csvs

    return export_heart_csvs(tmp_path / "hospitals")


@pytest.fixture
def server_identity():
    """Identify the test process as a ServerApp task, as Flower's runtime does."""
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, SUPERLINK_NODE_ID
    yield
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved


INF = math.inf
