"""Issue 7 for the drug and pathology tasks: no record leaves a hospital; error replies say nothing.

Each test runs a real federation in this process with DP, records every reply a hospital
sends (the in-process grid's ``tap``) and searches all of it for the hospitals' records:
SMILES and record ids in every string and every array's bytes; encoded records (descriptor,
fingerprint and token rows; 8x8 pixel blocks raw, stain-normalised and as the model's
input) as contiguous runs of values in every array. One hospital's data is bad in a way
it only finds when it reads its data; its replies must carry a code and fedcare's fixed
reason only.

Arrays are searched by a rolling hash over values in fixed point (4 decimals), so a run of
any length is looked up in time linear in what was sent. Pathology looks for every run of
8 adjacent pixels of every image (rows and columns, both directions), which any 8x8 block
sent as it is, mirrored or rotated contains. Each search is first shown to find what it
looks for (in the sites' own data, or in a block planted amid other values), so a silent
miss cannot pass.
"""

from __future__ import annotations

import csv
import re
import shutil
from pathlib import Path

import numpy as np
from flwr.app import Message

from fedcare.shared import errors
from fedcare.shared.config import RunConfig
from fedcare.shared.registry import get_task
from fedcare.shared.splits import split_site
from fedcare.shared.tasks import _molecules as mol
from fedcare.shared.tasks.drug import TOX21
from fedcare.shared.tasks.pathology import DATASETS_DIR
from fedcare.simulation.runner import plan_federation, simulate

from .test_privacy_leakage import BUDGET_WORDS

# ---- searching what was sent -----------------------------------------------------------
_P = np.uint64(0x9E3779B97F4A7C15)
_P_INV = np.uint64(pow(int(_P), -1, 2 ** 64))


def _fixed(values) -> np.ndarray:
    """Values as int64 in fixed point (4 decimals); non-finite values as one sentinel."""
    v = np.asarray(values, dtype=np.float64).ravel()
    v = np.where(np.isfinite(v), np.clip(v, -1e12, 1e12), 2e12)
    return np.rint(v * 1e4).astype(np.int64) + 0  # + 0: no negative zero


def _powers(base: np.uint64, n: int) -> np.ndarray:
    out = np.empty(n, dtype=np.uint64)
    out[0] = 1
    if n > 1:
        out[1:] = base
        out = np.cumprod(out, dtype=np.uint64)  # wraps modulo 2**64, as intended
    return out


def _run_keys(values, k: int) -> np.ndarray:
    """Polynomial hash of every run of ``k`` consecutive values (mod 2**64), O(len)."""
    s = _fixed(values).view(np.uint64)
    n = len(s)
    if n < k:
        return np.empty(0, dtype=np.uint64)
    prefix = np.zeros(n + 1, dtype=np.uint64)
    prefix[1:] = np.cumsum(s * _powers(_P, n), dtype=np.uint64)
    return (prefix[k:] - prefix[:-k]) * _powers(_P_INV, n - k + 1)


def _row_keys(rows: np.ndarray) -> np.ndarray:
    """The same hash of each row of ``rows`` (m, k)."""
    rows = np.asarray(rows)
    fixed = _fixed(rows).reshape(rows.shape).view(np.uint64)
    return (fixed * _powers(_P, rows.shape[1])).sum(axis=1, dtype=np.uint64)


class Haystack:
    """Arrays to search: which needle rows occur in one of them as consecutive values."""

    def __init__(self, arrays) -> None:
        self.arrays = [np.asarray(a) for a in arrays if np.asarray(a).size]
        self._keys: dict[int, np.ndarray] = {}

    def found(self, needles: np.ndarray) -> np.ndarray:
        """Boolean per row of ``needles`` (m, k)."""
        return self.contains(_row_keys(needles), needles.shape[1])

    def contains(self, wanted: np.ndarray, k: int) -> np.ndarray:
        """Boolean per key (of a run of ``k`` values, as ``_row_keys`` computes it)."""
        if k not in self._keys:
            parts = [_run_keys(a, k) for a in self.arrays]
            self._keys[k] = np.sort(np.concatenate(parts)) if parts else np.empty(0, np.uint64)
        keys = self._keys[k]
        if not len(keys):
            return np.zeros(len(wanted), dtype=bool)
        at = np.minimum(np.searchsorted(keys, wanted), len(keys) - 1)
        return keys[at] == wanted


class Sent:
    """Everything hospitals sent back: arrays, their raw bytes, every string, errors."""

    def __init__(self, messages: list[Message]) -> None:
        self.messages = messages
        self.arrays: list[np.ndarray] = []
        self.blobs: list[bytes] = []
        self.strings: list[str] = []
        self.config_values: list[str] = []
        self.errors: list[tuple[int, errors.WireError]] = []
        self.records: list[tuple[int, str]] = []  # (node, record name) of non-error replies
        for msg in messages:
            node = msg.metadata.src_node_id
            if msg.has_error():
                self.errors.append((node, msg.error))
                self.strings.append(msg.error.reason)
                continue
            content = msg.content
            for name, record in content.array_records.items():
                self.records.append((node, name))
                self.strings.append(name)
                for key, arr in record.items():
                    self.strings += [key, str(arr.dtype), str(arr.stype)]
                    self.arrays.append(arr.numpy())
                    self.blobs.append(bytes(arr.data))
            for name, record in content.config_records.items():
                self.records.append((node, name))
                self.strings.append(name)
                self._values(record, config=True)
            for name, record in content.metric_records.items():
                self.records.append((node, name))
                self.strings.append(name)
                self._values(record, config=False)
        self.hay = Haystack(self.arrays)

    def _values(self, record, *, config: bool) -> None:
        """Keys as strings; strings and bytes; numbers (scalars in key order, lists) as arrays."""
        scalars = []
        for key, value in record.items():
            self.strings.append(key)
            values = value if isinstance(value, list) else [value]
            numbers = [float(v) for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
            if isinstance(value, list) and numbers:
                self.arrays.append(np.asarray(numbers))
            elif numbers:
                scalars += numbers
            for v in values:
                if isinstance(v, str):
                    self.strings.append(v)
                    if config:
                        self.config_values.append(v)
                elif isinstance(v, bytes):
                    self.blobs.append(v)
                    self.arrays.append(np.frombuffer(v, dtype=np.uint8))
                    for dtype in (np.float32, np.float64, np.int64):
                        if len(v) % np.dtype(dtype).itemsize == 0:
                            self.arrays.append(np.frombuffer(v, dtype=dtype))
        if scalars:
            self.arrays.append(np.asarray(scalars))

    def leaked_texts(self, texts) -> list[str]:
        """Texts found in any string sent (as a whole, or inside one when 5+ characters
        long) or, 8+ characters long, inside any array's or value's bytes."""
        strings = set(self.strings)
        out = []
        for t in sorted(set(texts)):
            if t in strings or (len(t) >= 5 and any(t in s for s in strings)) \
                    or (len(t) >= 8 and any(t.encode() in b for b in self.blobs)):
                out.append(t)
        return out

    def leaked_rows(self, needles: np.ndarray) -> np.ndarray:
        return needles[self.hay.found(needles)]

    def leaked_runs(self, keys: np.ndarray, k: int) -> int:
        return int(self.hay.contains(keys, k).sum())


def _informative(rows: np.ndarray, least: int = 3) -> np.ndarray:
    """Rows holding at least ``least`` distinct values (a constant run proves nothing)."""
    srt = np.sort(_fixed(rows).reshape(rows.shape), axis=1)
    return (np.diff(srt, axis=1) != 0).sum(axis=1) + 1 >= least


def _check_errors(sent: Sent, *, refusing: set[int], invalid: set[int]) -> None:
    by_code: dict[int, set[int]] = {}
    for node, err in sent.errors:
        by_code.setdefault(err.code, set()).add(node)
        assert err.code in errors.WIRE_REASONS, err.code
        if err.code == errors.BUDGET_REFUSED:
            prefix = errors.WIRE_REASONS[err.code] + ": "
            assert err.reason.startswith(prefix), err.reason
            rest = re.sub(r"\d+(\.\d+)?(e[-+]?\d+)?", " ", err.reason[len(prefix):])
            assert set(re.findall(r"[A-Za-z]+", rest)) <= BUDGET_WORDS, err.reason
        else:
            assert err.reason == errors.WIRE_REASONS[err.code], err.reason
    expected = {errors.DATA_INVALID: invalid}
    if refusing:
        expected[errors.BUDGET_REFUSED] = refusing
    assert by_code == expected  # the other hospitals answered every message


# ---- drug: SMILES ---------------------------------------------------------------------
def _write_drug_csv(path: Path, rows: list[dict[str, str]], extra: list[str] | None = None) -> Path:
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["mol_id", "smiles", *TOX21.columns])
        for i, row in enumerate(rows):
            if extra is not None and i == len(rows) // 2:
                writer.writerow(extra)
            writer.writerow([row["mol_id"], row["smiles"], *(row[c] for c in TOX21.columns)])
    return path


def test_drug_replies_hold_no_molecule_and_errors_are_generic(tmp_path: Path) -> None:
    with TOX21.path.open(newline="") as fh:
        tox21 = list(csv.DictReader(fh))
    pick = [tox21[i] for i in np.random.default_rng(7).permutation(len(tox21))[:150]]
    folder = tmp_path / "hospitals"
    folder.mkdir()
    training = [_write_drug_csv(folder / f"{name}.csv", pick[36 * j:36 * (j + 1)])
                for j, name in enumerate(("north", "south", "east"))]
    refusing = _write_drug_csv(folder / "west.csv", pick[108:140])
    secret = "CC(=O)Oc1ccccc1C(=O)O[C@@H](N)Cl(("  # not a molecule: the site refuses its file
    bad = _write_drug_csv(folder / "broken.csv", pick[140:150],
                          extra=["SECRET-MOL-7731", secret, *["1"] * len(TOX21.columns)])

    cfg = RunConfig.from_mapping({**RunConfig().to_mapping(), "task": "drug", "model": "mlp",
                                  "num-rounds": 2, "batch-size": 16})
    fed = plan_federation(cfg, epsilon=8.0, delta=1e-5, data=[*training, refusing])
    fed.node_configs[4]["epsilon"] = 1e-4  # refuses on budget grounds
    fed.node_configs[5] = {"data": str(bad), "epsilon": 8.0, "delta": 1e-5, "ledger": "off", "strict": True}
    sent_messages: list[Message] = []
    out = simulate(cfg, fed, out=tmp_path / "run", tap=sent_messages.append)
    sent = Sent(sent_messages)

    # the run was real: three hospitals sent statistics and two rounds of updates
    assert sum(name == "stats" for _, name in sent.records) >= 3
    for node in (1, 2, 3):
        assert sum(1 for n, name in sent.records if (n, name) == (node, "arrays")) == 2

    # no SMILES (as written, as RDKit canonicalises it) and no record id in any string or bytes
    task = get_task("drug")
    files = [task.read_file(p, "tox21") for p in [*training, refusing]]
    canonical = np.concatenate([r.data.smiles for r in files]).tolist()
    assert len(canonical) > 130
    texts = [r["smiles"] for r in pick] + canonical + [r["mol_id"] for r in pick] + [secret, "SECRET-MOL-7731"]
    assert not (found := sent.leaked_texts(texts)), found[:5]
    assert set(sent.config_values) <= {"north", "south", "east", "west"}

    # no encoded molecule in any array: descriptor rows raw and standardised (as the
    # model sees them), MACCS keys, Morgan fingerprints, SMILES token sequences
    with np.load(out / "preprocess.npz") as npz:
        prep = {k: npz[k] for k in npz.files}
    resolved = cfg.resolved(task.defaults)
    desc = mol.descriptors(canonical)
    scaled = np.concatenate([task.to_dataset(r, prep, resolved, train=False).tensors[0].numpy() for r in files])
    assert scaled.shape == desc.shape and not np.allclose(scaled, desc)
    smiles_texts = canonical + [r["smiles"] for r in pick] + [secret]
    tokens = mol.tokens(smiles_texts)
    long_enough = (tokens != mol.PAD).sum(axis=1) >= 12
    props = mol.MACCS_BITS
    needles = {
        "descriptor row": desc,
        "standardised descriptor row": scaled,
        "MACCS keys": desc[:, :props],
        "Morgan fingerprint": mol.morgan_counts(canonical),
        "property run": np.concatenate([desc[:, props + i:props + i + 8] for i in range(0, 33, 8)]),
        "standardised run": np.concatenate([scaled[:, i:i + 8] for i in range(0, desc.shape[1] - 7, 8)]),
        "token run": tokens[long_enough, :12],
        "SMILES character-code run": np.stack([np.frombuffer(t[:12].encode(), np.uint8) for t in smiles_texts
                                               if len(t) >= 12]),
    }
    for name in ("property run", "standardised run"):
        needles[name] = needles[name][_informative(needles[name])]
    own = Haystack([desc, scaled, tokens, needles["Morgan fingerprint"], needles["SMILES character-code run"]])
    for name, rows in needles.items():
        assert len(rows) > 100 and own.found(rows).all(), name  # the search finds what is there
        leaked = sent.leaked_rows(rows)
        assert len(leaked) == 0, f"{len(leaked)} {name}(s) found in what hospitals sent"

    _check_errors(sent, refusing={4}, invalid={5})


# ---- pathology: pixel blocks --------------------------------------------------------------
PCAM = DATASETS_DIR / "pcam"
BLOCK = 8


def _pathology_hospital(root: Path, offset: int) -> Path:
    """14 PCam patches in PCam's layout: 4 train and 3 test per class (a test set of at
    least min-records, 5, or the site would not evaluate)."""
    for split, n in (("train", 4), ("test", 3)):
        for label in ("0", "1"):
            dst = root / split / label
            dst.mkdir(parents=True)
            for src in sorted((PCAM / split / label).iterdir())[offset:offset + n]:
                shutil.copy(src, dst / src.name)
    return root


def _pixel_runs(images: np.ndarray, *, channels_last: bool) -> tuple[np.ndarray, int]:
    """(keys, run length) of every run of 8 adjacent pixels with 3+ distinct values.

    Runs along rows and along columns, each in both directions (an image sent flipped or
    rotated by 90 degrees holds them too); 8 values per channel for (N, C, H, W), 24
    interleaved values for (N, H, W, C). Any 8x8 block sent as it is, transposed or
    mirrored holds 8 such runs per channel.
    """
    a = np.asarray(images)
    h, w = (1, 2) if channels_last else (2, 3)
    width = a.shape[-1] if channels_last else 1
    k = BLOCK * width
    keys = []
    for view in (a, np.swapaxes(a, h, w)):
        for v in (view, np.flip(view, axis=w)):
            rows = _fixed(np.ascontiguousarray(v)).reshape(-1, v.shape[w] * width)
            runs = np.lib.stride_tricks.sliding_window_view(rows, k, axis=1)[:, ::width]  # (rows, starts, k)
            distinct = (np.diff(np.sort(runs, axis=-1), axis=-1) != 0).sum(axis=-1) + 1
            hashed = (runs.view(np.uint64) * _powers(_P, k)).sum(axis=-1, dtype=np.uint64)
            keys.append(hashed[distinct >= 3])
    return np.concatenate(keys), k


def test_pathology_replies_hold_no_pixel_block_and_errors_are_generic(tmp_path: Path) -> None:
    hospitals = [_pathology_hospital(tmp_path / "north", 0), _pathology_hospital(tmp_path / "south", 10)]
    bad = _pathology_hospital(tmp_path / "broken", 20)
    secret = b"\x89PNG\r\n\x1a\nSECRET-SLIDE-4412 patient 0042"
    (bad / "train" / "0" / "SECRET-SLIDE-4412.png").write_bytes(secret)  # the site refuses it (strict)

    cfg = RunConfig.from_mapping({**RunConfig().to_mapping(), "task": "pathology", "model": "resnet-tiny",
                                  "num-rounds": 2, "batch-size": 4, "seed": 1})
    fed = plan_federation(cfg, epsilon=8.0, delta=1e-5, data=hospitals)
    fed.node_configs[3] = {"data": str(bad), "epsilon": 8.0, "delta": 1e-5, "ledger": "off", "strict": True}
    sent_messages: list[Message] = []
    out = simulate(cfg, fed, out=tmp_path / "run", tap=sent_messages.append)
    sent = Sent(sent_messages)

    assert sum(name == "stats" for _, name in sent.records) == 2
    for node in (1, 2):
        assert sum(1 for n, name in sent.records if (n, name) == (node, "arrays")) == 2

    task = get_task("pathology")
    resolved = cfg.resolved(task.defaults)
    records = [task.read_file(h, "pcam") for h in hospitals]
    paths = [p for r in records for p in r.data.paths.tolist()]
    assert len(paths) == 28
    texts = paths + [Path(p).name for p in paths] + [Path(p).stem for p in paths] + ["SECRET-SLIDE-4412"]
    assert not (found := sent.leaked_texts(texts)), found[:5]
    assert set(sent.config_values) <= {"north", "south"}

    # every image, in every form a site holds it: decoded uint8, /255, stain-normalised (a
    # site normalises its train and its test set, each as one set), and the standardised
    # float tensor the model evaluates (centre crop); in HWC and CHW layouts
    with np.load(out / "preprocess.npz") as npz:
        prep = {k: npz[k] for k in npz.files}
    forms: dict[str, list[np.ndarray]] = {}
    sites = [split_site(task, h.name, r, task.test_fraction, resolved.seed) for h, r in zip(hospitals, records)]
    for rec in [s.train for s in sites] + [s.test for s in sites]:
        assert len(rec) >= 4
        raw = rec.data.images  # (N, 96, 96, 3) uint8, as the hospital decoded them
        prepared = task.prepare_images(raw, prep, resolved).numpy()  # (N, 3, 96, 96) uint8
        model_input = task.to_dataset(rec, prep, resolved, train=False).batch(range(len(rec)))[0].numpy()
        for name, chw in (("decoded", raw.transpose(0, 3, 1, 2)), ("decoded /255", raw.transpose(0, 3, 1, 2) / 255),
                          ("stain-normalised", prepared), ("stain-normalised /255", prepared / 255),
                          ("model input", model_input)):
            chw = chw.astype(np.float32) if chw.dtype == np.float64 else chw
            forms.setdefault(name, []).append(chw)
    noise = np.random.default_rng(0).normal(size=500)
    for name, parts in forms.items():
        for layout, channels_last in (("CHW", False), ("HWC", True)):
            images = np.concatenate([p.transpose(0, 2, 3, 1) if channels_last else p for p in parts])
            keys, k = _pixel_runs(images, channels_last=channels_last)
            assert len(keys) > 100_000, (name, layout)
            # the search finds a block of it sent on its own, as float64, amid other values
            block = images[3, 40:48, 40:48] if channels_last else images[3, :, 40:48, 40:48]
            control = Haystack([np.concatenate([noise, np.ravel(block).astype(np.float64), noise])])
            assert control.contains(keys, k).sum() >= BLOCK, (name, layout)
            leaked = sent.leaked_runs(keys, k)
            assert leaked == 0, f"{leaked} runs of 8 pixels ({name}, {layout}) found in what hospitals sent"

    _check_errors(sent, refusing=set(), invalid={3})
