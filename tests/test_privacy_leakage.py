"""No patient record leaves a hospital; error replies say nothing; DP noise is unpredictable."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import torch
from flwr.app import Message

from fedcare.client import training
from fedcare.client.site import builtin_partition
from fedcare.server import central_dp
from fedcare.shared import errors
from fedcare.shared.config import RunConfig
from fedcare.shared.registry import get_task
from fedcare.simulation.runner import plan_federation, simulate

#: Words a budget refusal may use besides numbers (its reason is built from numbers only).
BUDGET_WORDS = {"round", "would", "reach", "epsilon", "budget", "at", "delta", "spent", "of", "no", "noise",
                "level", "keeps", "more", "steps", "within", "it", "need", "multiplier"}


def _windows(values: np.ndarray, k: int = 4) -> set[tuple[float, ...]]:
    v = np.round(np.asarray(values, dtype=np.float64).ravel(), 4)
    return {tuple(v[i:i + k]) for i in range(len(v) - k + 1)}


def test_no_record_leaves_a_hospital_and_errors_are_generic(tmp_path: Path) -> None:
    sent: list[Message] = []
    cfg = RunConfig.from_mapping({**RunConfig().to_mapping(), "num-rounds": 2})
    fed = plan_federation(cfg, epsilon=1.0, delta=1e-5)
    fed.node_configs[2]["epsilon"] = 1e-4  # refuses on budget grounds
    bad = tmp_path / "bad.csv"
    bad.write_text("age,sex,cp,trestbps,chol,fbs,restecg,thalach,exang,oldpeak,slope,ca,thal,num\n"
                   "63,1,1,145,233,1,2,150,0,2.3,3,0,6,oops\n")
    fed.node_configs[5] = {"data": str(bad), "epsilon": 1.0, "delta": 1e-5, "ledger": "off", "strict": True}
    out = simulate(cfg, fed, out=tmp_path / "run", tap=sent.append)

    task = get_task("diagnosis")
    resolved = cfg.resolved(task.defaults)
    sites = builtin_partition("diagnosis", "heart", "natural", 4, 0.5, 0)
    with np.load(out / "preprocess.npz") as npz:
        prep = {k: npz[k] for k in npz.files}
    raw_rows, encoded_rows = [], []
    for site in sites:
        for records in (site.train, site.test):
            raw_rows += [row[:4] for row in np.asarray(records.data, dtype=np.float64) if np.isfinite(row[:4]).all()]
            x = task.to_dataset(records, prep, resolved, train=False).tensors[0].numpy()
            encoded_rows += [row[:4] for row in x]
    assert len(raw_rows) > 500

    seen_windows: set[tuple[float, ...]] = set()
    strings: list[str] = []
    errors_seen = []
    for msg in sent:
        if msg.has_error():
            errors_seen.append(msg.error)
            continue
        content = msg.content
        for record in content.array_records.values():
            for arr in record.values():
                value = arr.numpy()
                if value.dtype.kind == "f":
                    seen_windows |= _windows(value)
        for record in content.config_records.values():
            strings += [v for v in record.values() if isinstance(v, str)]
    assert seen_windows
    leaked = [r for r in raw_rows + encoded_rows if tuple(np.round(r.astype(np.float64), 4)) in seen_windows]
    assert not leaked
    assert set(strings) <= {s.name for s in sites}

    codes = {e.code for e in errors_seen}
    assert {errors.BUDGET_REFUSED, errors.DATA_INVALID} <= codes
    for e in errors_seen:
        if e.code == errors.BUDGET_REFUSED:
            prefix = errors.WIRE_REASONS[e.code] + ": "
            assert e.reason.startswith(prefix)
            words = set(re.findall(r"[A-Za-z]+", re.sub(r"\d+(\.\d+)?(e[-+]?\d+)?", " ", e.reason[len(prefix):])))
            assert words <= BUDGET_WORDS, words
        else:
            assert e.reason == errors.WIRE_REASONS[e.code]


def _trained(reproducible: bool) -> np.ndarray:
    task = get_task("diagnosis")
    cfg = RunConfig(reproducible_noise=reproducible).resolved(task.defaults)
    site = builtin_partition("diagnosis", "heart", "natural", 4, 0.5, 0)[2]
    prep = task.finalize_stats(task.local_stats(site.train, cfg), cfg)
    data = task.to_dataset(site.train, prep, cfg, train=True)
    torch.manual_seed(0)
    model = task.build_model(cfg)
    training.train(task, model, data, cfg, noise_multiplier=1.0, seed=123)
    return np.concatenate([p.detach().numpy().ravel() for p in model.parameters()])


def test_dp_noise_comes_from_the_os_csprng_unless_asked(tmp_path: Path) -> None:
    gen = lambda r: training.noise_generator(r, 7, torch.device("cpu"))  # noqa: E731
    assert not torch.equal(torch.randn(8, generator=gen(False)), torch.randn(8, generator=gen(False)))
    assert torch.equal(torch.randn(8, generator=gen(True)), torch.randn(8, generator=gen(True)))

    np.random.seed(1234)
    before = np.random.get_state()[1].copy()
    a, b = _trained(False), _trained(False)
    assert not np.array_equal(a, b)
    assert np.array_equal(_trained(True), _trained(True))
    assert np.array_equal(np.random.get_state()[1], before)  # NumPy's global generator untouched

    np.random.seed(0)
    first = central_dp.noise_generator().normal(size=4)
    np.random.seed(0)
    assert not np.array_equal(first, central_dp.noise_generator().normal(size=4))
    assert math.isfinite(float(first.sum()))
