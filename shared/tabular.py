"""Declared schemas for tabular case records: reading, cleaning, federated scaling.

A hospital's CSV is read strictly through a ``Schema``: every error names the file, the
row (1-based, counting the header as row 1) and the column. Cleaning is the same for a
builtin dataset and a hospital's file:

* type coercion (text to numbers; missing markers ``""``, ``?``, ``NA``, ``NaN``),
* impossible values (outside the declared range, not in a declared category set, or a
  declared impossible value such as cholesterol 0) become missing,
* exact duplicate records are removed.

Scaling and imputation use federation-wide statistics computed from sums only
(``stats`` / ``finalize``): each site sends counts, sums and sums of squares.
"""

from __future__ import annotations

import gzip
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from .errors import DataError

MISSING_MARKERS = ("", "?", "NA", "N/A", "NaN", "nan", "null", "NULL")


@dataclass(frozen=True)
class Column:
    """One feature column: numeric (with a plausible range) or categorical (codes)."""

    name: str
    kind: str = "numeric"  # numeric | binary | categorical
    lo: float = -math.inf
    hi: float = math.inf
    categories: tuple[float, ...] = ()
    impossible: tuple[float, ...] = ()  # values that mean "not measured"
    description: str = ""
    #: Entered as log(1 + value) before the federated standardisation (counts and
    #: durations with long right tails); cleaning and reports see the raw value.
    log1p: bool = False

    def width(self) -> int:
        return len(self.categories) if self.kind == "categorical" else 1


@dataclass(frozen=True)
class Schema:
    """Feature columns, the label column and the label values it may take."""

    name: str
    columns: tuple[Column, ...]
    label: str
    label_values: tuple[float, ...]
    positive: tuple[float, ...] = (1,)
    aliases: dict[str, str] = field(default_factory=dict)

    @property
    def feature_names(self) -> list[str]:
        return [c.name for c in self.columns]

    def input_dim(self) -> int:
        # encoded columns + one missingness indicator per column
        return sum(c.width() for c in self.columns) + len(self.columns)

    def describe(self) -> dict[str, object]:
        """The declared schema as plain data (model cards, reports)."""
        cols = []
        for c in self.columns:
            entry: dict[str, object] = {"name": c.name, "kind": c.kind, "description": c.description}
            if math.isfinite(c.lo):
                entry["min"] = c.lo
            if math.isfinite(c.hi):
                entry["max"] = c.hi
            if c.categories:
                entry["categories"] = list(c.categories)
            if c.log1p:
                entry["scaling"] = "log(1 + value), then standardised"
            cols.append(entry)
        return {"columns": cols, "label": self.label, "label_values": list(self.label_values),
                "positive": list(self.positive), "encoded_inputs": self.encoded_names()}

    def encoded_names(self) -> list[str]:
        names: list[str] = []
        for c in self.columns:
            if c.kind == "categorical":
                names += [f"{c.name}={v:g}" for v in c.categories]
            else:
                names.append(c.name)
        return names + [f"{c.name}_missing" for c in self.columns]


@dataclass(frozen=True)
class Table:
    """Cleaned features (float64, NaN = missing) and integer labels of one site."""

    x: np.ndarray
    y: np.ndarray
    cleaning: dict[str, int] = field(default_factory=dict)


def read_text_csv(path: Path, **options: object) -> pd.DataFrame:
    """A hospital's CSV (gzip allowed) as text cells, so every value can be checked and
    located; a missing, empty or unreadable file is a DataError naming it."""
    path = Path(path)
    if not path.exists():
        raise DataError("file not found", path=str(path))
    if path.is_dir():
        raise DataError("expected a CSV file, got a folder", path=str(path))
    if path.stat().st_size == 0:
        raise DataError("file is empty", path=str(path))
    try:
        return pd.read_csv(path, dtype=str, keep_default_na=False, compression="infer", **options)
    except pd.errors.EmptyDataError:
        raise DataError("file is empty", path=str(path)) from None
    except (pd.errors.ParserError, UnicodeDecodeError, OSError, EOFError, gzip.BadGzipFile) as exc:
        raise DataError(f"not a readable CSV ({type(exc).__name__})", path=str(path)) from None


def read_csv(schema: Schema, path: Path, *, require_label: bool = True) -> pd.DataFrame:
    """Read a hospital CSV as text through ``schema`` (column aliases, required columns)."""
    frame = read_text_csv(path, skipinitialspace=True)
    frame.columns = [schema.aliases.get(c.strip(), c.strip()) for c in frame.columns]
    if len(frame) == 0:
        raise DataError("file has a header but no records", path=str(path))
    if require_label and schema.label not in frame.columns:
        raise DataError(f"label column is missing (expected '{schema.label}')",
                        path=str(path), column=schema.label)
    missing = [c for c in schema.feature_names if c not in frame.columns]
    if missing:
        raise DataError(f"missing feature column(s): {', '.join(missing)}",
                        path=str(path), column=missing[0])
    return frame


def parse_frame(schema: Schema, frame: pd.DataFrame, source: str) -> tuple[np.ndarray, np.ndarray]:
    """Text frame -> (features with NaN, raw label values); errors name row and column."""
    n = len(frame)
    x = np.empty((n, len(schema.columns)), dtype=np.float64)
    for j, col in enumerate(schema.columns):
        x[:, j] = _numeric(frame[col.name], source, col.name)
    y_raw = _numeric(frame[schema.label], source, schema.label)
    bad = np.flatnonzero(np.isnan(y_raw))
    if len(bad):
        raise DataError("label is missing", path=source, row=int(bad[0]) + 2, column=schema.label)
    allowed = np.isin(y_raw, schema.label_values)
    if not allowed.all():
        i = int(np.flatnonzero(~allowed)[0])
        raise DataError(
            f"unknown label value {frame[schema.label].iloc[i]!r}; allowed: "
            + ", ".join(f"{v:g}" for v in schema.label_values),
            path=source, row=i + 2, column=schema.label)
    return x, y_raw


def parse_column(frame: pd.DataFrame, column: str, source: str) -> np.ndarray:
    """One column as floats (NaN = missing); non-numeric text is an error at its row."""
    return _numeric(frame[column], source, column)


def _numeric(series: pd.Series, source: str, column: str) -> np.ndarray:
    text = series.astype(str).str.strip()
    is_missing = text.isin(MISSING_MARKERS)
    values = pd.to_numeric(text.where(~is_missing, None), errors="coerce")
    bad = values.isna() & ~is_missing
    if bad.any():
        i = int(np.flatnonzero(bad.to_numpy())[0])
        raise DataError(f"non-numeric value {text.iloc[i]!r}", path=source, row=i + 2, column=column)
    return values.to_numpy(dtype=np.float64)


def clean(schema: Schema, x: np.ndarray, y_raw: np.ndarray, *, dedupe: bool = True) -> Table:
    """Impossible values -> missing; exact duplicates removed; labels binarised."""
    x = x.copy()
    counts: dict[str, int] = {}
    for j, col in enumerate(schema.columns):
        v = x[:, j]
        impossible = np.isin(v, col.impossible) | (v < col.lo) | (v > col.hi)
        if col.kind in ("categorical", "binary"):
            cats = col.categories if col.kind == "categorical" else (0.0, 1.0)
            impossible |= ~np.isin(v, cats) & ~np.isnan(v)
        impossible &= ~np.isnan(v)
        if impossible.any():
            counts[f"impossible:{col.name}"] = int(impossible.sum())
        v[impossible] = np.nan
    both = np.column_stack([x, y_raw])
    frame = pd.DataFrame(both)
    dup = frame.duplicated().to_numpy() if dedupe else np.zeros(len(frame), dtype=bool)
    if dup.any():
        counts["duplicates_removed"] = int(dup.sum())
    keep = ~dup
    y = np.isin(y_raw[keep], schema.positive).astype(np.int64)
    return Table(x=x[keep], y=y, cleaning=counts)


def model_scale(schema: Schema, x: np.ndarray) -> np.ndarray:
    """Raw values on the scale the model is fitted on: ``log1p`` columns as log(1 + value)."""
    logged = [j for j, c in enumerate(schema.columns) if c.log1p]
    if not logged:
        return x
    x = np.array(x, dtype=np.float64, copy=True)
    x[:, logged] = np.log1p(np.maximum(x[:, logged], 0.0))
    return x


def stats(schema: Schema, x: np.ndarray) -> dict[str, np.ndarray]:
    """Per-column count of observed values, their sum and sum of squares (no rows)."""
    x = model_scale(schema, x)
    observed = ~np.isnan(x)
    filled = np.where(observed, x, 0.0)
    return {
        "count": observed.sum(axis=0).astype(np.float64),
        "sum": filled.sum(axis=0),
        "sumsq": (filled ** 2).sum(axis=0),
    }


def finalize(totals: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Federation-wide mean and standard deviation per column from summed stats."""
    count = np.maximum(totals["count"], 1.0)
    mean = totals["sum"] / count
    var = np.maximum(totals["sumsq"] / count - mean ** 2, 0.0)
    std = np.sqrt(var)
    std[std < 1e-8] = 1.0
    return {"mean": mean.astype(np.float64), "std": std.astype(np.float64)}


def encode(schema: Schema, x: np.ndarray, prep: dict[str, np.ndarray]) -> np.ndarray:
    """Impute (federated mean), standardise, one-hot categoricals, add missing flags."""
    mean, std = prep["mean"], prep["std"]
    x = model_scale(schema, x)
    parts: list[np.ndarray] = []
    missing = np.isnan(x)
    for j, col in enumerate(schema.columns):
        v = x[:, j]
        if col.kind == "categorical":
            onehot = np.stack([(v == c) for c in col.categories], axis=1).astype(np.float32)
            parts.append(onehot)
        else:
            z = (np.where(missing[:, j], mean[j], v) - mean[j]) / std[j]
            parts.append(z[:, None].astype(np.float32))
    parts.append(missing.astype(np.float32))
    return np.concatenate(parts, axis=1)


def describe(schema: Schema, frame: pd.DataFrame) -> list[dict[str, object]]:
    """Per-column facts for ``hospital check``: type, missing count, range."""
    rows = []
    for col in list(schema.columns) + [Column(schema.label, kind="label")]:
        text = frame[col.name].astype(str).str.strip()
        miss = int(text.isin(MISSING_MARKERS).sum())
        vals = pd.to_numeric(text.where(~text.isin(MISSING_MARKERS), None), errors="coerce")
        rows.append({
            "column": col.name, "kind": col.kind, "missing": miss,
            "min": float(np.nanmin(vals)) if vals.notna().any() else math.nan,
            "max": float(np.nanmax(vals)) if vals.notna().any() else math.nan,
        })
    extra = [c for c in frame.columns if c not in schema.feature_names + [schema.label]]
    for c in extra:
        rows.append({"column": c, "kind": "ignored", "missing": 0, "min": math.nan, "max": math.nan})
    return rows


def to_frame(schema: Schema, x: np.ndarray, labels: Sequence[float]) -> pd.DataFrame:
    frame = pd.DataFrame(x, columns=schema.feature_names)
    frame[schema.label] = np.asarray(labels)
    return frame
