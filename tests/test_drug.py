"""Drug task: scaffold sites, masked loss, every model's DP step, metrics, a federation."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch
from opacus.validators import ModuleValidator
from typer.testing import CliRunner

from fedcare.client import training
from fedcare.client.privacy import epsilon
from fedcare.shared import cli
from fedcare.shared.config import RunConfig
from fedcare.shared.registry import get_task
from fedcare.shared.tasks.drug import TOX21, export_csvs, masked_bce, multilabel_metrics
from fedcare.simulation.runner import plan_federation, simulate

TASK = get_task("drug")


def drug_config(**changes) -> RunConfig:
    base = {**RunConfig().to_mapping(), "task": "drug", "num-rounds": 1}
    base.update({k.replace("_", "-"): v for k, v in changes.items()})
    return RunConfig.from_mapping(base).resolved(TASK.defaults)


@pytest.fixture(scope="module")
def sites():
    return TASK.builtin_sites("tox21", seed=0)


def _scaffolds(records) -> set[str]:
    return set(records.data.scaffolds.tolist())


def test_no_scaffold_on_two_sites(sites):
    assert len(sites) == 4
    per_site = [_scaffolds(s.train) | _scaffolds(s.test) for s in sites]
    for i in range(4):
        for j in range(i + 1, 4):
            assert not per_site[i] & per_site[j], f"sites {i} and {j} share a scaffold"
    for s in sites:
        assert not _scaffolds(s.train) & _scaffolds(s.test), f"{s.name}: a scaffold on both sides"
        assert 0.05 < len(s.test) / (len(s.train) + len(s.test)) < 0.35
    sizes = [len(s.train) + len(s.test) for s in sites]
    assert sum(sizes) == 7831 - 8  # eight SMILES in Tox21 do not sanitise in RDKit
    assert max(sizes) - min(sizes) <= 2
    smiles = np.concatenate([np.concatenate([s.train.data.smiles, s.test.data.smiles]) for s in sites])
    assert len(set(smiles.tolist())) == len(smiles)


def test_masked_loss_ignores_missing_labels():
    logits = torch.tensor([[2.0, -1.0, 0.5], [0.3, 0.0, -2.0]], requires_grad=True)
    nan = float("nan")
    y = torch.tensor([[1.0, nan, 0.0], [nan, nan, nan]])
    loss = masked_bce(logits, y)
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    # molecule 0: mean over its two measured endpoints; molecule 1 (nothing measured): 0
    expected = (bce(torch.tensor(2.0), torch.tensor(1.0)) + bce(torch.tensor(0.5), torch.tensor(0.0))) / 2 / 2
    assert torch.isclose(loss, expected)
    loss.backward()
    assert logits.grad[0, 1] == 0 and torch.all(logits.grad[1] == 0)
    assert logits.grad[0, 0] != 0 and logits.grad[0, 2] != 0
    changed = logits.detach().clone()
    changed[0, 1], changed[1] = 50.0, torch.tensor([-9.0, 9.0, 3.0])
    assert torch.isclose(masked_bce(changed, y), expected)


def test_metrics_per_endpoint_and_means():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, size=(40, 12)).astype(np.float32)
    y[:, 3] = 0.0  # one class only: ROC-AUC undefined, left out (not NaN on the wire)
    y[::3, 5] = np.nan
    prob = np.clip(y * 0.6 + rng.random((40, 12)) * 0.4, 0, 1)
    prob[:, 5] = np.where(np.isnan(y[:, 5]), 0.99, prob[:, 5])
    m = multilabel_metrics(prob, y, TOX21.keys)
    assert "roc_auc_NR-Aromatase" not in m and "roc_auc_NR-AR" in m and "pr_auc_SR-p53" in m
    assert m["roc_auc_NR-ER-LBD"] == 1.0  # missing labels' scores play no part
    per = [v for k, v in m.items() if k.startswith("roc_auc_")]
    assert len(per) == 11 and math.isclose(m["roc_auc"], np.mean(per))
    assert {"pr_auc", "accuracy", "precision", "recall", "f1"} <= set(m)
    assert all(math.isfinite(v) for v in m.values())


@pytest.mark.parametrize("model", TASK.models)
def test_each_model_runs_one_dp_step(sites, model):
    cfg = drug_config(model=model, batch_size=16)
    train = TASK.take(sites[1].train, np.arange(40))
    prep = TASK.finalize_stats(TASK.local_stats(train, cfg), cfg)
    data = TASK.to_dataset(train, prep, cfg, train=True)
    torch.manual_seed(0)
    net = TASK.build_model(cfg)
    assert ModuleValidator.validate(net, strict=False) == []
    before = {k: v.clone() for k, v in TASK.shared_state(net).items()}
    outcome = training.train(TASK, net, data, cfg, noise_multiplier=1.0, seed=0)
    after = TASK.shared_state(net)
    assert math.isfinite(outcome.loss) and outcome.history
    assert all(not torch.equal(before[k], after[k]) for k in before if k.endswith("weight"))
    assert 0 < epsilon(outcome.history, 1e-5) < math.inf
    test = TASK.take(sites[1].test, np.arange(60))
    metrics, loss = training.evaluate(TASK, net, TASK.to_dataset(test, prep, cfg, train=False))
    assert 0 <= metrics["roc_auc"] <= 1 and math.isfinite(loss)


@pytest.mark.parametrize("model", TASK.models)
def test_ghost_clipping_matches_per_sample_gradient_clipping(sites, model):
    """Ghost clipping must clip exactly as Opacus' per-sample-gradient hooks do: with the
    noise off and a clipping norm that bites, both give the same parameters and the same
    accountant history (sample rate, steps)."""
    cfg = drug_config(model=model, batch_size=16, optimizer="sgd", lr=0.5, dropout=0.0,
                      max_grad_norm=0.01)
    train = TASK.take(sites[1].train, np.arange(48))
    prep = TASK.finalize_stats(TASK.local_stats(train, cfg), cfg)
    data = TASK.to_dataset(train, prep, cfg, train=True)
    hooks_task = type(TASK)()
    hooks_task.ghost_clipping = False
    results = {}
    for name, task, clip in (("ghost", TASK, 0.01), ("hooks", hooks_task, 0.01), ("unclipped", hooks_task, 1e6)):
        torch.manual_seed(0)
        net = task.build_model(cfg)
        outcome = training.train(task, net, data, cfg.replace(max_grad_norm=clip), noise_multiplier=0.0, seed=3)
        params = dict(net.named_parameters())
        if "embed.weight" in params:
            # Opacus' per-sample embedding gradients ignore padding_idx (the hooks move
            # the padding row); autograd, which ghost clipping uses, leaves it alone.
            params["embed.weight"] = params["embed.weight"][1:]
        results[name] = (torch.cat([p.detach().flatten() for p in params.values()]), outcome.history)
    ghost, hooks, unclipped = (results[k][0] for k in ("ghost", "hooks", "unclipped"))
    assert results["ghost"][1] == results["hooks"][1] and len(results["ghost"][1]) == 1
    assert torch.allclose(ghost, hooks, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(hooks, unclipped, atol=1e-3)  # the clipping did bite


def test_ghost_clipping_survives_empty_poisson_batches(sites, monkeypatch):
    """An empty Poisson batch still costs a noised step under ghost clipping."""
    cfg = drug_config(batch_size=1, local_epochs=3)
    train = TASK.take(sites[1].train, np.arange(2))
    data = TASK.to_dataset(train, TASK.finalize_stats(TASK.local_stats(train, cfg), cfg), cfg, train=True)
    empties = []
    zero_grads = training._zero_grads
    monkeypatch.setattr(training, "_zero_grads", lambda *a, **k: (empties.append(1), zero_grads(*a, **k)))
    for seed in range(6):  # q = 1/2: a quarter of the steps see an empty batch
        net = TASK.build_model(cfg)
        outcome = training.train(TASK, net, data, cfg, noise_multiplier=1.0, seed=seed)
        assert outcome.history == [(1.0, 0.5, outcome.steps)]
        assert all(torch.isfinite(p).all() for p in net.parameters())
    assert empties


def test_federation_on_a_tox21_subset_then_predict(tmp_path):
    files = export_csvs(tmp_path / "hospitals", limit=150)[:3]
    lines = files[0].read_text().splitlines()
    lines.insert(5, "C1CC(,0,,,,,,,,,,1")  # unclosed ring and branch: RDKit refuses it
    files[0].write_text("\n".join(lines) + "\n")
    cfg = drug_config(num_rounds=2)
    fed = plan_federation(cfg, epsilon=8.0, delta=1e-5, data=files)
    out = simulate(cfg, fed, out=tmp_path / "run")
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["sites"]) == 3 and summary["main_metric"] == "roc_auc"
    for site in summary["sites"].values():
        assert 0 < site["epsilon"] <= 8.0
        assert 0 <= site["roc_auc"] <= 1 and "roc_auc_SR-ARE" in site and "pr_auc" in site
    assert 0 <= summary["mean_site_roc_auc"] <= 1 and "mean_site_pr_auc" in summary
    with (out / "skipped.csv").open() as fh:
        skipped = list(csv.DictReader(fh))
    assert skipped == [{"site": files[0].stem, "record": "row 6",
                        "reason": "invalid SMILES (RDKit cannot parse or sanitise it)"}]

    cli._attach()
    result = CliRunner().invoke(cli.app, ["predict", "--task", "drug", str(out), "c1ccccc1O", str(files[1])])
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(result.output.splitlines()))
    assert len(rows) == 1 + 150 and rows[0]["input"] == "argument" and rows[0]["smiles"] == "Oc1ccccc1"
    assert all(0 <= float(rows[0][f"p_{c}"]) <= 1 for c in TOX21.columns)
    assert rows[1]["input"] == str(files[1]) and rows[1]["row"] == "2"
    bad = CliRunner().invoke(cli.app, ["predict", str(out), "not-a-molecule(("])
    assert bad.exit_code != 0 and "argument 1" in str(bad.exception)
