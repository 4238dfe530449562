"""Overlap control for the site's exact aggregate releases (the preprocessing sums and
the test and validation metrics).

The sums a hospital shares before training are exact, outside ε. One such release is
safe while it covers at least ``min-records`` records, but two releases over record sets
that differ by a few records are not: their difference is the sum over those few, which
for one record *is* that record (a patient added or withdrawn between two runs, a file
re-exported without one row). Statistical offices guard tables the same way ("query-set
overlap control"). So the site keeps, beside its privacy ledger, the record fingerprints
(``Task.fingerprints``, 64-bit content digests) of every distinct set it has released
sums over, and refuses a new release whose set differs from any earlier one by at least
one and fewer than ``min-records`` records. The same set again, or one that differs by
``min-records`` or more, is released. Metrics are kept apart by kind and held to the
same rule: the same model evaluated on two test sets one record apart tells how it did
on that record (a coordinator chooses the model it sends).

Combinations of three or more releases (a "tracker": the sums over P, over Q and over
P, Q and one patient more give that patient as the first minus the other two) are checked
for the exact case: a release is refused if, with it, some record's indicator lies in
the span of the released sets' indicators, i.e. some linear combination of the releases
is that one record (Chin and Ozsoyoglu's criterion for auditing sum queries). Such a
combination isolating two to ``min-records`` - 1 records is caught only between two
releases (finding the sparsest vector of a span is NP-hard in general).

The fingerprints stay on the hospital's disk with its data; only the refusal's fixed
reason crosses the wire (``errors.RELEASE_REFUSED``).
"""

from __future__ import annotations

import hashlib
from collections import Counter
from io import BytesIO
from pathlib import Path

import numpy as np

from ..shared.atomic import write_bytes_atomic
from ..shared.errors import ReleaseRefused
from .ledger import Ledger


def difference(a: np.ndarray, b: np.ndarray) -> int:
    """Records in one multiset of fingerprints and not the other (the symmetric difference)."""
    ca, cb = Counter(a.tolist()), Counter(b.tolist())
    return sum(((ca - cb) + (cb - ca)).values())


def isolated(sets: list[np.ndarray]) -> bool:
    """Whether some record's indicator is a linear combination of the sets' indicators.

    Columns are distinct fingerprints (identical records share one), rows the sets, with
    multiplicities. A unit vector lies in the row space exactly when its projection onto
    it has norm 1: the record's leverage, the squared norm of its column in the right
    singular vectors of nonzero singular value.
    """
    universe = np.unique(np.concatenate(sets))
    counts = np.array([np.bincount(np.searchsorted(universe, s), minlength=len(universe)) for s in sets],
                      dtype=float)
    _, singular, vt = np.linalg.svd(counts, full_matrices=False)
    rank = int((singular > singular[0] * len(universe) * np.finfo(float).eps).sum()) if len(singular) else 0
    leverage = (vt[:rank] ** 2).sum(axis=0)
    return bool((leverage > 1 - 1e-8).any())


#: Kinds of release, each compared only with its own kind: the preprocessing sums (over
#: the training records with any validation hold-out), the test and validation metrics.
KINDS = {"sums": "sums", "test": "test metrics", "val": "validation metrics"}


class Releases:
    """The record sets one data set released one kind of aggregate over:
    ``<ledger>/releases/<key>/<kind>/``."""

    def __init__(self, ledger_dir: Path, key: str, kind: str = "sums") -> None:
        if kind not in KINDS:
            raise ValueError(f"unknown release kind {kind!r}")
        self.ledger = Ledger(ledger_dir)
        self.kind = KINDS[kind]
        self.dir = Path(ledger_dir) / "releases" / key / kind

    def sets(self) -> list[np.ndarray]:
        if not self.dir.exists():
            return []
        return [np.load(p, allow_pickle=False) for p in sorted(self.dir.glob("*.npy"))]

    def admit(self, fingerprints: np.ndarray, min_records: int) -> None:
        """Record this release's set, or ReleaseRefused (nothing recorded) if it is within
        ``min-records`` of an earlier one without being the same."""
        current = np.sort(np.asarray(fingerprints, dtype=np.uint64))
        path = self.dir / (hashlib.sha256(current.tobytes()).hexdigest()[:24] + ".npy")
        with self.ledger.locked():
            if path.exists():  # released before (every round's metrics): checked then
                return
            earlier_sets = self.sets()
            for earlier in earlier_sets:
                d = difference(current, earlier)
                if 0 < d < min_records:
                    raise ReleaseRefused(f"the records differ from an earlier release's ({len(earlier)} records) "
                                         f"by {d}, fewer than min-records {min_records}: {self.kind} over both "
                                         f"would single out those records")
            if min_records > 1 and earlier_sets and isolated(earlier_sets + [current]):
                raise ReleaseRefused(f"a combination of this release and {len(earlier_sets)} earlier one(s) "
                                     f"would give one record's {self.kind} exactly")
            self.dir.mkdir(parents=True, exist_ok=True)
            write_bytes_atomic(path, _npy(current), fsync=True)


def _npy(array: np.ndarray) -> bytes:
    buf = BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()
