"""What a finished run leaves for people: TorchScript + model card, the HTML report,
and the comparison table / privacy-utility sweep of ``fedcare simulate compare|sweep``."""

from __future__ import annotations

import base64
import csv
import json
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from fedcare.shared.config import RunConfig
from fedcare.shared.errors import ConfigError
from fedcare.simulation.runner import plan_federation, simulate

SMALL = {"dataset": "breast-cancer", "partition": "iid", "num-sites": 2, "num-rounds": 2}
PNG = b"\x89PNG\r\n\x1a\n"


def _cfg(**extra) -> RunConfig:
    return RunConfig.from_mapping({**RunConfig().to_mapping(), **SMALL, **extra})


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    cfg = _cfg()
    return simulate(cfg, plan_federation(cfg, epsilon=1.0, delta=1e-5),
                    out=tmp_path_factory.mktemp("run") / "run")


@pytest.fixture(scope="module")
def new_cases(tmp_path_factory) -> Path:
    from sklearn.datasets import load_breast_cancer

    data = load_breast_cancer()
    frame = pd.DataFrame(data.data[:25], columns=[n.replace(" ", "_") for n in data.feature_names])
    frame.iloc[3, 4] = np.nan  # a missing value goes through imputation
    path = tmp_path_factory.mktemp("cases") / "new_cases.csv"
    frame.to_csv(path, index=False)
    return path


def _app():
    from fedcare.shared.cli import _attach, app

    _attach()
    return app


# ---- export ------------------------------------------------------------------------------
def test_torchscript_agrees_with_fedcare_predict(finished_run, new_cases, tmp_path):
    from fedcare.shared import tabular
    from fedcare.shared.tasks.diagnosis import schema_for

    out = tmp_path / "pred.csv"
    result = CliRunner().invoke(_app(), ["predict", str(finished_run), str(new_cases), "--out", str(out)])
    assert result.exit_code == 0, result.output
    predicted = pd.read_csv(out)["p_positive"].to_numpy()

    scripted = torch.jit.load(str(finished_run / "model.ts"))
    schema = schema_for("breast-cancer")
    with np.load(finished_run / "preprocess.npz") as npz:
        prep = {k: npz[k] for k in npz.files}
    frame = tabular.read_csv(schema, new_cases, require_label=False)
    x = np.column_stack([tabular.parse_column(frame, c.name, str(new_cases)) for c in schema.columns])
    table = tabular.clean(schema, x, np.zeros(len(x)), dedupe=False)
    with torch.no_grad():
        p_ts = torch.sigmoid(scripted(torch.from_numpy(tabular.encode(schema, table.x, prep)))).numpy()
    assert len(predicted) == 25
    np.testing.assert_allclose(p_ts, predicted, rtol=1e-5, atol=1e-6)
    assert 0 <= predicted.min() < predicted.max() <= 1  # float32 sigmoid may round to 1


def test_model_card_states_sites_privacy_and_schema(finished_run):
    card = json.loads((finished_run / "model_card.json").read_text())
    summary = json.loads((finished_run / "summary.json").read_text())
    assert {s["site"] for s in card["sites"]} == set(summary["sites"])
    for s in card["sites"]:
        assert s["dp"] and 0 < s["epsilon"] <= 1.0 and s["delta"] == 1e-5
        assert s["num_train"] > 100 and s["num_test"] > 30
        assert s["test_metrics"]["accuracy"] == summary["sites"][s["site"]]["accuracy"]
    assert card["training"]["rounds"] == 2 and card["training"]["strategy"] == "fedavg"
    assert "ε ≤" in card["privacy"]["guarantee"] and "preprocessing" in card["privacy"]["not_covered"]
    assert len(card["data_schema"]["columns"]) == 30 and card["data_schema"]["label"] == "malignant"
    assert card["intended_use"] and card["limits"]
    md = (finished_run / "model_card.md").read_text()
    for heading in ("## Privacy", "## Sites", "## Data schema", "## Intended use", "## Limits"):
        assert heading in md


# ---- report --------------------------------------------------------------------------------
class _Structure(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.ids, self.images, self.external, self.tables = set(), [], [], 0

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if "id" in attrs:
            self.ids.add(attrs["id"])
        if tag == "table":
            self.tables += 1
        for key in ("src", "href"):
            value = attrs.get(key) or ""
            if value.startswith("data:image/png;base64,"):
                self.images.append(base64.b64decode(value.split(",", 1)[1]))
            elif value:
                self.external.append(value)


def test_html_report_is_self_contained_with_every_section(finished_run, tmp_path):
    text = (finished_run / "report.html").read_text()
    page = _Structure()
    page.feed(text)
    assert {"sites", "final", "plots", "rounds", "per-site", "config"} <= page.ids
    assert page.external == []  # opens offline: nothing to fetch
    assert len(page.images) == 2 and all(img.startswith(PNG) for img in page.images)
    summary = json.loads((finished_run / "summary.json").read_text())
    for name, site in summary["sites"].items():
        assert name in text and f"{site['epsilon']:.4f}" in text

    out = tmp_path / "again.html"
    result = CliRunner().invoke(_app(), ["report", str(finished_run), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert out.read_text().count("<table") == text.count("<table")

    bad = CliRunner().invoke(_app(), ["report", str(tmp_path)])
    assert bad.exit_code != 0 and not (tmp_path / "report.html").exists()


# ---- compare and sweep ----------------------------------------------------------------------
def _csv(path: Path) -> list[dict]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def test_compare_table_covers_every_method_without_and_with_dp(tmp_path):
    from fedcare.simulation.experiments import METHODS, compare

    out = tmp_path / "cmp"
    results = compare(_cfg(**{"num-rounds": 1}), seeds=1, epsilon=1.0, delta=1e-5, out=out)
    table = _csv(out / "compare.csv")
    assert [(r["method"], r["dp"]) for r in table] == [(m, dp) for dp in ("False", "True") for m in METHODS]
    runs = _csv(out / "compare_runs.csv")
    sites = [k for k in runs[0] if k.startswith("site")]
    assert len(sites) == 2
    for r in runs:  # every method is scored on both sites' own test records
        assert all(0 <= float(r[s]) <= 1 for s in sites)
        assert float(r["mean_site_accuracy"]) == pytest.approx(np.mean([float(r[s]) for s in sites]), abs=1e-4)
    local = next(r for r in results if r.method == "local" and not r.dp)
    for site, score in local.per_site.items():  # local-only: each site's own run
        own = json.loads((out / "runs" / "local-nodp-seed0" / site / "summary.json").read_text())
        assert own["sites"][site]["accuracy"] == score and len(own["sites"]) == 1
    md = (out / "compare.md").read_text().splitlines()
    assert len(md) == 2 + 10 and "±" in md[2]
    assert (out / "compare.png").read_bytes().startswith(PNG)
    with pytest.raises(ConfigError, match="not empty"):
        compare(_cfg(), seeds=1, epsilon=1.0, delta=1e-5, out=out)


def test_sweep_curve_over_epsilons(tmp_path):
    from fedcare.simulation.experiments import sweep

    out = tmp_path / "sweep"
    results = sweep(_cfg(**{"num-rounds": 1}), epsilons=[1.0, 3.0], seeds=1, delta=1e-5, out=out)
    assert [r["epsilon"] for r in _csv(out / "sweep.csv")] == ["inf", "1", "3"]
    by_eps = {r.epsilon: r for r in results}
    for eps in (1.0, 3.0):  # each DP run spent (almost exactly) its budget, no more
        run = out / "runs" / f"fedavg-eps{eps:g}-seed0"
        assert 0.9 * eps < json.loads((run / "summary.json").read_text())["max_epsilon"] <= eps
        assert not by_eps[eps].per_site == {}
    assert (out / "sweep.png").read_bytes().startswith(PNG)
    with pytest.raises(ConfigError):
        sweep(_cfg(), epsilons=[0.0], seeds=1, delta=1e-5, out=tmp_path / "bad")


def test_csv_log_appends_in_place_and_widens_for_a_new_column(tmp_path):
    """rounds.csv and metrics.csv grow by rows without rewriting the history each round."""
    from fedcare.server.results import CsvLog, read_csv_rows

    path = tmp_path / "rounds.csv"
    log = CsvLog(path, ["round"])
    log.append([{"round": 1, "accuracy": 0.5}])
    first = path.read_text()
    log.append([{"round": 2, "accuracy": 0.625}])
    assert path.read_text().startswith(first) and path.read_text().count("\n") == 3
    CsvLog(path, ["round"]).append([{"round": 3, "accuracy": 0.75, "roc_auc": 0.8}])  # a resumed writer
    rows = read_csv_rows(path)
    assert [r["round"] for r in rows] == ["1", "2", "3"]
    assert list(rows[0]) == ["round", "accuracy", "roc_auc"] and rows[0]["roc_auc"] == ""
    assert rows[2]["roc_auc"] == "0.8"
