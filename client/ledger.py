"""The hospital's privacy ledger: every DP release it ever made, on its own disk.

One append-only JSON-lines file per data set (the patients whose privacy is spent), one
entry per training round, written *before* the round's update leaves the site. Each entry
holds the run, task, model, planned rounds, the accountant history of the round
(``(noise_multiplier, sample_rate, steps)`` entries), the site's budget and the ε the
whole ledger reaches at its δ. ε across runs is the composition (RDP or PRV bound,
whichever is smaller) of all stored histories (``privacy.epsilon(prior + current, δ)``),
never a sum of rounded values.

Tamper evidence: each entry carries the SHA-256 of its canonical JSON, which includes the
previous entry's hash. ``HEADS.json`` keeps, per data set, the entry count and last hash,
so deleting the last entries (or the whole file) is detected too. A ledger that fails
verification makes the site refuse to train until a person resolves it. This detects
edits, deletions and reordering. Someone who rewrites a whole chain *and* the heads
consistently is caught only against an anchor kept off the machine: ``anchor`` lists
every chain's entry count and last hash, and ``anchor_problems`` checks that each
anchored entry is still in its chain with that hash (an entry's hash commits to every
entry before it, so this proves the first ``count`` entries unchanged).

Location: node config ``ledger`` (a directory). A real hospital (``data=PATH``) that names
none uses ``$FEDCARE_HOME/ledger`` or ``~/.fedcare/ledger``; virtual hospitals of a
simulation (``partition-id``) keep none unless given one; ``ledger=off`` turns it off.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from ..shared.atomic import write_text_atomic
from ..shared.config import RunConfig, SiteConfig
from ..shared.errors import DataError, FedcareError
from . import privacy

HEADS = "HEADS.json"
GENESIS = "0" * 64


class LedgerTampered(FedcareError):
    """The ledger's hash chain does not verify; training is refused until resolved."""

    exit_code = 3
    label = ""
    key = ""


def default_directory() -> Path:
    home = os.environ.get("FEDCARE_HOME")
    return (Path(home) if home else Path.home() / ".fedcare") / "ledger"


def directory_for(site_cfg: SiteConfig) -> Path | None:
    """Where this site's ledger lives, or None (virtual hospital without one, or off)."""
    if site_cfg.ledger.strip().lower() == "off":
        return None
    if site_cfg.ledger:
        return Path(site_cfg.ledger).expanduser()
    return default_directory() if site_cfg.data else None


def dataset_identity(site_cfg: SiteConfig, cfg: RunConfig, site_name: str) -> tuple[str, str]:
    """(key, human-readable label) of the patients a site trains on.

    A hospital's own data is identified by its resolved path alone: the same patients
    used by two tasks share one budget. A builtin virtual hospital is identified by its
    dataset and partition (for natural partitions, by the source hospital).
    """
    if site_cfg.data:
        label = str(Path(site_cfg.data).expanduser().resolve())
    elif cfg.partition == "natural":
        label = f"builtin:{cfg.task}/{cfg.dataset}/natural/{site_name}"
    else:
        label = (f"builtin:{cfg.task}/{cfg.dataset}/{cfg.partition}/{cfg.num_sites}/"
                 f"{cfg.dirichlet_alpha:g}/seed{cfg.seed}/{site_cfg.partition_id}")
    return hashlib.sha256(label.encode()).hexdigest()[:24], label


def _canonical(entry: dict[str, Any]) -> bytes:
    return json.dumps(entry, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def entry_hash(entry: dict[str, Any]) -> str:
    return hashlib.sha256(_canonical({k: v for k, v in entry.items() if k != "hash"})).hexdigest()


@dataclass(frozen=True)
class Chain:
    """A verified data set's entries."""

    key: str
    label: str
    entries: list[dict[str, Any]]

    def history(self, exclude_run: str | None = None) -> privacy.History:
        return [(float(s), float(q), int(n)) for e in self.entries if e["run"] != exclude_run
                for s, q, n in e["history"]]

    @property
    def runs(self) -> list[str]:
        return list(dict.fromkeys(e["run"] for e in self.entries))


class Ledger:
    def __init__(self, directory: Path) -> None:
        self.dir = Path(directory)

    # ---- reading and verifying ----------------------------------------------------
    def _file(self, key: str) -> Path:
        return self.dir / f"{key}.jsonl"

    def _heads(self) -> dict[str, Any]:
        path = self.dir / HEADS
        if not path.exists():
            return {}
        try:
            heads = json.loads(path.read_text())
        except ValueError:
            raise LedgerTampered(f"{path} is not valid JSON") from None
        if not isinstance(heads, dict):
            raise LedgerTampered(f"{path} is malformed")
        return heads

    def verify(self, key: str, heads: dict[str, Any] | None = None) -> Chain:
        """The data set's entries if the chain and its head verify; LedgerTampered if not."""
        heads = self._heads() if heads is None else heads
        path = self._file(key)
        head = heads.get(key)
        if not path.exists():
            if head:
                raise LedgerTampered(f"ledger file for {head.get('label', key)} was deleted ({path})")
            return Chain(key, "", [])
        entries: list[dict[str, Any]] = []
        prev = GENESIS
        for n, line in enumerate(path.read_text().splitlines(), start=1):
            try:
                entry = json.loads(line)
            except ValueError:
                raise LedgerTampered(f"{path}, entry {n}: not valid JSON") from None
            if not isinstance(entry, dict) or entry.get("prev") != prev or entry.get("seq") != n:
                raise LedgerTampered(f"{path}, entry {n}: chain broken (an entry was removed, reordered or edited)")
            if entry.get("hash") != entry_hash(entry):
                raise LedgerTampered(f"{path}, entry {n}: hash mismatch (the entry was edited)")
            prev = entry["hash"]
            entries.append(entry)
        if head:
            count = int(head.get("count", 0))
            if len(entries) < count or entries[count - 1]["hash"] != head.get("hash"):
                raise LedgerTampered(f"{path}: {count} entries recorded, the file holds fewer or other ones")
        label = entries[0]["dataset"] if entries else ""
        return Chain(key, label, entries)

    def chains(self) -> list[Chain | LedgerTampered]:
        """Every data set in the directory: its chain, or the reason it fails to verify."""
        if not self.dir.exists():
            return []
        try:
            heads = self._heads()
        except LedgerTampered as exc:
            return [exc]
        keys = sorted({p.stem for p in self.dir.glob("*.jsonl")} | set(heads))
        out: list[Chain | LedgerTampered] = []
        for key in keys:
            try:
                out.append(self.verify(key, heads))
            except LedgerTampered as exc:
                exc.label, exc.key = str((heads.get(key) or {}).get("label", key)), key
                out.append(exc)
        return out

    # ---- writing ------------------------------------------------------------------
    @contextmanager
    def locked(self) -> Iterator[None]:
        """One writer at a time (several runs may share a SuperNode's ledger)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.dir / ".lock", "w") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def append(self, key: str, label: str, record: dict[str, Any]) -> dict[str, Any]:
        """Verify, then chain and append one entry, fsync, and move the head."""
        with self.locked():
            heads = self._heads()
            chain = self.verify(key, heads)
            entry = {"seq": len(chain.entries) + 1, "prev": chain.entries[-1]["hash"] if chain.entries else GENESIS,
                     "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "dataset": label, **record}
            entry["hash"] = entry_hash(entry)
            with self._file(key).open("a") as fh:
                fh.write(_canonical(entry).decode() + "\n")
                fh.flush()
                os.fsync(fh.fileno())
            heads[key] = {"count": entry["seq"], "hash": entry["hash"], "label": label}
            write_text_atomic(self.dir / HEADS, json.dumps(heads, indent=1, sort_keys=True))
            return entry


ANCHOR_FORMAT = "fedcare-ledger-anchor/1"


def anchor(chains: list[Chain]) -> dict[str, Any]:
    """Each chain's entry count and last hash, to keep off this machine (printed, or sent
    to the hospital's data-protection officer): no patient data, only counts and hashes."""
    return {"format": ANCHOR_FORMAT, "written": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "heads": {c.key: {"count": len(c.entries), "hash": c.entries[-1]["hash"], "label": c.label}
                      for c in chains if c.entries}}


def read_anchor(path: Path) -> dict[str, dict[str, Any]]:
    """An anchor file's heads; a DataError naming the file and field if it is not one."""
    try:
        doc = json.loads(Path(path).read_text())
    except OSError as exc:
        raise DataError(f"cannot read the ledger anchor ({exc.strerror})", path=str(path)) from None
    except ValueError:
        raise DataError("not a ledger anchor (not valid JSON)", path=str(path)) from None
    if not isinstance(doc, dict) or doc.get("format") != ANCHOR_FORMAT or not isinstance(doc.get("heads"), dict):
        raise DataError(f"not a ledger anchor (expected format {ANCHOR_FORMAT!r} and a 'heads' object)",
                        path=str(path))
    for key, head in doc["heads"].items():
        ok = (isinstance(head, dict) and isinstance(head.get("count"), int) and head["count"] >= 1
              and isinstance(head.get("hash"), str) and len(head["hash"]) == 64)
        if not ok:
            raise DataError("needs a positive integer 'count' and a 64-character 'hash'", path=str(path),
                            column=f"heads.{key}")
    return doc["heads"]


def anchor_problems(items: list[Chain | LedgerTampered],
                    heads: dict[str, dict[str, Any]]) -> dict[str, LedgerTampered]:
    """Per anchored data set that no longer holds its anchored entry: why, from the
    verified ``Ledger.chains()`` (no reading again). A chain may have grown since the
    anchor; it may not have lost or changed what the anchor saw, nor fail to verify."""
    by_key = {item.key: item for item in items if item.key}
    unreadable = next((i for i in items if isinstance(i, LedgerTampered) and not i.key), None)  # HEADS.json
    out: dict[str, LedgerTampered] = {}
    for key, head in heads.items():
        label = str(head.get("label") or key)
        item = by_key.get(key) or unreadable or Chain(key, label, [])
        if isinstance(item, LedgerTampered):
            out[key] = item
            continue
        count = head["count"]
        if len(item.entries) < count or item.entries[count - 1]["hash"] != head["hash"]:
            exc = LedgerTampered(f"{label}: the anchor saw {count} entries ending in {head['hash'][:16]}; "
                                 f"the ledger holds {len(item.entries)} and not that entry "
                                 "(rewritten since the anchor)")
            exc.label, exc.key = label, key
            out[key] = exc
    return out


def spent(chain: Chain, delta: float) -> float:
    """ε of everything the data set ever released, at ``delta``."""
    return privacy.epsilon(chain.history(), delta)
