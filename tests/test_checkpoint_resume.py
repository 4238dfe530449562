"""A run killed after round k and resumed ends exactly where an uninterrupted run ends.

The interrupted run is a real separate process killed with SIGKILL once its round-k
checkpoint is on disk (it is held inside round k+1, after that round's rows were already
written, so resuming must also cut those rows). FedAdam (server optimiser moments) and
DP-SGD with reproducible noise, and the coordinator's moving average of the model
(``ema-decay``, in the checkpoint): the final weights, the per-site ε, every metric row and
the best validation round must equal the uninterrupted run's, whether that round comes
after the checkpoint (k = 2) or is the checkpoint's own round (k = 3).
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from fedcare.server import checkpoint
from fedcare.shared.config import RunConfig
from fedcare.shared.errors import ConfigError
from fedcare.simulation.runner import plan_federation, resume, simulate

CONFIG = {"dataset": "breast-cancer", "partition": "iid", "num-sites": 2, "num-rounds": 4,
          "strategy": "fedadam", "reproducible-noise": True, "seed": 3, "val-fraction": 0.2, "ema-decay": 0.5}

KILLED_RUN = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from fedcare.server.events import Observer
    from fedcare.shared.config import RunConfig
    from fedcare.simulation.runner import plan_federation, simulate

    class HoldInRound(Observer):
        def round_done(self, rnd, *args, **kwargs):
            if rnd == int(sys.argv[2]):
                time.sleep(600)  # the test kills the process here

    cfg = RunConfig.from_mapping({**RunConfig().to_mapping(), **%r})
    simulate(cfg, plan_federation(cfg, epsilon=1.0, delta=1e-5), out=Path(sys.argv[1]),
             observer=HoldInRound())
""") % (CONFIG,)


def _config() -> RunConfig:
    return RunConfig.from_mapping({**RunConfig().to_mapping(), **CONFIG})


def _rows(path: Path) -> list[dict]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def _kill_after_round(tmp_path: Path, k: int) -> Path:
    out = tmp_path / "killed"
    partial = out.with_name("killed.partial")
    script = tmp_path / "killed_run.py"
    script.write_text(KILLED_RUN)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, str(script), str(out), str(k + 1)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            ckpt = partial / checkpoint.FILE
            if ckpt.exists():
                try:
                    if checkpoint.load(ckpt).round == k:
                        rounds = _rows(partial / "rounds.csv")
                        if rounds and rounds[-1]["round"] == str(k + 1):
                            break
                except ConfigError:
                    pass  # caught between write and rename: try again
            assert time.monotonic() < deadline, f"the run never reached round {k + 1}"
            time.sleep(0.2)
        proc.send_signal(signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)
        proc.stderr.close()
    return partial


@pytest.mark.parametrize("k", [2, 3])
def test_killed_run_resumes_to_the_uninterrupted_result(tmp_path, k):
    partial = _kill_after_round(tmp_path, k)
    assert not (tmp_path / "killed").exists()
    assert _rows(partial / "rounds.csv")[-1]["round"] == str(k + 1)  # rows past the checkpoint exist...

    cfg = _config()
    reference = simulate(cfg, plan_federation(cfg, epsilon=1.0, delta=1e-5), out=tmp_path / "reference")
    resumed = resume(partial)

    assert resumed == tmp_path / "killed" and not partial.exists()
    for name in ("model.pt", "model_best_val.pt"):
        ref_w = torch.load(reference / name, weights_only=True)
        res_w = torch.load(resumed / name, weights_only=True)
        assert ref_w.keys() == res_w.keys()
        for k in ref_w:
            assert torch.equal(ref_w[k], res_w[k]), (name, k)

    ref, res = (json.loads((f / "summary.json").read_text()) for f in (reference, resumed))
    for name in ref["sites"]:
        # ε continued from the restored accountant history instead of restarting at zero.
        assert res["sites"][name]["epsilon"] == pytest.approx(ref["sites"][name]["epsilon"], rel=0, abs=0)
        assert res["sites"][name]["accuracy"] == ref["sites"][name]["accuracy"]
    assert 0.9 < ref["max_epsilon"] <= 1.0
    if k == 3:
        # The best round is one the resumed run did not replay: its values come from the
        # checkpoint, exactly (rounds.csv has them to 6 significant digits only).
        assert ref["validation"]["best_round"] <= k
    assert res["validation"] == ref["validation"]

    # ...and were cut back: every round appears once, identical to the reference.
    assert [r["round"] for r in _rows(resumed / "rounds.csv")] == ["1", "2", "3", "4"]
    drop = {"node_id"}
    strip = lambda rows: [{k: v for k, v in r.items() if k not in drop} for r in rows]  # noqa: E731
    assert strip(_rows(resumed / "metrics.csv")) == strip(_rows(reference / "metrics.csv"))
    assert not (resumed / checkpoint.FILE).exists()


def test_checkpoint_round_trips_strategy_state_and_rng(tmp_path):
    import random

    state = {"m_t": {"w": np.arange(3.0)}, "v_t": {"w": np.ones(3)}}
    rnd_state, torch_rng = checkpoint.capture_rng()
    ckpt = checkpoint.Checkpoint(round=5, config={"seed": 1}, global_arrays={"w": np.ones((2, 2), np.float32)},
                                 prep={"mean": np.zeros(3)}, strategy_state=state,
                                 node_states={7: b"\x00\x01state"}, random_state=rnd_state, torch_rng=torch_rng,
                                 best=(4, 0.8470588235294118, 0.1 + 0.2))
    checkpoint.save(tmp_path, ckpt)
    expected = random.random()
    back = checkpoint.load(tmp_path / checkpoint.FILE)
    checkpoint.restore_rng(back)
    assert random.random() == expected
    assert back.round == 5 and back.node_states == {7: b"\x00\x01state"}
    assert np.array_equal(back.strategy_state["m_t"]["w"], np.arange(3.0))
    assert back.global_arrays["w"].dtype == np.float32
    assert back.best == (4, 0.8470588235294118, 0.1 + 0.2)  # exact, not to 6 digits


def test_resume_refuses_what_it_cannot_continue(tmp_path):
    with pytest.raises(ConfigError, match="no interrupted run"):
        checkpoint.locate(tmp_path / "nothing")
    with pytest.raises(ConfigError, match="differs"):
        checkpoint.check_compatible({"num-rounds": 4, "seed": 1}, {"num-rounds": 5, "seed": 1}, tmp_path)
    checkpoint.check_compatible({"num-rounds": 4, "resume": ""}, {"num-rounds": 4, "resume": "x"}, tmp_path)
    # A key newer than the checkpoint matches when the resumed run leaves it at its default.
    checkpoint.check_compatible({"num-rounds": 4}, {"num-rounds": 4, "ema-decay": 0.0}, tmp_path)
    with pytest.raises(ConfigError, match="ema-decay"):
        checkpoint.check_compatible({"num-rounds": 4}, {"num-rounds": 4, "ema-decay": 0.5}, tmp_path)


def test_cli_resume_of_a_folder_without_checkpoint_fails_cleanly(tmp_path):
    from typer.testing import CliRunner

    from fedcare.shared.cli import _attach, app

    (tmp_path / "run.partial").mkdir()
    _attach()
    result = CliRunner().invoke(app, ["simulate", "--resume", str(tmp_path / "run")])
    assert result.exit_code != 0
    assert isinstance(result.exception, ConfigError) and "no interrupted run" in str(result.exception)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.partial"]


def test_an_older_checkpoint_keeps_splitting_files_by_its_run_seed():
    from fedcare.simulation.runner import with_split_seeds

    old = {1: {"data": "/h/a.csv", "site": "a"}, 2: {"data": "/h/b.csv", "split-seed": 5}, 3: {"partition-id": 0}}
    assert with_split_seeds(old, 7) == {1: {"data": "/h/a.csv", "site": "a", "split-seed": 7},
                                        2: {"data": "/h/b.csv", "split-seed": 5}, 3: {"partition-id": 0}}
