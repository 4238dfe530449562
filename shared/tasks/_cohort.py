"""Longitudinal treatment histories: the hospital CSV schema and a seeded cohort generator.

Collaborative filtering needs patients who tried several treatments, with a recorded
response to each. No openly licensed record set of that shape exists, so fedcare ships
a documented generator whose truth is known (latent patient and treatment factors), so
that how well a recommender recovers it is measurable; a hospital brings its own
histories as a CSV in the schema below.

**Schema** (one row per treatment tried; comma-separated, header row):

* ``patient``: the hospital's own patient identifier (text, non-empty),
* ``treatment``: one of ``TREATMENTS`` (regimens built from the components ``A``-``E``),
* ``response``: the recorded response, a number in ``RESPONSE_RANGE`` (higher is better:
  the fraction of the expected clinical improvement reached),
* ``time`` (optional): when it was tried (any increasing number, e.g. months),
* ``x1``-``x6`` (optional): baseline covariates; constant for one patient.

A (patient, treatment, time) triple appears at most once. Every error names file, row
and column; nothing trains on a file with any.

**Generator** (``generate``): K = 15 treatments (5 single components, 10 pairs),
latent dimension 3. Treatment factors ``v_t = M_t G + 0.5 e_t`` (``M_t`` multi-hot
components: the content side explains part of them), patient factors
``u_p = sqrt(0.3 / 6) x_p A + sqrt(0.7) e_p`` (covariates explain 30 % of their variance,
the rest shows only in the patient's history), response
``sigmoid(-0.2 + b_t + 1.5 u_p . v_t + 0.5 e)``. Each patient tries 8-12 of the 15
treatments in random order; patients belong to four hospitals of unequal size whose
covariates are shifted (non-IID).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import DataError
from .. import tabular
from ..tabular import MISSING_MARKERS

COMPONENTS = ("A", "B", "C", "D", "E")
TREATMENTS = COMPONENTS + tuple("+".join(p) for p in itertools.combinations(COMPONENTS, 2))
COVARIATES = ("x1", "x2", "x3", "x4", "x5", "x6")
RESPONSE_RANGE = (0.0, 1.0)
REQUIRED = ("patient", "treatment", "response")
SITES = (("north", 0.4), ("south", 0.3), ("east", 0.2), ("west", 0.1))
LATENT = 3
#: Share of the patient factors' variance explained by the covariates (the rest is only
#: learnable from the patient's own history).
COVARIATE_SHARE = 0.3
NOISE = 0.5


def component_matrix() -> np.ndarray:
    return np.array([[float(c in t.split("+")) for c in COMPONENTS] for t in TREATMENTS], dtype=np.float32)


@dataclass(frozen=True)
class History:
    """Validated rows of one history file (or of the generator)."""

    patient: np.ndarray  # object (str)
    treatment: np.ndarray  # int64 index into TREATMENTS
    response: np.ndarray  # float64
    time: np.ndarray  # float64 (row order when the file has no time)
    x: np.ndarray  # float64 [n, len(COVARIATES)], NaN = missing


@dataclass(frozen=True)
class Truth:
    """The generator's latent factors (for measuring recovery)."""

    patient_factors: dict[str, np.ndarray]
    treatment_factors: np.ndarray
    treatment_bias: np.ndarray


def generate(seed: int = 0, n_patients: int = 800) -> tuple[pd.DataFrame, Truth]:
    """A cohort as a frame (site, patient, treatment, response, time, x1-x6) and its truth."""
    rng = np.random.default_rng(seed)
    m = component_matrix().astype(np.float64)
    g = rng.normal(size=(len(COMPONENTS), LATENT))
    v = m @ g + 0.5 * rng.normal(size=(len(TREATMENTS), LATENT))
    b = m @ (0.5 * rng.normal(size=len(COMPONENTS))) + 0.3 * rng.normal(size=len(TREATMENTS))
    a = rng.normal(size=(len(COVARIATES), LATENT))
    shares = np.array([s for _, s in SITES])
    site_of = rng.choice(len(SITES), size=n_patients, p=shares / shares.sum())
    rows, factors = [], {}
    for i in range(n_patients):
        site = SITES[site_of[i]][0]
        x = rng.normal(size=len(COVARIATES))
        x[0] += 0.6 * (site_of[i] - 1.5)  # hospitals differ in case mix
        u = math.sqrt(COVARIATE_SHARE / len(COVARIATES)) * x @ a + math.sqrt(1 - COVARIATE_SHARE) * rng.normal(size=LATENT)
        pid = f"{site}-{i:04d}"
        factors[pid] = u
        tried = rng.permutation(len(TREATMENTS))[: rng.integers(8, 13)]
        for t_i, t in enumerate(tried):
            logit = -0.2 + b[t] + 1.5 * u @ v[t] + NOISE * rng.normal()
            rows.append((site, pid, TREATMENTS[t], round(1 / (1 + math.exp(-logit)), 4), t_i + 1,
                         *np.round(x, 4)))
    frame = pd.DataFrame(rows, columns=["site", "patient", "treatment", "response", "time", *COVARIATES])
    return frame, Truth(factors, v, b)


def from_frame(frame: pd.DataFrame, source: str) -> History:
    """Validate a text (or typed) frame in the history schema; errors name row and column."""
    frame = frame.copy()
    frame.columns = [str(c).strip() for c in frame.columns]
    missing = [c for c in REQUIRED if c not in frame.columns]
    if missing:
        raise DataError(f"missing column(s): {', '.join(missing)} (schema: patient, treatment, response"
                        "[, time][, x1..x6])", path=source, column=missing[0])
    if len(frame) == 0:
        raise DataError("file has a header but no records", path=source)
    text = {c: frame[c].astype(str).str.strip() for c in frame.columns}
    patient = text["patient"].to_numpy(dtype=object)
    empty = np.flatnonzero(text["patient"].isin(MISSING_MARKERS).to_numpy())
    if len(empty):
        raise DataError("patient identifier is missing", path=source, row=int(empty[0]) + 2, column="patient")
    index = {name: i for i, name in enumerate(TREATMENTS)}
    treatment = text["treatment"].map(index)
    unknown = np.flatnonzero(treatment.isna().to_numpy())
    if len(unknown):
        raise DataError(f"unknown treatment; allowed: {', '.join(TREATMENTS)}", path=source,
                        row=int(unknown[0]) + 2, column="treatment")
    response = _numbers(text["response"], source, "response", allow_missing=False)
    lo, hi = RESPONSE_RANGE
    out = np.flatnonzero((response < lo) | (response > hi))
    if len(out):
        raise DataError(f"response outside the declared range [{lo:g}, {hi:g}]", path=source,
                        row=int(out[0]) + 2, column="response")
    if "time" in frame.columns:
        time = _numbers(text["time"], source, "time", allow_missing=False)
    else:
        time = np.arange(len(frame), dtype=np.float64)
    # Without a time column a treatment may appear once per patient.
    key = pd.DataFrame({"p": patient, "t": treatment.to_numpy(),
                        "time": time if "time" in frame.columns else np.zeros(len(frame))})
    dup = np.flatnonzero(key.duplicated().to_numpy())
    if len(dup):
        first = int(np.flatnonzero((key == key.iloc[dup[0]]).all(axis=1).to_numpy())[0])
        raise DataError(f"duplicate (patient, treatment, time): same as row {first + 2}", path=source,
                        row=int(dup[0]) + 2, column="time" if "time" in frame.columns else "treatment")
    x = np.full((len(frame), len(COVARIATES)), np.nan)
    for j, c in enumerate(COVARIATES):
        if c not in frame.columns:
            continue
        x[:, j] = _numbers(text[c], source, c, allow_missing=True)
        first = pd.DataFrame({"p": patient, "v": x[:, j]}).groupby("p", sort=False)["v"].transform("first")
        varies = (~np.isnan(x[:, j]) & (x[:, j] != first.to_numpy()))
        if varies.any():
            raise DataError("a baseline covariate must be the same in all of a patient's rows",
                            path=source, row=int(np.flatnonzero(varies)[0]) + 2, column=c)
    return History(patient=patient, treatment=treatment.to_numpy(dtype=np.int64), response=response,
                   time=time, x=x)


def read_csv(path: Path) -> History:
    """A hospital's history CSV, validated (``DataError`` names file, row, column)."""
    frame = tabular.read_text_csv(path, skipinitialspace=True)
    return from_frame(frame, str(path))


def holdout_mask(patient: np.ndarray, time: np.ndarray, fraction: float = 0.5, min_rows: int = 4) -> np.ndarray:
    """Test rows: the latest ``fraction`` of each history with at least ``min_rows`` rows.

    Held-out responses are what ranking is scored on; a patient keeps their earlier rows
    for training, so their embedding is learned before their later treatments are ranked.
    """
    mask = np.zeros(len(patient), dtype=bool)
    order = np.lexsort((np.arange(len(patient)), time, patient))
    p = np.asarray(patient)[order]
    starts = np.flatnonzero(np.r_[True, p[1:] != p[:-1]])
    ends = np.r_[starts[1:], len(p)]
    for s, e in zip(starts, ends):
        n = e - s
        if n >= min_rows:
            k = max(2, int(n * fraction))
            mask[order[e - k:e]] = True
    return mask


def _numbers(text: pd.Series, source: str, column: str, *, allow_missing: bool) -> np.ndarray:
    missing = text.isin(MISSING_MARKERS)
    values = pd.to_numeric(text.where(~missing, None), errors="coerce")
    bad = values.isna() & ~missing
    if bad.any():
        raise DataError("not a number", path=source, row=int(np.flatnonzero(bad.to_numpy())[0]) + 2, column=column)
    if not allow_missing and missing.any():
        raise DataError("value is missing", path=source, row=int(np.flatnonzero(missing.to_numpy())[0]) + 2,
                        column=column)
    out = values.to_numpy(dtype=np.float64)
    inf = np.flatnonzero(np.isinf(out))
    if len(inf):
        raise DataError("not a finite number", path=source, row=int(inf[0]) + 2, column=column)
    return out
