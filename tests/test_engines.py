"""The simulator's engines: the in-process grid streams replies and carries node state
through checkpoints; ``--engine ray`` runs the same apps on Flower's Ray engine."""

from __future__ import annotations

import json

import pytest
from flwr.app import ConfigRecord, Message, MessageType, RecordDict

_CR = ConfigRecord

from fedcare.client.app import app as client_app
from fedcare.shared.config import RunConfig
from fedcare.shared.errors import ConfigError
from fedcare.simulation.grid import InProcessGrid, node_configs_from_states

SMALL = {"dataset": "breast-cancer", "partition": "iid", "num-sites": 3, "num-rounds": 1}


def _cfg(**extra) -> RunConfig:
    return RunConfig.from_mapping({**RunConfig().to_mapping(), **SMALL, **extra})


def _grid(tapped: list) -> InProcessGrid:
    nodes = {i + 1: {"partition-id": i, "num-partitions": 3, "epsilon": 1.0, "delta": 1e-5} for i in range(3)}
    return InProcessGrid(client_app, nodes, _cfg().to_mapping(), tap=tapped.append)


def test_replies_are_computed_one_at_a_time_as_the_server_consumes_them(server_identity):
    tapped: list = []
    grid = _grid(tapped)
    msgs = [Message(RecordDict({"config": _CR({"server-round": 0})}), dst_node_id=n,
                    message_type=MessageType.QUERY) for n in (1, 2, 3)]
    replies = grid.send_and_receive(msgs)
    assert tapped == []  # nothing computed before the server asks
    first = next(iter(replies))
    assert len(tapped) == 1 and first.metadata.src_node_id == 1
    rest = list(replies)
    assert [m.metadata.src_node_id for m in rest] == [2, 3] and len(tapped) == 3
    assert not any(m.has_error() for m in [first, *rest])


def test_node_state_and_config_survive_a_checkpoint_round_trip():
    grid = _grid([])
    grid.context(2).state.config_records["fedcare.privacy"] = ConfigRecord({"history-steps": [3, 4]})
    blobs = grid.node_states()
    assert node_configs_from_states(blobs)[2]["partition-id"] == 1

    fresh = _grid([])
    fresh.restore_node_states(blobs)
    assert list(fresh.context(2).state.config_records["fedcare.privacy"]["history-steps"]) == [3, 4]
    assert "fedcare.node-config" not in fresh.context(2).state  # never shown to the ClientApp
    with pytest.raises(ValueError, match="lacks"):
        fresh.restore_node_states({99: blobs[1]})


@pytest.mark.slow
def test_ray_engine_runs_the_same_apps(tmp_path):
    ray = pytest.importorskip("ray")
    from fedcare.simulation.ray_engine import simulate_ray

    cfg = _cfg(**{"num-sites": 2})
    with pytest.raises(ConfigError, match="default budget"):
        simulate_ray(cfg, out=tmp_path / "refused", epsilon=3.0)
    folder = simulate_ray(cfg, out=tmp_path / "ray", num_cpus_per_client=1.0,
                          backend_init_args={"num_cpus": 2, "include_dashboard": False})
    assert not ray.is_initialized()  # Flower's engine shut Ray down
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["rounds"] == 1 and len(summary["sites"]) == 2
    for site in summary["sites"].values():  # the ClientApp's own default budget applied
        assert site["dp"] and 0 < site["epsilon"] <= 1.0 and site["delta"] == 1e-5
    assert (folder / "report.html").exists() and (folder / "model.ts").exists()
