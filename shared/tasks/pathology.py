"""Pathology: classify H&E histology patches at each hospital, images never leave it.

Datasets:

* ``pcam`` (default): PatchCamelyon, tumour (1) vs normal (0) lymph-node patches,
  96×96 px. The shipped subset (``shared/datasets/pcam``, 4,800 train / 1,200 test
  patches) is dealt evenly, stratified by label, into four hospitals, and each
  hospital's patches (train and test) get that hospital's own stain: H and E scaled and
  offset after colour deconvolution, drawn once per hospital.
* ``pcam-noshift``: the same four hospitals with the original staining, to measure
  what the stain shift costs.
* ``kather``: Kather 2016 colorectal tissue, 8 classes, 150×150 px; 24 shipped tiles
  for the multi-class path and format tests (one pool, split by source slide).

A hospital's own data: a folder with one sub-folder per class (optionally under
``train/`` and ``test/``), or a CSV manifest (path, label[, slide|patient][, split]);
see ``_patches``. Preprocessing (run-config ``stain-norm``, default ``hed``): a site's
H/E/D densities (mean and spread over all its patches) are moved to the federation's
reference stain, computed from per-site pixel sums; then per-channel standardisation
with federation-wide pixel means. ``fedcare predict`` normalises the images it is given
as one set.

Models: ``resnet`` (default), a compact end-to-end residual CNN (``PatchResNet``,
GroupNorm, no BatchNorm); ``scatter``, a fixed wavelet-scattering front end and a small
GroupNorm CNN trained on it (``_scatter``: Tramèr & Boneh's recipe for DP-SGD with
little data; nothing in the front end is trained, so DP-SGD's per-sample work is the
head's alone: about twice the DP throughput; see the README for accuracy);
``resnet-tiny`` for tests. Cross-entropy, softmax scores. Metrics: accuracy,
precision, recall, F1, ROC-AUC; per-class F1 for kather.

Run config ``aug-mult`` (K augmented views of each sampled patch per step, averaged into
one gradient before DP clipping: same ε, less noisy signal) and ``test-views`` (scores
averaged over the square's turns and mirror images at evaluation) are this task's own.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.nn import functional as F

from ..errors import ConfigError, DataError
from ..metrics import binary_metrics, multiclass_metrics
from ..registry import register
from ..splits import split_site
from . import _patches, _stain
from ._patch_model import WIDTHS, PatchDataset, PatchResNet
from ._scatter import ScatterNet
from .base import CheckReport, Records, Site, Task, row_digests

DATASETS_DIR = Path(__file__).resolve().parent.parent / "datasets"

PCAM = _patches.Schema(
    name="pcam", classes=("normal", "tumour"), size=96,
    aliases=(("0", "normal", "no_tumour", "no_tumor", "negative"), ("1", "tumour", "tumor", "positive")),
)
_KATHER_CLASSES = ("tumor", "stroma", "complex", "lympho", "debris", "mucosa", "adipose", "empty")
KATHER = _patches.Schema(
    name="kather", classes=_KATHER_CLASSES, size=150,
    aliases=tuple((f"{i + 1:02d}_{c}", c) + (("tumour",) if c == "tumor" else ())
                  for i, c in enumerate(_KATHER_CLASSES)),
)
#: Number of virtual hospitals of the builtin PCam datasets.
PCAM_SITES = 4
#: How far a hospital's H and E may sit from the original stain (scale 1 ± this).
SITE_STAIN_STRENGTH = 0.3
#: Pixels trimmed from each side: training crops at random positions, evaluation at the centre.
CROP_MARGIN = 8


def image_schema(dataset: str) -> _patches.Schema:
    if dataset in ("pcam", "pcam-noshift"):
        return PCAM
    if dataset == "kather":
        return KATHER
    raise ConfigError(f"pathology: unknown dataset '{dataset}' (pcam, pcam-noshift, kather)")


@dataclass(frozen=True)
class Patches:
    """A site's decoded patches: uint8 (N, H, W, 3) and where each came from."""

    images: np.ndarray
    paths: np.ndarray

    def __len__(self) -> int:
        return len(self.images)


def records_from(reading: _patches.Reading, source: str) -> Records:
    return Records(
        data=Patches(images=_patches.stack(reading.images), paths=np.asarray(reading.paths, dtype=object)),
        labels=np.asarray(reading.labels, dtype=np.int64),
        groups=np.asarray(reading.groups, dtype=object) if reading.has_groups else None,
        source=source,
        skipped=tuple(reading.skipped),
        test_mask=np.asarray(reading.is_test, dtype=bool) if reading.has_split else None,
    )


@lru_cache(maxsize=4)
def _shipped(dataset: str) -> Records:
    """A shipped dataset read through the same reader as a hospital's folder (decoded once)."""
    if dataset == "kather":
        root = DATASETS_DIR / "kather2016"
        reading = _patches.read(root, KATHER, strict=True)
        reading.groups = [_kather_slide(Path(p).name) for p in reading.paths]
        reading.has_groups = True
        return records_from(reading, str(root))
    root = DATASETS_DIR / "pcam"
    return records_from(_patches.read(root, PCAM, strict=True), str(root))


def _kather_slide(filename: str) -> str:
    """The source slide in a Kather tile's name (``..._CRC-Prim-HE-07_022.tif_Row_...``)."""
    match = re.search(r"CRC-Prim-HE-\d+", filename)
    return match.group(0) if match else filename


def site_stain(index: int) -> tuple[np.ndarray, np.ndarray]:
    """Hospital ``index``'s stain (scale, offset): fixed per hospital, whatever the run seed."""
    return _stain.draw_site_shift(np.random.default_rng(7_000 + index), SITE_STAIN_STRENGTH)


def _deal(labels: np.ndarray, parts: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Indices dealt evenly to ``parts`` sites, each label split evenly."""
    out: list[list[int]] = [[] for _ in range(parts)]
    for value in np.unique(labels):
        idx = np.flatnonzero(labels == value)
        rng.shuffle(idx)
        for site, chunk in enumerate(np.array_split(idx, parts)):
            out[site].extend(chunk.tolist())
    return [np.sort(np.asarray(o, dtype=int)) for o in out]


def _pixel_sums(images: np.ndarray, chunk: int = _stain._CHUNK) -> dict[str, np.ndarray]:
    """Per-channel sums and sums of squares of uint8 images scaled to [0, 1]."""
    return _stain.channel_sums(images, lambda chunk_: chunk_ / 255.0, "pixel", chunk)


def probabilities(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Softmax scores; for evaluation views (B, V, 3, h, w), their mean over the V views."""
    if x.dim() == 5:
        b, v = x.shape[:2]
        return torch.softmax(model(x.flatten(0, 1)), dim=1).view(b, v, -1).mean(dim=1)
    return torch.softmax(model(x), dim=1)


@register
class Pathology(Task):
    name = "pathology"
    datasets = ("pcam", "pcam-noshift", "kather")
    models = ("resnet", "scatter", "resnet-tiny")
    defaults = {
        "dataset": "pcam",
        "model": "resnet",
        "local_epochs": 1,
        "batch_size": 64,
        "lr": 0.05,
        "optimizer": "sgd",
        "weight_decay": 1e-4,
        "dropout": 0.0,
        "stain_norm": "hed",
        "aug_mult": 1,
        "test_views": 1,
    }
    test_fraction = 0.25
    #: The augmentation stream follows the seed; views and stain normalisation shape the tensors.
    dataset_settings = ("dataset", "model", "seed", "stain_norm", "aug_mult", "test_views")

    # ---- data -------------------------------------------------------------------
    def builtin_sites(self, dataset: str, seed: int) -> list[Site]:
        image_schema(dataset)
        records = _shipped("kather" if dataset == "kather" else "pcam")
        if dataset == "kather":
            return [split_site(self, "kather", records, self.test_fraction, seed)]
        return self.pcam_hospitals(records, seed, shifted=dataset == "pcam")

    def pcam_hospitals(self, records: Records, seed: int, *, shifted: bool) -> list[Site]:
        """PCam patches with the subset's own train/test split dealt into the builtin
        hospitals, each (when ``shifted``) with its own stain. The benchmark deals the
        full subset folder this way too."""
        rng = np.random.default_rng(seed)
        pool = split_site(self, "pool", records, self.test_fraction, seed)
        train, test = pool.train, pool.test
        sites = []
        for i, (a, b) in enumerate(zip(_deal(train.labels, PCAM_SITES, rng), _deal(test.labels, PCAM_SITES, rng))):
            tr, te = self.take(train, a), self.take(test, b)
            if shifted:
                tr, te = (self.restained(r, *site_stain(i)) for r in (tr, te))
            sites.append(Site(name=f"hospital{i + 1}", train=tr, test=te))
        return sites

    def restained(self, records: Records, scale: np.ndarray, offset: np.ndarray) -> Records:
        """The same patches and labels as stained by a hospital with this (scale, offset)."""
        data = Patches(images=_stain.apply_shift(records.data.images, scale, offset), paths=records.data.paths)
        return Records(data=data, labels=records.labels, groups=records.groups, source=records.source)

    def read_file(self, path: Path, dataset: str, *, strict: bool = False) -> Records:
        reading = _patches.read(Path(path), image_schema(dataset), strict=strict)
        return records_from(reading, str(path))

    def check_file(self, path: Path, dataset: str) -> CheckReport:
        schema = image_schema(dataset)
        reading = _patches.read(Path(path), schema, strict=False)
        report = CheckReport(path=str(path), rows=len(reading.images), unreadable=len(reading.skipped))
        labels = np.asarray(reading.labels)
        report.label_counts = {c: int((labels == i).sum()) for i, c in enumerate(schema.classes)}
        report.notes.append(f"images: {schema.size}x{schema.size} px RGB, decoded and kept in memory")
        if reading.has_split:
            n_test = int(np.sum(reading.is_test))
            report.notes.append(f"the hospital's own split: {len(labels) - n_test} train, {n_test} test")
        if reading.has_groups:
            report.notes.append(f"{len(set(reading.groups))} slide/patient id(s): a slide's patches stay on "
                                "one side of the train/test split")
        report.notes.extend(reading.notes)
        for where, why in reading.skipped[:50]:
            report.notes.append(f"skipped {where}: {why}")
        if len(reading.skipped) > 50:
            report.notes.append(f"... and {len(reading.skipped) - 50} more skipped")
        if reading.skipped:
            report.notes.append(f"{len(reading.skipped)} file(s) will be skipped (refused with --strict)")
        missing = [c for c, n in report.label_counts.items() if n == 0]
        if missing:
            report.problems.append(f"no usable image of class(es) {', '.join(missing)}")
        if len(labels) < 10:
            report.problems.append(f"only {len(labels)} usable image(s): too few to train with DP")
        return report

    def fingerprints(self, records: Records) -> np.ndarray:
        """The pixels and the label: a file moved or renamed is the same record."""
        return row_digests(records.data.images.reshape(len(records), -1), records.labels)

    def take(self, records: Records, index: np.ndarray) -> Records:
        index = np.asarray(index, dtype=int)
        data = records.data
        return Records(data=Patches(images=data.images[index], paths=data.paths[index]),
                       labels=records.labels[index],
                       groups=None if records.groups is None else records.groups[index],
                       source=records.source)

    def concat(self, parts: Sequence[Records]) -> Records:
        return Records(data=Patches(images=np.concatenate([p.data.images for p in parts]),
                                    paths=np.concatenate([p.data.paths for p in parts])),
                       labels=np.concatenate([p.labels for p in parts]), source="pooled")

    # ---- federated preprocessing -------------------------------------------------
    def local_stats(self, train: Records, cfg: Any) -> dict[str, np.ndarray]:
        images = train.data.images
        stats = _pixel_sums(images)
        if cfg.stain_norm == "hed":
            stats.update(_stain.stain_sums(images))
        return stats

    def finalize_stats(self, totals: dict[str, np.ndarray], cfg: Any) -> dict[str, np.ndarray]:
        n = max(float(totals["pixel_count"][0]), 1.0)
        mean = totals["pixel_sum"] / n
        std = np.sqrt(np.maximum(totals["pixel_sq_sum"] / n - mean ** 2, 1e-6))
        prep = {"pixel_mean": mean.astype(np.float32), "pixel_std": std.astype(np.float32)}
        if cfg.stain_norm == "hed":
            prep.update(_stain.stain_target(totals))
        return prep

    def prepare_images(self, images: np.ndarray, prep: dict[str, np.ndarray], cfg: Any) -> torch.Tensor:
        """uint8 (N, 3, H, W) after the federation's stain normalisation (done once)."""
        if cfg.stain_norm == "hed":
            images = _stain.normalise(images, prep["stain_mean"], prep["stain_std"])
        return torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))

    def to_dataset(self, records: Records, prep: dict[str, np.ndarray], cfg: Any, *, train: bool) -> PatchDataset:
        size = image_schema(cfg.dataset).size
        return PatchDataset(self.prepare_images(records.data.images, prep, cfg),
                            torch.from_numpy(records.labels.astype(np.int64)),
                            torch.as_tensor(prep["pixel_mean"]), torch.as_tensor(prep["pixel_std"]),
                            size - CROP_MARGIN, train=train, seed=cfg.seed,
                            views=cfg.aug_mult if train else cfg.test_views)

    # ---- model ------------------------------------------------------------------
    def build_model(self, cfg: Any) -> nn.Module:
        if cfg.model == "scatter":
            return ScatterNet(len(image_schema(cfg.dataset).classes), dropout=cfg.dropout)
        if cfg.model not in WIDTHS:
            raise ConfigError(f"pathology: unknown model '{cfg.model}' ({', '.join(self.models)})")
        return PatchResNet(len(image_schema(cfg.dataset).classes), WIDTHS[cfg.model], dropout=cfg.dropout)

    def loss(self, model: nn.Module, batch: Sequence[torch.Tensor]) -> torch.Tensor:
        x, y = batch
        if x.dim() == 5:  # evaluation views: the loss of the averaged probabilities
            return F.nll_loss(torch.log(probabilities(model, x).clamp_min(1e-12)), y)
        return F.cross_entropy(model(x), y)

    def predict(self, model: nn.Module, batch: Sequence[torch.Tensor]) -> tuple[np.ndarray, np.ndarray]:
        x, y = batch
        return probabilities(model, x).cpu().numpy(), y.cpu().numpy()

    def metrics(self, scores: np.ndarray, targets: np.ndarray) -> dict[str, float]:
        if scores.shape[1] == 2:
            return binary_metrics(scores[:, 1], targets)
        names = list(KATHER.classes) if scores.shape[1] == len(KATHER.classes) else None
        return multiclass_metrics(scores, targets, names)

    def infer(self, model: nn.Module, prep: dict[str, np.ndarray], cfg: Any, inputs: Sequence[str]) -> pd.DataFrame:
        """Class probabilities for each image file (folders are searched recursively)."""
        schema = image_schema(cfg.dataset)
        files: list[Path] = []
        for item in inputs:
            path = Path(item)
            if path.is_dir():
                found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower()
                               in _patches.IMAGE_SUFFIXES and not p.name.startswith("."))
                if not found:
                    raise DataError("no image files (png, jpg, jpeg, tif, tiff) in this folder", path=str(path))
                files += found
            elif path.is_file():
                files.append(path)
            else:
                raise DataError("no such file or folder", path=str(path))
        images = []
        for path in files:
            image, reason = _patches.decode(path.read_bytes(), schema.size)
            if image is None:
                raise DataError(reason, path=str(path))
            images.append(image)
        data = PatchDataset(self.prepare_images(_patches.stack(images), prep, cfg),
                            torch.zeros(len(images), dtype=torch.long),
                            torch.as_tensor(prep["pixel_mean"]), torch.as_tensor(prep["pixel_std"]),
                            schema.size - CROP_MARGIN, train=False, views=cfg.test_views)
        model.eval()
        home = next(model.parameters()).device
        probs = []
        with torch.no_grad():
            for start in range(0, len(data), 256):
                x, _ = data.batch(range(start, min(start + 256, len(data))))
                probs.append(probabilities(model, x.to(home)).cpu().numpy())
        prob = np.concatenate(probs)
        frame = pd.DataFrame({"file": [str(p) for p in files]})
        for i, name in enumerate(schema.classes):
            frame[f"p_{name}"] = prob[:, i]
        frame["prediction"] = [schema.classes[i] for i in prob.argmax(axis=1)]
        return frame
