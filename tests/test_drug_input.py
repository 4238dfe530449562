"""Drug task: bad hospital files are refused or skipped with file, row and column."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedcare.shared import cli
from fedcare.shared.errors import DataError
from fedcare.shared.registry import get_task

TASK = get_task("drug")
BAD = "C1CC(N"  # an unclosed ring and branch: not a molecule
GOOD = ["CCO", "c1ccccc1O", "CC(=O)Oc1ccccc1C(=O)O", "C1CCNCC1", "OCC1OC(O)C(O)C(O)C1O"]


def _write(tmp_path: Path, text: str, name: str = "site.csv") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def _csv(rows: list[str], header: str = "smiles,NR-AR,SR-p53") -> str:
    return "\n".join([header, *rows]) + "\n"


def _error(path: Path, **kw) -> DataError:
    with pytest.raises(DataError) as info:
        TASK.read_file(path, "tox21", **kw)
    return info.value


def test_valid_file_with_missing_labels_and_absent_endpoints(tmp_path):
    path = _write(tmp_path, _csv([f"{s},1,{'' if i % 2 else 0}" for i, s in enumerate(GOOD)]))
    records = TASK.read_file(path, "tox21")
    assert len(records) == 5 and records.data.y.shape == (5, 12)
    assert records.data.y[1, 11] != records.data.y[1, 11]  # empty cell: not measured (NaN)
    assert (records.data.y[:, 0] == 1).all() and records.labels.tolist() == [1] * 5
    assert records.data.smiles[1] == "Oc1ccccc1"  # canonicalised by RDKit


def test_empty_and_header_only_files(tmp_path):
    assert "empty" in str(_error(_write(tmp_path, "")))
    err = _error(_write(tmp_path, "smiles,NR-AR\n"))
    assert err.path.endswith("site.csv") and "no molecules" in str(err)


def test_missing_smiles_column(tmp_path):
    err = _error(_write(tmp_path, _csv(["CCO,1,0"], header="molecule,NR-AR,SR-p53")))
    assert err.column == "smiles" and "site.csv" in str(err)


def test_no_endpoint_column(tmp_path):
    err = _error(_write(tmp_path, _csv(["CCO,1"], header="smiles,toxic")))
    assert "endpoint" in str(err)


@pytest.mark.parametrize("value", ["2", "yes", "-1", "0.5"])
def test_label_other_than_0_1_empty(tmp_path, value):
    err = _error(_write(tmp_path, _csv(["CCO,1,0", f"c1ccccc1,0,{value}"])))
    assert (err.row, err.column) == (3, "SR-p53") and value not in str(err).split(":")[-1]


def test_invalid_smiles_skipped_listed_or_refused_with_strict(tmp_path):
    path = _write(tmp_path, _csv(["CCO,1,0", f"{BAD},0,0", ",0,1", "c1ccccc1,0,", "CCN,1,1"]))
    records = TASK.read_file(path, "tox21")
    assert len(records) == 3
    assert [row for row, _ in records.skipped] == ["row 3", "row 4"]
    assert [why for _, why in records.skipped][1] == "empty SMILES"
    assert all(BAD not in why for _, why in records.skipped)
    err = _error(path, strict=True)
    assert (err.row, err.column) == (3, "smiles") and BAD not in str(err)


def test_only_invalid_smiles(tmp_path):
    err = _error(_write(tmp_path, _csv([f"{BAD},0,0", "xyz,1,1"])))
    assert "no valid molecules" in str(err) and "2 invalid" in str(err)


def test_duplicates_are_skipped(tmp_path):
    records = TASK.read_file(_write(tmp_path, _csv(["c1ccccc1O,1,0", "Oc1ccccc1,1,0", "CCO,0,0"])), "tox21")
    assert len(records) == 2 and records.skipped == (("row 3", "same molecule as row 2"),)


def test_hospital_check_reports_and_exits_non_zero(tmp_path):
    cli._attach()
    runner = CliRunner()
    good = _write(tmp_path, _csv([f"{s},{i % 2},0" for i, s in enumerate(GOOD * 6)] + [f"{BAD},0,0"]))
    report = TASK.check_file(good, "tox21")
    assert report.rows == 31 and report.label_counts == {"positive": 2, "negative": 8}
    assert any("1 invalid SMILES" in n and "row 32" in n for n in report.notes)
    assert any("repeated" in n for n in report.notes)
    assert "too few" in " ".join(report.problems)  # 5 distinct molecules
    assert report.unreadable == 1  # the invalid SMILES; a repeated molecule is not unreadable
    result = runner.invoke(cli.app, ["hospital", "check", "--task", "drug", "--data", str(good)])
    assert result.exit_code != 0
    missing = _write(tmp_path, _csv(["CCO,1,0"], header="mol,NR-AR,SR-p53"), "nocol.csv")
    result = runner.invoke(cli.app, ["hospital", "check", "--task", "drug", "--data", str(missing)])
    assert result.exit_code != 0 and "nocol.csv" in (str(result.exception) + result.output)


def test_simulate_strict_refuses_and_writes_nothing(tmp_path):
    cli._attach()
    a = _write(tmp_path, _csv([f"{s},{i % 2},0" for i, s in enumerate(GOOD)]), "a.csv")
    b = _write(tmp_path, _csv(["CCO,1,0", f"{BAD},0,0"] + [f"{s},0,1" for s in GOOD[1:]]), "b.csv")
    out = tmp_path / "run"
    result = CliRunner().invoke(cli.app, ["simulate", "--task", "drug", "--rounds", "1", "--quiet", "--strict",
                                          "--out", str(out), "--data", str(a), "--data", str(b)])
    assert result.exit_code != 0
    text = str(result.exception) + result.output
    assert "b.csv" in text and "row 3" in text and BAD not in text
    assert not out.exists() and not out.with_name("run.partial").exists()
