"""Treatment recommendation: baseline-only features, local patient embeddings, IPW, runs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from fedcare.shared.config import RunConfig
from fedcare.shared.errors import ConfigError, DataError
from fedcare.shared.registry import get_task
from fedcare.shared.tasks import _actg, _cohort, _policy
from fedcare.simulation.runner import plan_federation, simulate

TASK = get_task("recommendation")


def config(**changes) -> RunConfig:
    base = {**RunConfig().to_mapping(), "task": "recommendation", "num-rounds": 1}
    base.update({k.replace("_", "-"): v for k, v in changes.items()})
    return RunConfig.from_mapping(base)


def actg_csvs(folder: Path, sizes=(90, 90)) -> list[Path]:
    """Hospital files in the ACTG format: real trial rows, all 27 columns as published."""
    frame = _actg.load_builtin()
    folder.mkdir(parents=True, exist_ok=True)
    paths, start = [], 0
    for i, n in enumerate(sizes):
        path = folder / f"hospital{i}.csv"
        frame.iloc[start:start + n].to_csv(path, index=False, na_rep="NA")
        paths.append(path)
        start += n
    return paths


def history_csvs(folder: Path, n_patients: int = 50) -> list[Path]:
    """Hospital treatment-history files from the seeded cohort generator."""
    frame, _ = _cohort.generate(seed=3, n_patients=n_patients)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in ("north", "south"):
        path = folder / f"{name}.csv"
        frame[frame["site"] == name].drop(columns="site").to_csv(path, index=False)
        paths.append(path)
    return paths


# ---- only baseline covariates are features ----------------------------------------------
@pytest.mark.parametrize("column", ["cd420", "cd496", "cd820", "offtrt", "cens", "arms"])
def test_post_randomisation_columns_are_refused_as_features(column):
    with pytest.raises(ConfigError, match=column):
        _actg.assert_baseline(["age", column])
    with pytest.raises(ConfigError, match=column):
        _actg.make_schema([*_actg.SCHEMA.columns, _actg.tabular.Column(column)])
    assert not set(_actg.SCHEMA.feature_names) & _actg.POST_RANDOMISATION


def test_post_randomisation_values_cannot_change_the_inputs(tmp_path):
    path = actg_csvs(tmp_path, sizes=(60,))[0]
    frame = pd.read_csv(path)
    scrambled = frame.copy()
    rng = np.random.default_rng(0)
    for col in ("cd420", "cd496", "cd820", "offtrt"):
        scrambled[col] = rng.permutation(scrambled[col].to_numpy())
    other = tmp_path / "scrambled.csv"
    scrambled.to_csv(other, index=False, na_rep="NA")
    cfg = config().resolved(TASK.defaults)
    a, b = TASK.read_file(path, "actg175"), TASK.read_file(other, "actg175")
    prep = TASK.finalize_stats(TASK.local_stats(a, cfg), cfg)
    ta, tb = TASK.to_dataset(a, prep, cfg, train=True), TASK.to_dataset(b, prep, cfg, train=True)
    assert all(torch.equal(x, y) for x, y in zip(ta.tensors, tb.tensors))
    # ...while a baseline covariate does change them (the comparison is not vacuous).
    scrambled["cd40"] = scrambled["cd40"] + 50
    scrambled.to_csv(other, index=False, na_rep="NA")
    tc = TASK.to_dataset(TASK.read_file(other, "actg175"), prep, cfg, train=True)
    assert not torch.equal(ta.tensors[0], tc.tensors[0])
    report = TASK.check_file(path, "actg175")
    assert any("cd420" in n and "never used" in n for n in report.notes)


# ---- policy value and ranking, checked by hand ------------------------------------------------
def test_ipw_estimator_matches_a_hand_computed_example():
    # arms 0/1/2 assigned with known probabilities 1/2, 1/4, 1/4
    p = np.array([0.5, 0.25, 0.25])
    arm = np.array([0, 0, 1, 1, 2, 2])
    rec = np.array([0, 1, 1, 1, 0, 2])
    good = np.array([1, 0, 1, 0, 1, 1])
    # matched patients 1, 3, 4, 6 with weights 2, 4, 4, 4 and outcomes 1, 1, 0, 1
    est = _policy.point_estimates(arm, rec, good, p)
    assert est["policy_value_ht"] == pytest.approx(10 / 6)
    assert est["policy_value"] == pytest.approx(10 / 14)
    assert [est[f"arm{a}_value"] for a in range(3)] == pytest.approx([0.5, 0.5, 1.0])
    assert est["random_arm_value"] == pytest.approx(2 / 3)
    # the contingency table carries everything: same values, also split across two sites
    both = _policy.site_metrics(arm, rec, good, p)
    one = _policy.site_metrics(arm[:3], rec[:3], good[:3], p)
    two = _policy.site_metrics(arm[3:], rec[3:], good[3:], p)
    pooled = _policy.pooled_summary({"a": one, "b": two}, replicates=500)
    assert pooled["policy_value"] == pytest.approx(10 / 14)
    assert pooled["policy_value_ht"] == pytest.approx(10 / 6)
    assert pooled["best_single_arm"] == 2 and pooled["best_single_arm_value"] == pytest.approx(1.0)
    assert pooled["random_arm_value"] == pytest.approx(2 / 3)
    assert pooled["policy_gain"] == pytest.approx(10 / 14 - 1.0)
    lo, hi = pooled["policy_value_ci"]
    assert 0 <= lo <= hi <= 1
    assert _policy.pooled_summary({"all": both}, replicates=10)["policy_value"] == pytest.approx(10 / 14)


def test_margin_policy_leaves_the_best_average_arm_only_for_a_large_predicted_gain():
    benefit = np.array([[0.70, 0.81, 0.80],   # arm 1 better than the default by 0.01
                        [0.60, 0.70, 0.85],   # the default is this patient's best too
                        [0.90, 0.80, 0.78]])  # arm 0 better than the default by 0.12
    # mean benefit per arm: 0.733, 0.770, 0.810 -> arm 2 is the default
    assert _policy.margin_policy(benefit, 0.0).tolist() == [1, 2, 0]  # plain argmax
    assert _policy.margin_policy(benefit, 0.05).tolist() == [2, 2, 0]
    assert _policy.margin_policy(benefit[:, :2], 0.05).tolist() == [1, 1, 0]
    assert _policy.margin_policy(benefit, 0.2).tolist() == [2, 2, 2]
    assert _policy.margin_policy(np.zeros((0, 3)), 0.02).tolist() == []


def test_ranking_metrics_match_a_hand_computed_example():
    patient = np.array([7, 7, 7, 9])  # patient 9 has one held-out response: not ranked
    predicted = np.array([0.9, 0.5, 0.1, 0.3])
    gain = np.array([0.2, 1.0, 0.6, 0.9])
    out = _policy.ranking_metrics(patient, predicted, gain)
    dcg = 0.2 + 1.0 / math.log2(3) + 0.6 / 2
    idcg = 1.0 + 0.6 / math.log2(3) + 0.2 / 2
    assert out["ranked_patients"] == 1
    assert out["ndcg_at_3"] == pytest.approx(dcg / idcg)
    assert out["ndcg_at_1"] == pytest.approx(0.2)
    assert out["hit_rate_at_1"] == 0.0 and out["hit_rate_at_3"] == 1.0


# ---- federations: the three model kinds, and what leaves a hospital ------------------------------
def test_patient_embeddings_never_leave_the_hospital(tmp_path):
    paths = history_csvs(tmp_path / "h")
    cfg = config(dataset="longitudinal", model="hybrid", num_rounds=2)
    replies = []
    fed = plan_federation(cfg, epsilon=3.0, delta=1e-5, data=paths)
    out = simulate(cfg, fed, out=tmp_path / "run", tap=replies.append)
    model = TASK.build_model(cfg.resolved(TASK.defaults))
    local = TASK.local_state(model)
    assert set(local) == {"patients.weight"}  # the test is not vacuous: there is something to keep
    local_shapes = {tuple(v.shape) for v in local.values()}
    trained = [r for r in replies if not r.has_error() and "arrays" in r.content.array_records]
    assert len(trained) == 4 and all(not r.has_error() for r in replies)
    for reply in replies:
        for record in reply.content.array_records.values():
            for key, array in record.items():
                assert not key.startswith(TASK.local_prefixes), key
                assert tuple(array.shape) not in local_shapes, key
    shared = set(TASK.shared_state(model))
    assert all(set(r.content.array_records["arrays"].keys()) == shared for r in trained)
    saved = torch.load(out / "model.pt", weights_only=True)
    assert not any(k.startswith(TASK.local_prefixes) for k in saved)
    summary = json.loads((out / "summary.json").read_text())
    assert 0 < summary["ndcg_at_3"] <= 1 and summary["max_epsilon"] <= 3.0


def test_content_model_on_actg_reports_policy_value_with_intervals(tmp_path):
    paths = actg_csvs(tmp_path / "h", sizes=(120, 120))
    cfg = config(model="content", num_rounds=2)
    out = simulate(cfg, plan_federation(cfg, epsilon=3.0, delta=1e-5, data=paths), out=tmp_path / "run")
    summary = json.loads((out / "summary.json").read_text())
    for key in ("policy_value", "best_single_arm_value", "random_arm_value"):
        lo, hi = summary[f"{key}_ci"]
        assert 0 <= lo <= summary[key] <= hi <= 1, key
    assert summary["policy_patients"] == sum(s["num_examples"] for s in summary["sites"].values())
    assert all(0 < s["epsilon"] <= 3.0 for s in summary["sites"].values())
    assert math.isfinite(summary["mean_site_roc_auc"])


def test_actg_treatment_effects_vary_only_with_the_declared_modifiers():
    """The ACTG content tower's treatment-by-patient term sees antiretroviral history
    only, and starts from none at all (a random one would be random recommendations)."""
    cfg = config(model="content").resolved(TASK.defaults)
    model = TASK.build_model(cfg)
    records = TASK.builtin_sites("actg175", 0)[0].test
    prep = TASK.finalize_stats(TASK.local_stats(records, cfg), cfg)
    x = TASK.to_dataset(records, prep, cfg, train=False).tensors[0][:50]
    zero = torch.zeros(len(x), dtype=torch.long)

    def effects(inputs: torch.Tensor) -> torch.Tensor:  # each arm's logit minus arm 0's
        with torch.no_grad():
            logits = model.all_treatments(inputs, zero, torch.zeros(len(inputs)))
        return logits - logits[:, :1]

    fresh = effects(x)
    assert torch.allclose(fresh, fresh[:1].expand_as(fresh), atol=1e-6)  # same for every patient
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))  # any trained state
    names = _actg.SCHEMA.encoded_names()
    other = x.clone()
    for name in ("cd40", "age", "karnof", "str2", "symptom"):
        other[:, names.index(name)] += 1.5
    assert torch.allclose(effects(x), effects(other), atol=1e-5)
    unused = x.clone()  # neither a risk covariate nor a modifier: no logit moves
    for name in ("wtkg", "hemo", "race"):
        unused[:, names.index(name)] -= 2.0
    with torch.no_grad():
        assert torch.equal(model.all_treatments(x, zero, torch.zeros(len(x))),
                           model.all_treatments(unused, zero, torch.zeros(len(x))))
    history = x.clone()
    history[:, names.index("strat=1")], history[:, names.index("strat=3")] = 0.0, 1.0
    assert not torch.allclose(effects(x), effects(history), atol=1e-3)


def test_actg_split_is_stratified_on_the_outcome():
    site = TASK.builtin_sites("actg175", 3)[0]
    train, test = site.train.data, site.test.data
    for strat in (1, 2, 3):
        a, b = train.outcome[site.train.labels == strat], test.outcome[site.test.labels == strat]
        # each (history, outcome) stratum is split 3:1 up to rounding
        assert abs(b.sum() - 0.25 * (a.sum() + b.sum())) <= 0.5
        assert abs(len(b) - 0.25 * (len(a) + len(b))) <= 1.0


def test_collaborative_model_and_recommend_cli(tmp_path):
    paths = history_csvs(tmp_path / "h")
    cfg = config(dataset="longitudinal", model="collaborative", num_rounds=2)
    out = simulate(cfg, plan_federation(cfg, epsilon=math.inf, delta=1e-5, data=paths), out=tmp_path / "run")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["model"] == "collaborative" and 0 < summary["ndcg_at_3"] <= 1

    import typer

    from fedcare.server import recommend_cli

    app = typer.Typer()
    recommend_cli.register(app)
    app.command("noop")(lambda: None)  # a second command keeps `recommend` a sub-command
    target = tmp_path / "recs.csv"
    result = CliRunner().invoke(app, ["recommend", str(out), str(paths[0]), "--k", "2", "--out", str(target)])
    assert result.exit_code == 0, result.output
    recs = pd.read_csv(target)
    history = pd.read_csv(paths[0])
    assert set(recs["patient"]) == set(history["patient"])
    assert (recs.groupby("patient")["rank"].apply(list) == pd.Series([[1, 2]] * recs["patient"].nunique(),
            index=sorted(recs["patient"].unique()))).all()
    tried = set(zip(history["patient"], history["treatment"]))
    assert not any((p, t) in tried for p, t in zip(recs["patient"], recs["treatment"]))
    assert recs["predicted_response"].between(0, 1).all()
    # bad input: error names the file, nothing written
    bad = tmp_path / "bad.csv"
    history.assign(treatment="Z").to_csv(bad, index=False)
    missing = tmp_path / "none.csv"
    result = CliRunner().invoke(app, ["recommend", str(out), str(bad), "--out", str(missing)])
    assert result.exit_code != 0 and isinstance(result.exception, DataError) and not missing.exists()


# ---- bad inputs ------------------------------------------------------------------------------
def _history(tmp_path: Path, frame: pd.DataFrame) -> Path:
    path = tmp_path / "history.csv"
    frame.to_csv(path, index=False)
    return path


GOOD = pd.DataFrame({"patient": ["p1", "p1", "p2"], "treatment": ["A", "B+C", "A"],
                     "response": [0.2, 0.9, 0.5], "time": [1, 2, 1]})


@pytest.mark.parametrize("change, row, column, words", [
    (lambda f: f.assign(treatment=["A", "Q", "A"]), 3, "treatment", "unknown treatment"),
    (lambda f: f.assign(treatment=["A", "A", "A"], time=[1, 1, 1]), 3, "time", "duplicate"),
    (lambda f: f.assign(treatment=["A", "A", "A"]).drop(columns="time"), 3, "treatment", "duplicate"),
    (lambda f: f.assign(response=[0.2, 1.5, 0.5]), 3, "response", "outside the declared range"),
    (lambda f: f.assign(response=["0.2", "high", "0.5"]), 3, "response", "not a number"),
    (lambda f: f.drop(columns="response"), None, "response", "missing column"),
    (lambda f: f.assign(patient=["p1", "p1", ""]), 4, "patient", "missing"),
    (lambda f: f.assign(x1=[0.1, 0.2, 0.3]), 3, "x1", "same in all"),
])
def test_bad_history_rows_are_located(tmp_path, change, row, column, words):
    path = _history(tmp_path, change(GOOD.copy()))
    with pytest.raises(DataError, match=words) as info:
        TASK.read_file(path, "longitudinal")
    assert info.value.path == str(path) and info.value.row == row and info.value.column == column


def test_bad_actg_rows_are_located_and_nothing_trains(tmp_path):
    path = actg_csvs(tmp_path, sizes=(30,))[0]
    frame = pd.read_csv(path)
    frame.loc[4, "arms"] = 7
    frame.to_csv(path, index=False, na_rep="NA")
    with pytest.raises(DataError) as info:
        TASK.read_file(path, "actg175")
    assert (info.value.row, info.value.column) == (6, "arms")
    frame.drop(columns="cens").to_csv(path, index=False, na_rep="NA")
    cfg = config()
    with pytest.raises(DataError) as info:
        plan_federation(cfg, epsilon=1.0, delta=1e-5, data=[path])
    assert info.value.column == "cens"
    with pytest.raises(ConfigError, match="natural"):
        plan_federation(config(dataset="longitudinal", partition="iid"), epsilon=1.0, delta=1e-5)


def test_good_history_passes_check(tmp_path):
    report = TASK.check_file(history_csvs(tmp_path)[0], "longitudinal")
    assert report.ok and report.rows > 10 and any("held out" in n for n in report.notes)
