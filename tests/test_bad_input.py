"""Bad site data and settings: a clear error naming file, row and column, a non-zero exit,
and no run folder (not even a partial one)."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedcare.shared import cli

runner = CliRunner()


def _invoke(args):
    cli._attach()
    return runner.invoke(cli.app, args)


def _simulate(tmp_path: Path, files: list[Path], *extra: str):
    out = tmp_path / "run"
    args = ["simulate", "--rounds", "1", "--out", str(out), "--quiet", *extra]
    for f in files:
        args += ["--data", str(f)]
    result = _invoke(args)
    return result, out


def _assert_refused(result, out: Path, *fragments: str):
    assert result.exit_code != 0
    text = str(result.exception) if result.exception else result.output
    for fragment in fragments:
        assert fragment in text, (fragment, text)
    assert not out.exists() and not out.with_name(out.name + ".partial").exists()


def _edit(src: Path, dst: Path, row: int, column: str, value: str) -> Path:
    lines = src.read_text().splitlines()
    header = lines[0].split(",")
    cells = lines[row - 1].split(",")
    cells[header.index(column)] = value
    lines[row - 1] = ",".join(cells)
    dst.write_text("\n".join(lines) + "\n")
    return dst


def test_missing_file(tmp_path, heart_csvs):
    result, out = _simulate(tmp_path, [heart_csvs[0], tmp_path / "nowhere.csv"])
    _assert_refused(result, out, "nowhere.csv", "not found")


def test_empty_file(tmp_path, heart_csvs):
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    result, out = _simulate(tmp_path, [heart_csvs[0], empty])
    _assert_refused(result, out, "empty.csv", "empty")


def test_header_only(tmp_path, heart_csvs):
    header = tmp_path / "header.csv"
    header.write_text(heart_csvs[0].read_text().splitlines()[0] + "\n")
    result, out = _simulate(tmp_path, [heart_csvs[0], header])
    _assert_refused(result, out, "header.csv", "no records")


def test_missing_label_column(tmp_path, heart_csvs):
    lines = heart_csvs[1].read_text().splitlines()
    nolabel = tmp_path / "nolabel.csv"
    nolabel.write_text("\n".join(",".join(line.split(",")[:-1]) for line in lines) + "\n")
    result, out = _simulate(tmp_path, [heart_csvs[0], nolabel])
    _assert_refused(result, out, "nolabel.csv", "column 'num'", "label column is missing")


def test_non_numeric_text_names_row_and_column(tmp_path, heart_csvs):
    bad = _edit(heart_csvs[0], tmp_path / "text.csv", row=12, column="chol", value="high")
    result, out = _simulate(tmp_path, [heart_csvs[1], bad])
    _assert_refused(result, out, "text.csv", "row 12", "column 'chol'", "non-numeric")


def test_unknown_label_value_names_row_and_column(tmp_path, heart_csvs):
    bad = _edit(heart_csvs[0], tmp_path / "label.csv", row=7, column="num", value="9")
    result, out = _simulate(tmp_path, [heart_csvs[1], bad])
    _assert_refused(result, out, "label.csv", "row 7", "column 'num'", "unknown label value")


def test_unknown_run_config_key_is_rejected_by_name(tmp_path):
    result, out = _simulate(tmp_path, [], "--set", "num-epochs=3")
    _assert_refused(result, out, "num-epochs")


def test_existing_output_folder_is_not_overwritten(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = _invoke(["simulate", "--rounds", "1", "--out", str(out), "--quiet"])
    assert result.exit_code != 0 and "already exists" in str(result.exception)
    assert (out / "keep.txt").read_text() == "mine"


def test_hospital_check_reports_and_exits_nonzero_on_bad_file(tmp_path, heart_csvs):
    ok = _invoke(["hospital", "check", "--task", "diagnosis", "--data", str(heart_csvs[2])])
    assert ok.exit_code == 0
    assert "chol" in ok.output and "missing" in ok.output and "labels" in ok.output
    assert "impossible value" in ok.output  # Switzerland's cholesterol 0
    bad = _edit(heart_csvs[0], tmp_path / "bad.csv", row=3, column="age", value="sixty")
    result = _invoke(["hospital", "check", "--task", "diagnosis", "--data", str(bad)])
    assert result.exit_code != 0
    assert "row 3" in str(result.exception) and "column 'age'" in str(result.exception)


@pytest.mark.parametrize("args", [["--epsilon", "-2"], ["--epsilon", "lots"], ["--task", "astrology"]])
def test_bad_options_are_refused(tmp_path, args):
    result, out = _simulate(tmp_path, [], *args)
    assert result.exit_code != 0
    assert not out.exists()
