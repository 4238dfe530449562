"""Overlap control for a hospital's exact aggregate releases (``client.releases``)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from fedcare.client.releases import Releases, difference, isolated
from fedcare.shared import errors
from fedcare.shared.config import RunConfig
from fedcare.shared.errors import ReleaseRefused

from .test_pathology import hospital


def test_difference_counts_records_in_one_multiset_and_not_the_other():
    a = np.array([1, 2, 2, 3], dtype=np.uint64)
    assert difference(a, a[::-1]) == 0
    assert difference(a, np.array([1, 2, 3], dtype=np.uint64)) == 1
    assert difference(a, np.array([1, 2, 2, 4, 5], dtype=np.uint64)) == 3


def test_a_release_within_min_records_of_an_earlier_one_is_refused_and_not_recorded(tmp_path: Path):
    book = Releases(tmp_path / "ledger", "k")
    first = np.arange(100, dtype=np.uint64)
    book.admit(first, 5)
    book.admit(first[::-1], 5)  # the same records again, in another order
    assert len(book.sets()) == 1
    for near in (first[1:], np.append(first, 1000), np.append(first[:-2], [7000, 7001])):
        with pytest.raises(ReleaseRefused, match="fewer than min-records 5"):
            book.admit(near, 5)
    assert len(book.sets()) == 1
    book.admit(first[5:], 5)  # five records fewer: as many as min-records
    assert len(book.sets()) == 2
    with pytest.raises(ReleaseRefused):  # one record from the second set
        book.admit(first[6:], 5)


def test_a_tracker_of_three_releases_is_refused_though_each_pair_differs_enough(tmp_path: Path):
    """Sums over P, over Q, then over P, Q and one patient x: any two differ by at least
    min-records, but the third minus the first two is x's record alone."""
    book = Releases(tmp_path / "ledger", "k")
    p, q, x = np.arange(0, 10), np.arange(10, 20), np.array([99])
    book.admit(p.astype(np.uint64), 5)
    book.admit(q.astype(np.uint64), 5)
    tracker = np.concatenate([p, q, x]).astype(np.uint64)
    with pytest.raises(ReleaseRefused, match=r"combination of this release and 2 earlier one\(s\)"):
        book.admit(tracker, 5)
    assert len(book.sets()) == 2
    book.admit(np.concatenate([p, q]).astype(np.uint64), 5)  # P and Q together isolate no one
    halves = np.concatenate([p[:5], q[:5], np.arange(30, 36)]).astype(np.uint64)
    book.admit(halves, 5)
    assert len(book.sets()) == 4


def test_isolated_finds_a_record_in_the_span_of_the_sets():
    u = lambda *v: np.array(v, dtype=np.uint64)  # noqa: E731
    a, b = u(0, 1, 2, 3, 4, 5), u(3, 4, 5, 6, 7, 8)
    assert not isolated([a, b])
    assert not isolated([a, b, u(3, 4, 5)])  # a minus the overlap: three records, not one
    assert isolated([a, u(1, 2, 3, 4, 5)])  # a minus the second: record 0
    assert isolated([u(1, 1, 2), u(1, 2)])  # a duplicated record counts twice: 1 is isolated
    assert not isolated([u(1, 1, 2, 2)])
    # Two multisets 3 records apart: twice the second minus the first is record 3 three times.
    assert isolated([u(1, 1, 2, 2, 3), u(1, 2, 3, 3)])


def test_two_multisets_min_records_apart_can_still_isolate_a_record(tmp_path: Path):
    book = Releases(tmp_path / "ledger", "k")
    book.admit(np.array([1, 1, 2, 2, 3], dtype=np.uint64), 3)
    second = np.array([1, 2, 3, 3], dtype=np.uint64)  # 3 records apart: pairwise it passes
    with pytest.raises(ReleaseRefused, match="would give one record's sums exactly"):
        book.admit(second, 3)
    book.admit(second, 1)  # min-records 1: no control


def test_a_hospital_that_lost_one_image_refuses_to_release_aggregates_over_the_rest(tmp_path: Path):
    """Run 1 releases the sums over north's 20 training images; with one image gone, run
    2's sums minus run 1's would be that image's pixels: north refuses (code only), the
    others go on. Five images gone differ by min-records and are released."""
    from fedcare.simulation.runner import plan_federation, simulate

    north = hospital(tmp_path / "north", n_train=10, n_test=3)
    south = hospital(tmp_path / "south", n_train=10, n_test=3, offset=20)
    east = hospital(tmp_path / "east", n_train=10, n_test=3, offset=40)
    ledger = tmp_path / "ledger"
    c = RunConfig(task="pathology", model="resnet-tiny", num_rounds=1, batch_size=8, min_sites=2)

    def run(name: str) -> dict:
        fed = plan_federation(c, epsilon=math.inf, delta=1e-5, data=[north, south, east], ledger=str(ledger))
        return json.loads((simulate(c, fed, out=tmp_path / name) / "summary.json").read_text())

    assert set(run("r1")["sites"]) == {"north", "south", "east"}
    train = sorted((north / "train" / "0").iterdir())
    train[0].unlink()
    second = run("r2")
    assert set(second["sites"]) == {"south", "east"}
    (who, why), = second["refused_sites"].items()
    assert f"code {errors.RELEASE_REFUSED}" in why and "19" not in why and "20" not in why
    for p in train[1:5]:
        p.unlink()
    assert set(run("r3")["sites"]) == {"north", "south", "east"}

    # One test image gone: south still trains, but sends no test metrics over a set one
    # record away from those it reported before.
    sorted((south / "test" / "1").iterdir())[0].unlink()
    fourth = run("r4")["sites"]
    assert fourth["south"]["evaluated_round"] == 0 and "accuracy" not in fourth["south"]
    assert fourth["south"]["num_train"] == 20  # it trained
    assert all("accuracy" in fourth[s] for s in ("north", "east"))
