"""The hospital privacy ledger: hash chain, tamper detection, cross-run composition, refusal."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedcare.client import ledger as L
from fedcare.client import privacy
from fedcare.shared import errors
from fedcare.shared.config import RunConfig, SiteConfig
from fedcare.simulation.runner import plan_federation, simulate


def _entry(run: str, sigma: float, q: float, steps: int) -> dict:
    return {"run": run, "history": [[sigma, q, steps]], "epsilon": 0.0, "delta": 1e-5, "budget_epsilon": 3.0}


@pytest.fixture
def book(tmp_path: Path) -> L.Ledger:
    book = L.Ledger(tmp_path / "ledger")
    for i, run in enumerate(["a", "a", "b"]):
        book.append("k", "site-x", _entry(run, 1.0 + i, 0.1, 10))
    return book


def test_chain_verifies_and_composes_by_rdp(book: L.Ledger) -> None:
    chain = book.verify("k")
    assert [e["seq"] for e in chain.entries] == [1, 2, 3]
    assert chain.runs == ["a", "b"]
    assert chain.history(exclude_run="a") == [(3.0, 0.1, 10)]
    composed = L.spent(chain, 1e-5)
    assert composed == pytest.approx(privacy.epsilon([(1.0, 0.1, 10), (2.0, 0.1, 10), (3.0, 0.1, 10)], 1e-5))
    # RDP composition is tighter than adding the per-entry epsilons
    assert composed < sum(privacy.epsilon([h], 1e-5) for h in chain.history())


def _lines(book: L.Ledger) -> list[str]:
    return (book.dir / "k.jsonl").read_text().splitlines()


def _write(book: L.Ledger, lines: list[str]) -> None:
    (book.dir / "k.jsonl").write_text("".join(line + "\n" for line in lines))


@pytest.mark.parametrize("tamper", ["edit", "edit-and-rehash", "delete-middle", "delete-last", "reorder",
                                    "delete-file", "garbage"])
def test_tampering_is_detected(book: L.Ledger, tamper: str) -> None:
    lines = _lines(book)
    if tamper == "edit":
        _write(book, [lines[0].replace("[[1.0,0.1,10]]", "[[9.0,0.1,10]]")] + lines[1:])
    elif tamper == "edit-and-rehash":  # a consistent rewrite of one entry breaks the next link
        entry = json.loads(lines[0])
        entry["history"] = [[9.0, 0.1, 10]]
        entry["hash"] = L.entry_hash(entry)
        _write(book, [json.dumps(entry)] + lines[1:])
    elif tamper == "delete-middle":
        _write(book, [lines[0], lines[2]])
    elif tamper == "delete-last":
        _write(book, lines[:2])
    elif tamper == "reorder":
        _write(book, [lines[1], lines[0], lines[2]])
    elif tamper == "delete-file":
        (book.dir / "k.jsonl").unlink()
    else:
        _write(book, lines + ["not json"])
    with pytest.raises(L.LedgerTampered):
        book.verify("k")
    with pytest.raises(L.LedgerTampered):
        book.append("k", "site-x", _entry("c", 1.0, 0.1, 1))


def test_ledger_location_rules(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDCARE_HOME", str(tmp_path / "home"))
    assert L.directory_for(SiteConfig(data="x.csv")) == tmp_path / "home" / "ledger"  # a real hospital
    assert L.directory_for(SiteConfig(partition_id=0)) is None  # a virtual one keeps none
    assert L.directory_for(SiteConfig(data="x.csv", ledger="off")) is None
    assert L.directory_for(SiteConfig(partition_id=0, ledger=str(tmp_path / "l"))) == tmp_path / "l"
    cfg = RunConfig().resolved({"dataset": "heart"})
    k1, _ = L.dataset_identity(SiteConfig(data=str(tmp_path / "a.csv")), cfg, "a")
    k2, _ = L.dataset_identity(SiteConfig(data=str(tmp_path / "a.csv")), cfg.replace(task="other"), "a")
    assert k1 == k2  # the same patients share one budget whatever the task


def _run(out: Path, ledger: Path, epsilon: float, rounds: int = 1) -> Path:
    cfg = RunConfig.from_mapping({**RunConfig().to_mapping(), "num-rounds": rounds, "partition": "iid",
                                  "num-sites": 2, "dataset": "breast-cancer"})
    return simulate(cfg, plan_federation(cfg, epsilon=epsilon, delta=1e-5, ledger=str(ledger)), out=out)


def _statuses(run: Path) -> list[str]:
    with (run / "metrics.csv").open() as fh:
        return [r["status"] for r in csv.DictReader(fh) if r["phase"] == "train"]


def test_budget_composes_across_runs_and_refuses_when_spent(tmp_path: Path) -> None:
    ledger = tmp_path / "ledger"
    first = json.loads((_run(tmp_path / "r1", ledger, 1.0) / "summary.json").read_text())
    eps1 = [s["epsilon"] for s in first["sites"].values()]
    assert all(0.99 < e <= 1.0 for e in eps1)

    # The hospitals raise their lifetime budget to 2: the second run is calibrated on top
    # of the first (RDP composition of both histories) and ends within 2, above run 1.
    second = json.loads((_run(tmp_path / "r2", ledger, 2.0) / "summary.json").read_text())
    for chain in L.Ledger(ledger).chains():
        assert isinstance(chain, L.Chain) and len(chain.runs) == 2
        total = L.spent(chain, 1e-5)
        assert 1.9 < total <= 2.0
        assert total == pytest.approx(max(s["epsilon"] for s in second["sites"].values()), abs=0.02)

    # Budget spent: the third run is refused before any training, with numbers only.
    third = _run(tmp_path / "r3", ledger, 2.0)
    statuses = _statuses(third)
    assert statuses and all(f"code {errors.BUDGET_REFUSED}" in s for s in statuses)
    assert all("spent epsilon=" in s for s in statuses)
    assert all(len(c.entries) == 2 for c in L.Ledger(ledger).chains())  # nothing more was spent

    result = CliRunner().invoke(_budget_app(), ["budget", "--ledger", str(ledger)], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "verified" in result.output and "breast-cancer" in result.output


def test_tampered_ledger_refuses_training(tmp_path: Path) -> None:
    ledger = tmp_path / "ledger"
    _run(tmp_path / "r1", ledger, 1.0)
    victim = sorted(ledger.glob("*.jsonl"))[0]
    victim.write_text(victim.read_text().replace('"round":1', '"round":7'))
    statuses = _statuses(_run(tmp_path / "r2", ledger, 5.0))
    assert sum(f"code {errors.LEDGER_INVALID}" in s for s in statuses) == 1
    result = CliRunner().invoke(_budget_app(), ["budget", "--ledger", str(ledger)], env={"COLUMNS": "200"})
    assert result.exit_code == 3 and "TAMPERED" in result.output


def _budget_app():
    import typer

    from fedcare.client.budget_cli import register

    app = typer.Typer()
    register(app)

    @app.command("noop")
    def _noop() -> None:  # a second command keeps typer from collapsing the group
        pass

    return app


def test_a_site_that_refused_the_preprocessing_round_spends_nothing(tmp_path: Path, heart_csvs) -> None:
    """A hospital too small to share sums takes no part in the run: it is sent no model to
    train on, so its ledger records no spending for an update that would be discarded."""
    lines = heart_csvs[0].read_text().splitlines()
    tiny = tmp_path / "tiny.csv"
    tiny.write_text("\n".join(lines[:5]) + "\n")  # four patients, under min-records
    ledger = tmp_path / "ledger"
    cfg = RunConfig.from_mapping({**RunConfig().to_mapping(), "num-rounds": 2})
    data = [*heart_csvs[1:], tiny]
    run = simulate(cfg, plan_federation(cfg, epsilon=1.0, delta=1e-5, data=data, ledger=str(ledger)),
                   out=tmp_path / "run")
    spent = {Path(c.label).name: len(c.entries) for c in L.Ledger(ledger).chains()}
    assert spent == {p.name: 2 for p in heart_csvs[1:]}  # one entry per round, none for tiny.csv
    with (run / "metrics.csv").open() as fh:
        assert {r["site"] for r in csv.DictReader(fh)} == {p.stem for p in heart_csvs[1:]}
    summary = json.loads((run / "summary.json").read_text())
    assert set(summary["sites"]) == {p.stem for p in heart_csvs[1:]}
    # An error reply carries no name (the coordinator knows the node id) and only the
    # wire code's fixed reason; the count and min-records stay in the site's log.
    (who, why), = summary["refused_sites"].items()
    assert who.startswith("node-") and f"code {errors.DATA_INVALID}" in why
    assert "min-records" not in why


# ---- an anchor kept off the machine -------------------------------------------------
def _budget(*args: str):
    return CliRunner().invoke(_budget_app(), ["budget", *args], env={"COLUMNS": "200"})


def test_an_anchor_catches_a_consistent_rewrite_and_lets_the_ledger_grow(book: L.Ledger, tmp_path: Path) -> None:
    """A whole chain and its head rewritten consistently verify on the machine; only an
    anchor written earlier shows that entries it saw are gone."""
    anchor = tmp_path / "anchor.json"
    result = _budget("--ledger", str(book.dir), "--write-anchor", str(anchor))
    assert result.exit_code == 0, result.output
    assert json.loads(anchor.read_text())["heads"]["k"]["count"] == 3

    book.append("k", "site-x", _entry("c", 1.0, 0.1, 10))  # grown since: still fine
    result = _budget("--ledger", str(book.dir), "--anchor", str(anchor))
    assert result.exit_code == 0 and "still holds" in result.output, result.output

    forged = L.Ledger(tmp_path / "forged")  # the same data set with one run's spending left out
    for run in ("a", "b", "c"):
        forged.append("k", "site-x", _entry(run, 1.0, 0.1, 10))
    for name in ("k.jsonl", L.HEADS):
        (book.dir / name).write_text((forged.dir / name).read_text())
    assert len(book.verify("k").entries) == 3  # the rewrite verifies on its own
    result = _budget("--ledger", str(book.dir), "--anchor", str(anchor))
    assert result.exit_code == 3 and "rewritten since the anchor" in result.output, result.output

    for name in ("k.jsonl", L.HEADS):  # the whole ledger gone
        (book.dir / name).unlink()
    assert L.Ledger(book.dir).chains() == []
    result = _budget("--ledger", str(book.dir), "--anchor", str(anchor))
    assert result.exit_code == 3 and "site-x" in result.output, result.output


def test_no_anchor_is_written_for_a_tampered_ledger(book: L.Ledger, tmp_path: Path) -> None:
    _write(book, _lines(book)[:2])
    anchor = tmp_path / "anchor.json"
    result = _budget("--ledger", str(book.dir), "--write-anchor", str(anchor))
    assert result.exit_code == 3 and not anchor.exists()


@pytest.mark.parametrize("content, says", [
    (None, "cannot read"), ("{", "not valid JSON"), ('{"heads": {}}', "not a ledger anchor"),
    ('{"format": "fedcare-ledger-anchor/1", "heads": {"k": {"count": 0, "hash": "ab"}}}', "heads.k")])
def test_a_bad_anchor_file_is_an_error_naming_it(book: L.Ledger, tmp_path: Path, content, says) -> None:
    anchor = tmp_path / "anchor.json"
    if content is not None:
        anchor.write_text(content)
    result = CliRunner().invoke(_budget_app(), ["budget", "--ledger", str(book.dir),
                                                                "--anchor", str(anchor)])
    assert result.exit_code == 2
    assert says in result.stderr and str(anchor) in result.stderr


def test_an_anchor_into_a_missing_folder_is_refused_before_anything(book: L.Ledger, tmp_path: Path) -> None:
    target = tmp_path / "nowhere" / "anchor.json"
    result = _budget("--ledger", str(book.dir), "--write-anchor", str(target))
    assert result.exit_code == 2 and "folder does not exist" in result.stderr and not target.parent.exists()


def test_a_chain_broken_on_the_machine_is_reported_once_under_an_anchor(book: L.Ledger, tmp_path: Path) -> None:
    anchor = tmp_path / "anchor.json"
    assert _budget("--ledger", str(book.dir), "--write-anchor", str(anchor)).exit_code == 0
    _write(book, _lines(book)[:2])
    result = _budget("--ledger", str(book.dir), "--anchor", str(anchor))
    assert result.exit_code == 3 and result.output.count("TAMPERED") == 2, result.output  # its row and its reason
