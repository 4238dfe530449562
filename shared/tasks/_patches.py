"""Reading a hospital's histology patches: class folders or a CSV manifest.

Layouts a hospital may bring (the task's ``read_file`` accepts any of them):

* ``FOLDER/<class>/*.png|jpg|jpeg|tif|tiff``: one sub-folder per class.
* ``FOLDER/train/<class>/...`` and ``FOLDER/test/<class>/...`` (PatchCamelyon's own
  layout): the hospital's split is kept as it is (``Records.test_mask``); a ``valid/``
  folder is left out (fedcare selects no model on it) and the check report says so.
* ``manifest.csv`` with columns ``path, label`` and optionally ``slide`` (or
  ``patient``) and ``split`` (train/test); paths are relative to the manifest's folder.
  A slide or patient id keeps all of its patches on one side of the train/test split.

Every image is decoded once, here, and kept as uint8. A file that cannot be used
(corrupt or truncated, not an image, grayscale or RGBA, wrong size) is skipped with its
path and a fixed reason, or refused outright with ``strict``. Byte-identical copies of
one file are dropped (PatchCamelyon repeats positive patches).
"""

from __future__ import annotations

import csv
import hashlib
import io
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..errors import DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
SPLIT_FOLDERS = ("train", "valid", "test")


@dataclass(frozen=True)
class Schema:
    """A dataset's declared image schema: classes (with accepted folder names) and size."""

    name: str
    classes: tuple[str, ...]
    aliases: tuple[tuple[str, ...], ...]
    size: int

    def label_of(self, name: str) -> int | None:
        key = name.strip().lower()
        for i, names in enumerate(self.aliases):
            if key in names or key == str(i):
                return i
        return None


@dataclass
class Reading:
    """What was read from a hospital's data, before it becomes ``Records``."""

    images: list[np.ndarray] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)
    groups: list[str] = field(default_factory=list)
    is_test: list[bool] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    duplicates: int = 0
    has_groups: bool = False
    has_split: bool = False
    seen: set[str] = field(default_factory=set)


def decode(data: bytes, size: int) -> tuple[np.ndarray | None, str]:
    """(image, "") or (None, reason). Reasons are fixed strings: never a pixel value."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            img.load()
    except (UnidentifiedImageError, Image.DecompressionBombWarning):
        return None, "not a readable image"
    except (OSError, SyntaxError, ValueError):
        return None, "corrupt or truncated image"
    if img.mode in ("L", "1", "I", "F", "I;16", "I;16B", "I;16L", "LA"):
        return None, "grayscale image; expected RGB"
    if img.mode in ("RGBA", "PA"):
        return None, "RGBA image; expected RGB without alpha"
    if img.mode != "RGB":
        return None, f"{img.mode} image; expected 8-bit RGB"
    if img.size != (size, size):
        return None, f"image is {img.size[0]}x{img.size[1]} px; expected {size}x{size}"
    return np.asarray(img, dtype=np.uint8).copy(), ""


def _add(reading: Reading, path: Path, label: int, group: str, is_test: bool, size: int, strict: bool,
         where: str | None = None) -> None:
    shown = where or str(path)
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        _skip(reading, shown, f"not an image file (expected {', '.join(IMAGE_SUFFIXES)})", strict, path)
        return
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        _skip(reading, shown, "file not found", strict, path)
        return
    except OSError:
        _skip(reading, shown, "file cannot be read", strict, path)
        return
    digest = hashlib.sha256(data).hexdigest()
    if digest in reading.seen:
        reading.duplicates += 1
        return
    image, reason = decode(data, size)
    if image is None:
        _skip(reading, shown, reason, strict, path)
        return
    reading.seen.add(digest)
    reading.images.append(image)
    reading.labels.append(label)
    reading.paths.append(str(path))
    reading.groups.append(group)
    reading.is_test.append(is_test)


def _skip(reading: Reading, where: str, reason: str, strict: bool, path: Path) -> None:
    if strict:
        raise DataError(f"{reason} (strict: no file may be skipped)", path=where)
    reading.skipped.append((where, reason))


def _class_folders(root: Path, schema: Schema, reading: Reading, is_test: bool, strict: bool) -> None:
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise DataError(f"no class sub-folders (expected one per class: {', '.join(schema.classes)})",
                        path=str(root))
    for folder in folders:
        label = schema.label_of(folder.name)
        if label is None:
            raise DataError(f"sub-folder '{folder.name}' is not a class of dataset '{schema.name}' "
                            f"({', '.join(schema.classes)})", path=str(folder))
        files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
        if not files:
            _skip(reading, str(folder), "empty class folder", strict, folder)
            continue
        for path in files:
            _add(reading, path, label, "", is_test, schema.size, strict)


def read_folder(root: Path, schema: Schema, *, strict: bool) -> Reading:
    reading = Reading()
    splits = {p.name.lower(): p for p in root.iterdir() if p.is_dir() and p.name.lower() in SPLIT_FOLDERS}
    if "train" in splits:
        reading.has_split = "test" in splits
        _class_folders(splits["train"], schema, reading, False, strict)
        if "test" in splits:
            _class_folders(splits["test"], schema, reading, True, strict)
        if "valid" in splits:
            reading.notes.append(f"{splits['valid']} is not used: fedcare trains on train/ and tests on test/")
    elif splits:
        raise DataError("a split layout needs a train/ folder (train/<class>/, test/<class>/)", path=str(root))
    else:
        _class_folders(root, schema, reading, False, strict)
    return reading


def read_manifest(path: Path, schema: Schema, *, strict: bool) -> Reading:
    reading = Reading()
    try:
        with path.open(newline="", encoding="utf-8-sig") as fh:
            rows = list(csv.reader(fh))
    except UnicodeDecodeError:
        raise DataError("manifest is not a UTF-8 CSV file", path=str(path)) from None
    if not rows:
        raise DataError("manifest is empty", path=str(path))
    header = [h.strip().lower() for h in rows[0]]
    for need in ("path", "label"):
        if need not in header:
            raise DataError(f"manifest needs a '{need}' column (path, label[, slide|patient][, split])",
                            path=str(path), row=1)
    col = {name: header.index(name) for name in header}
    group_col = col.get("slide", col.get("patient"))
    split_col = col.get("split")
    reading.has_groups = group_col is not None
    reading.has_split = split_col is not None
    for row_no, row in enumerate(rows[1:], start=2):
        if not any(cell.strip() for cell in row):
            continue
        if len(row) < len(header):
            raise DataError(f"expected {len(header)} fields, found {len(row)}", path=str(path), row=row_no)
        label = schema.label_of(row[col["label"]])
        if label is None:
            raise DataError(f"unknown class (dataset '{schema.name}': {', '.join(schema.classes)})",
                            path=str(path), row=row_no, column="label")
        is_test = False
        if split_col is not None:
            split = row[split_col].strip().lower()
            if split not in ("train", "test", "valid"):
                raise DataError("split must be train, test or valid", path=str(path), row=row_no, column="split")
            if split == "valid":
                continue
            is_test = split == "test"
        group = row[group_col].strip() if group_col is not None else ""
        if group_col is not None and not group:
            raise DataError("empty slide/patient id", path=str(path), row=row_no, column=header[group_col])
        image_path = Path(row[col["path"]].strip())
        if not image_path.is_absolute():
            image_path = path.parent / image_path
        _add(reading, image_path, label, group, is_test, schema.size, strict,
             where=f"{image_path} (manifest row {row_no})")
    return reading


def read(path: Path, schema: Schema, *, strict: bool) -> Reading:
    """Read a hospital's folder or manifest; DataError names the path when nothing is usable."""
    path = Path(path)
    if not path.exists():
        raise DataError("no such file or folder", path=str(path))
    if path.is_dir():
        reading = read_folder(path, schema, strict=strict)
    elif path.suffix.lower() == ".csv":
        reading = read_manifest(path, schema, strict=strict)
    else:
        raise DataError("expected a folder of class sub-folders or a CSV manifest (path, label[, slide])",
                        path=str(path))
    if not reading.images:
        raise DataError(f"no usable image ({len(reading.skipped)} skipped)", path=str(path))
    if reading.duplicates:
        reading.notes.append(f"{reading.duplicates} byte-identical duplicate file(s) dropped")
    if reading.has_split and not any(reading.is_test):
        reading.notes.append("no test images: the split was drawn at random")
        reading.has_split = False
    return reading


def stack(images: Sequence[np.ndarray]) -> np.ndarray:
    return np.stack(images).astype(np.uint8, copy=False)
