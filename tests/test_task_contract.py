"""Every registered task honours the contract and survives one real DP-SGD step."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from opacus.validators import ModuleValidator

from fedcare.client import training
from fedcare.client.privacy import epsilon
from fedcare.shared.config import RunConfig
from fedcare.shared.registry import get_task, task_names
from fedcare.shared.splits import split_indices


@pytest.fixture(scope="module", params=task_names())
def task_and_site(request):
    task = get_task(request.param)
    cfg = RunConfig.from_mapping({"task": task.name, "num-rounds": 1}).resolved(task.defaults)
    site = task.builtin_sites(cfg.dataset, seed=0)[0]
    return task, cfg, site


def test_registry_has_the_spine_task():
    assert "diagnosis" in task_names()


def test_contract_declarations(task_and_site):
    task, cfg, _ = task_and_site
    assert task.datasets and task.models and cfg.dataset in task.datasets and cfg.model in task.models
    for key in ("dataset", "model", "lr", "batch_size", "local_epochs", "optimizer"):
        assert key in task.defaults, f"{task.name} lacks default {key}"
    assert "dataset" in task.dataset_settings and all(hasattr(cfg, f) for f in task.dataset_settings)


def test_model_is_dp_compatible_and_data_independent(task_and_site):
    task, cfg, _ = task_and_site
    torch.manual_seed(0)
    a = task.build_model(cfg)
    torch.manual_seed(0)
    b = task.build_model(cfg)
    assert ModuleValidator.validate(a, strict=False) == []
    sa, sb = task.shared_state(a), task.shared_state(b)
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_one_dp_step(task_and_site):
    task, cfg, site = task_and_site
    n = min(len(site.train), 48)
    train = task.take(site.train, np.arange(n))
    prep = task.finalize_stats(task.local_stats(train, cfg), cfg)
    data = task.to_dataset(train, prep, cfg, train=True)
    small = cfg.replace(batch_size=min(cfg.batch_size, 16), local_epochs=1)
    torch.manual_seed(0)
    model = task.build_model(small)
    before = {k: v.clone() for k, v in task.shared_state(model).items()}
    outcome = training.train(task, model, data, small, noise_multiplier=1.0, seed=0)
    # On a GPU machine training runs on CUDA and must hand the model back on the CPU.
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    after = task.shared_state(model)
    assert outcome.steps >= 1 and math.isfinite(outcome.loss)
    assert any(not torch.equal(before[k], after[k]) for k in before), "DP step changed nothing"
    assert outcome.history and sum(h[2] for h in outcome.history) == outcome.steps
    assert 0 < epsilon(outcome.history, 1e-5) < math.inf
    test = task.take(site.test, np.arange(min(len(site.test), 48)))
    metrics, loss = training.evaluate(task, model, task.to_dataset(test, prep, small, train=False))
    assert task.main_metric in metrics and math.isfinite(loss)
    assert {p.device.type for p in model.parameters()} == {"cpu"}


def test_fingerprints_follow_records_not_their_positions(task_and_site):
    """Release overlap control compares record sets: a record's digest must not move with
    its place in the file, and distinct records must get distinct digests."""
    task, _, site = task_and_site
    full = task.fingerprints(site.train)
    assert full.dtype == np.uint64 and len(full) == len(site.train)
    order = np.random.default_rng(0).permutation(len(site.train))[: len(site.train) // 2]
    assert np.array_equal(task.fingerprints(task.take(site.train, order)), full[order])
    assert len(np.unique(full)) > 0.95 * len(full)


def test_split_is_disjoint_and_deterministic(task_and_site):
    task, _, site = task_and_site
    a = split_indices(site.train, 0.3, seed=1)
    b = split_indices(site.train, 0.3, seed=1)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not set(a[0]) & set(a[1]) and len(a[0]) + len(a[1]) == len(site.train)



def test_fedprox_proximal_step_uses_the_rounds_learning_rate():
    """The decoupled step w <- w - lr_r * mu * (w - w_global) at round r's rate: with
    mu = 1 / lr_r each step returns the model to the global weights exactly; half that
    leaves it moved (a step at the base rate would overshoot instead)."""
    task = get_task("diagnosis")
    cfg = RunConfig.from_mapping({"task": "diagnosis", "num-rounds": 4, "lr-schedule": "cosine",
                                  "batch-size": 16}).resolved(task.defaults)
    site = task.builtin_sites(cfg.dataset, seed=0)[0]
    prep = task.finalize_stats(task.local_stats(site.train, cfg), cfg)
    data = task.to_dataset(site.train, prep, cfg, train=True)
    rate = training.round_lr(cfg, 3)
    assert rate < cfg.lr
    moved = {}
    for mu in (1.0 / rate, 0.5 / rate):
        torch.manual_seed(0)
        model = task.build_model(cfg)
        start = [p.detach().clone() for p in model.parameters()]
        training.train(task, model, data, cfg, noise_multiplier=None, seed=0, proximal_mu=mu, lr=rate)
        moved[mu] = max(float((p.detach() - s).abs().max()) for p, s in zip(model.parameters(), start))
    assert moved[1.0 / rate] < 1e-6
    assert moved[0.5 / rate] > 1e-4
