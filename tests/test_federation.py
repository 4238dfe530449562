"""Whole federations in one process: the real ServerApp and ClientApp on heart data."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch

from fedcare.client.site import builtin_partition, load_site, with_validation
from fedcare.shared import tabular
from fedcare.shared.config import SiteConfig
from fedcare.shared.registry import get_task
from fedcare.shared.splits import _follow_label_mix, partition_indices
from fedcare.shared.tasks.diagnosis import HEART
from fedcare.simulation.runner import plan_federation, simulate

from .conftest import small_config

SITES = {"cleveland", "hungary", "switzerland", "va_long_beach"}


@pytest.fixture(scope="module")
def dp_run(tmp_path_factory):
    cfg = small_config(num_rounds=3)
    out = tmp_path_factory.mktemp("runs") / "dp"
    return simulate(cfg, plan_federation(cfg, epsilon=1.0, delta=1e-5), out=out)


def test_run_folder_holds_the_promised_files(dp_run):
    for name in ("summary.json", "metrics.csv", "rounds.csv", "model.pt", "preprocess.npz", "progress.png",
                 "config.json"):
        assert (dp_run / name).is_file(), name
    assert (dp_run / "progress.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not dp_run.with_name(dp_run.name + ".partial").exists()


def test_summary_has_per_site_metrics_and_epsilon(dp_run):
    summary = json.loads((dp_run / "summary.json").read_text())
    assert set(summary["sites"]) == SITES
    for name, site in summary["sites"].items():
        for key in ("accuracy", "precision", "recall", "f1", "roc_auc", "num_examples", "epsilon", "delta"):
            assert key in site, (name, key)
        assert 0 < site["epsilon"] <= 1.0 and site["delta"] == 1e-5
    sizes = {n: s["num_examples"] for n, s in summary["sites"].items()}
    assert sizes == {"cleveland": 104, "hungary": 89, "switzerland": 16, "va_long_beach": 45}  # FLamby's test sizes
    accs = [s["accuracy"] for s in summary["sites"].values()]
    assert summary["mean_site_accuracy"] == pytest.approx(float(np.mean(accs)))


def test_metrics_csv_has_a_row_per_round_and_site(dp_run):
    with (dp_run / "metrics.csv").open() as fh:
        rows = [r for r in csv.DictReader(fh) if r["phase"] == "evaluate"]
    assert len(rows) == 3 * 4
    for site in SITES:
        eps = [float(r["epsilon"]) for r in rows if r["site"] == site]
        assert eps == sorted(eps) and len(set(eps)) == 3, "ε grows every round"
    assert all(int(r["steps"]) > 0 and float(r["noise_multiplier"]) > 0 for r in rows)
    assert all(r["train_loss"] == "" for r in rows), "DP sites keep their training loss"


def test_sites_that_refuse_every_round_still_report_their_budget(tmp_path):
    """A budget too small for any noise the sites accept: each refuses training, and the
    summary says so (ε spent 0 under DP, refused rounds listed), never "no DP"."""
    cfg = small_config(num_rounds=2)
    out = simulate(cfg, plan_federation(cfg, epsilon=0.01, delta=1e-5), out=tmp_path / "run")
    summary = json.loads((out / "summary.json").read_text())
    for site in summary["sites"].values():
        assert site["dp"] is True and site["epsilon"] == 0.0 and site["delta"] == 1e-5
        assert site["rejected_rounds"] == [1, 2] and site["missed_rounds"] == []
    assert summary["max_epsilon"] == 0.0


def test_model_weights_load_into_a_fresh_model(dp_run):
    task = get_task("diagnosis")
    model = task.build_model(small_config().resolved(task.defaults))
    result = model.load_state_dict(torch.load(dp_run / "model.pt", weights_only=True), strict=False)
    assert not result.unexpected_keys
    assert result.missing_keys == ["site_bias.weight"], "only the hospitals' own intercepts stay home"


def test_without_dp_a_seed_fixes_the_result(tmp_path):
    cfg = small_config(num_rounds=2, seed=5)
    fed = plan_federation(cfg, epsilon=math.inf, delta=1e-5)
    a = simulate(cfg, fed, out=tmp_path / "a")
    b = simulate(cfg, fed, out=tmp_path / "b")
    sa, sb = (json.loads((p / "summary.json").read_text()) for p in (a, b))
    assert sa["sites"] == sb["sites"]
    wa, wb = (torch.load(p / "model.pt", weights_only=True) for p in (a, b))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert all(s["epsilon"] is None for s in sa["sites"].values())


def test_one_hospital_per_csv(tmp_path, heart_csvs):
    cfg = small_config(num_rounds=1)
    fed = plan_federation(cfg, epsilon=2.0, delta=1e-5, data=heart_csvs[:3])
    out = simulate(cfg, fed, out=tmp_path / "csv")
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["sites"]) == {p.stem for p in heart_csvs[:3]}


@pytest.mark.parametrize("scheme", ["iid", "dirichlet"])
def test_partitions_are_deterministic_and_cover_the_pool(scheme):
    a = builtin_partition("diagnosis", "heart", scheme, 5, 0.5, 3)
    b = builtin_partition.__wrapped__("diagnosis", "heart", scheme, 5, 0.5, 3)
    assert len(a) == 5
    assert all(np.array_equal(x.train.data, y.train.data, equal_nan=True) for x, y in zip(a, b))
    natural = builtin_partition("diagnosis", "heart", "natural", 4, 0.5, 3)
    assert sum(len(s.train) for s in a) == sum(len(s.train) for s in natural)


def test_dirichlet_skews_labels_more_than_iid():
    def spread(sites):
        return np.std([s.train.labels.mean() for s in sites])

    iid = builtin_partition("diagnosis", "heart", "iid", 6, 0.5, 0)
    skewed = builtin_partition("diagnosis", "heart", "dirichlet", 6, 0.1, 0)
    assert spread(skewed) > spread(iid)


def test_federated_standardisation_equals_pooled():
    """Statistics from per-site sums equal those of the pooled rows they never saw."""
    task = get_task("diagnosis")
    cfg = small_config().resolved(task.defaults)
    sites = builtin_partition("diagnosis", "heart", "natural", 4, 0.5, 0)
    totals = None
    for s in sites:
        st = task.local_stats(s.train, cfg)
        totals = st if totals is None else {k: totals[k] + st[k] for k in st}
    prep = task.finalize_stats(totals, cfg)
    pooled = np.concatenate([s.train.data for s in sites])
    assert np.allclose(prep["mean"], np.nanmean(pooled, axis=0))
    std = np.nanstd(pooled, axis=0)
    assert np.allclose(prep["std"][std > 1e-8], std[std > 1e-8])
    encoded = tabular.encode(HEART, pooled, prep)
    assert encoded.shape[1] == HEART.input_dim() and np.isfinite(encoded).all()


def test_cleaning_treats_impossible_values_as_missing_and_drops_duplicates():
    x = np.array([[63, 1, 1, 145, 0, 1, 2, 150, 0, 2.3, 3, 0, 6]] * 2 + [[50, 1, 9, 120, 200, 0, 0, 0, 1, 1, 2, 1, 3]],
                 dtype=float)
    table = tabular.clean(HEART, x, np.array([0, 0, 2.0]))
    assert len(table.y) == 2 and table.cleaning["duplicates_removed"] == 1
    cols = HEART.feature_names
    assert np.isnan(table.x[0, cols.index("chol")])          # cholesterol 0 is not a measurement
    assert np.isnan(table.x[1, cols.index("cp")])            # chest pain type 9 does not exist
    assert np.isnan(table.x[1, cols.index("thalach")])       # heart rate 0 is not a measurement
    assert list(table.y) == [0, 1]


def test_engine_with_another_number_of_hospitals_deals_the_pool_iid():
    """Flower's simulation engine picks the number of virtual hospitals (num-supernodes)."""
    task = get_task("diagnosis")
    cfg = small_config().resolved(task.defaults)
    sites = [load_site(task, cfg, SiteConfig.from_mapping({"partition-id": i, "num-partitions": 2})) for i in (0, 1)]
    natural = builtin_partition("diagnosis", "heart", "natural", 4, 0.5, cfg.seed)
    assert [s.name for s in sites] == ["site0", "site1"]
    assert sum(len(s.train) for s in sites) == sum(len(s.train) for s in natural)


def test_validation_split_is_held_out_of_training_and_selects_the_best_round(tmp_path):
    task = get_task("diagnosis")
    site = builtin_partition("diagnosis", "heart", "natural", 4, 0.5, 0)[0]
    split = with_validation(task, site, 0.2, 0)
    assert split is with_validation(task, site, 0.2, 0)  # one split per process: cached tensors stay valid
    assert len(split.train) + len(split.val) == len(site.train) and len(split.test) == len(site.test)
    rows = lambda r: {tuple(np.round(np.nan_to_num(x, nan=-999.0), 6)) for x in np.asarray(r.data, dtype=float)}  # noqa: E731
    assert not rows(split.val) & rows(split.train)
    assert abs(np.mean(split.val.labels) - np.mean(site.train.labels)) < 0.1  # stratified

    cfg = small_config(num_rounds=3, val_fraction=0.2)
    run = simulate(cfg, plan_federation(cfg, epsilon=1.0, delta=1e-5), out=tmp_path / "val")
    summary = json.loads((run / "summary.json").read_text())
    with (run / "rounds.csv").open() as fh:
        rounds = list(csv.DictReader(fh))
    best = max(rounds, key=lambda r: (float(r["val_accuracy"]), -int(r["round"])))
    assert summary["validation"]["best_round"] == int(best["round"])
    assert summary["validation"]["best_val_accuracy"] == pytest.approx(float(best["val_accuracy"]), abs=1e-5)
    assert summary["sites"]["cleveland"]["num_train"] == len(split.train)
    saved, final = torch.load(run / "model_best_val.pt"), torch.load(run / "model.pt")
    assert set(saved) == set(final)
    if summary["validation"]["best_round"] == 3:
        assert all(torch.equal(saved[k], v) for k, v in final.items())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_dirichlet_deal_gives_every_site_enough_records_to_take_part(seed):
    """Below min-records a hospital shares no sums and no metrics: the skewed deal is
    redrawn until every site holds that many training and test records."""
    sites = builtin_partition("diagnosis", "breast-cancer", "dirichlet", 6, 0.3, seed)
    least = SiteConfig().min_records
    assert all(len(s.train) >= least and len(s.test) >= least for s in sites)
    assert max(len(s.train) for s in sites) > 5 * min(len(s.train) for s in sites)  # still skewed


def test_a_dirichlet_deal_that_cannot_seat_every_site_says_which(caplog):
    """Too skewed for the pool: the deal keeps its last draw, and says which sites are short."""
    labels = np.repeat([0, 1], [300, 269])
    with caplog.at_level("WARNING", logger="fedcare.partition"):
        parts = partition_indices(labels, 10, "dirichlet", 0.1, 0, min_size=5)
    short = [i for i, p in enumerate(parts) if len(p) < 5]
    assert short and f"site(s) {', '.join(map(str, short))} hold fewer than 5" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="fedcare.partition"):
        partition_indices(labels, 4, "dirichlet", 1.0, 0, min_size=5)
    assert caplog.text == ""


def test_a_test_deal_too_small_to_go_round_says_which_sites_are_short(caplog):
    """Test records follow each site's training label mix; where the pool cannot give
    every site its floor, the sites left short are named, not passed over silently."""
    train_sets = [np.zeros(50, int), np.ones(50, int), np.zeros(50, int)]
    with caplog.at_level("WARNING", logger="fedcare.partition"):
        parts = _follow_label_mix(np.array([0, 0, 1, 1]), train_sets, 0, min_size=2)
    short = [i for i, p in enumerate(parts) if len(p) < 2]
    assert sorted(np.concatenate(parts).tolist()) == [0, 1, 2, 3]  # nothing lost
    assert short and f"site(s) {', '.join(map(str, short))} hold fewer than 2 test records" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="fedcare.partition"):
        _follow_label_mix(np.array([0, 0, 1, 1, 0, 1]), train_sets, 0, min_size=2)
    assert caplog.text == ""


def test_simulated_hospitals_from_files_split_by_the_run_seed(heart_csvs):
    """In simulation the researcher holds every file: the run's seed deals each file's
    split, as it deals builtin partitions (a real hospital keeps its own split-seed)."""
    def train_labels(seed: int) -> np.ndarray:
        cfg = small_config(seed=seed)
        fed = plan_federation(cfg, epsilon=1.0, delta=1e-5, data=heart_csvs[:1])
        site_cfg = SiteConfig.from_mapping(fed.node_configs[1])
        assert site_cfg.split_seed == seed
        return load_site(get_task("diagnosis"), cfg.resolved(get_task("diagnosis").defaults), site_cfg).train.labels

    assert not np.array_equal(train_labels(1), train_labels(2))
