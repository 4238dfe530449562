"""ACTG 175: which of four HIV regimens, from baseline covariates only.

The trial (Hammer et al., NEJM 1996) randomised 2,139 patients 1:1:1:1 to four
regimens, so a recommendation policy's value can be estimated from it without a model of
who got what (see ``_policy``). The data ship in ``fedcare/shared/datasets/actg175``.

Only covariates measured before randomisation may be inputs. ``cd420``, ``cd496``,
``cd820`` and ``offtrt`` are measured after it (they carry the treatment's effect and
the outcome's early signs: a model using them would look excellent and recommend
nothing). ``assert_baseline`` refuses them, and is called wherever a feature list is
built, so a later edit cannot slip one in.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import numpy as np
import pandas as pd

from .. import tabular
from ..errors import ConfigError, DataError

DATA_FILE = Path(__file__).resolve().parent.parent / "datasets" / "actg175" / "ACTG175.txt"

#: Columns measured after randomisation, or the assignment and outcome themselves.
POST_RANDOMISATION = frozenset({"cd420", "cd496", "cd820", "offtrt", "r", "cens", "days", "arms", "treat"})

ARMS = ("zidovudine", "zidovudine+didanosine", "zidovudine+zalcitabine", "didanosine")
COMPONENTS = ("zidovudine", "didanosine", "zalcitabine")
#: Known randomisation probabilities (1:1:1:1 design).
PROPENSITY = np.full(len(ARMS), 0.25)


def assert_baseline(names: Iterable[str]) -> list[str]:
    """The names unchanged, or ConfigError if any is measured after randomisation."""
    names = list(names)
    bad = [n for n in names if n in POST_RANDOMISATION]
    if bad:
        raise ConfigError(f"actg175: column(s) {', '.join(bad)} are measured after randomisation "
                          "(or are the assignment/outcome) and must never be model inputs")
    return names


def make_schema(columns: Iterable[tabular.Column]) -> tabular.Schema:
    columns = tuple(columns)
    assert_baseline(c.name for c in columns)
    return tabular.Schema(name="actg175", columns=columns, label="cens", label_values=(0, 1), positive=(1,))


SCHEMA = make_schema((
    tabular.Column("age", lo=0, hi=100, description="years"),
    tabular.Column("wtkg", lo=20, hi=250, description="weight, kg"),
    tabular.Column("hemo", kind="binary", description="haemophilia"),
    tabular.Column("homo", kind="binary", description="homosexual activity"),
    tabular.Column("drugs", kind="binary", description="history of IV drug use"),
    tabular.Column("karnof", lo=0, hi=100, description="Karnofsky score"),
    tabular.Column("oprior", kind="binary", description="non-zidovudine antiretroviral therapy before"),
    tabular.Column("z30", kind="binary", description="zidovudine in the 30 days before"),
    tabular.Column("zprior", kind="binary", description="zidovudine before the study"),
    tabular.Column("preanti", lo=0, hi=10000, description="days of prior antiretroviral therapy", log1p=True),
    tabular.Column("race", kind="binary", description="0 white, 1 non-white"),
    tabular.Column("gender", kind="binary", description="0 female, 1 male"),
    tabular.Column("str2", kind="binary", description="antiretroviral history: 0 naive, 1 experienced"),
    tabular.Column("strat", kind="categorical", categories=(1, 2, 3),
                   description="1 naive, 2 1-52 weeks prior therapy, 3 > 52 weeks"),
    tabular.Column("symptom", kind="binary", description="symptomatic"),
    tabular.Column("cd40", lo=0, hi=3000, description="CD4 count at baseline", log1p=True),
    tabular.Column("cd80", lo=0, hi=10000, description="CD8 count at baseline", log1p=True),
))

ARM_COLUMN = "arms"
ID_COLUMN = "pidnum"


def component_matrix() -> np.ndarray:
    """Regimens as multi-hot rows over their drug components."""
    return np.array([[float(c in arm.split("+")) for c in COMPONENTS] for arm in ARMS], dtype=np.float32)


def load_builtin() -> pd.DataFrame:
    return pd.read_csv(DATA_FILE, sep=r"\s+", na_values="NA")


def parse(frame: pd.DataFrame, source: str, *, require_outcome: bool = True):
    """(ids, features with NaN, arm or -1, event or NaN) from a text frame; errors located."""
    if require_outcome and ARM_COLUMN not in frame.columns:
        raise DataError(f"treatment column is missing (expected '{ARM_COLUMN}', 0-3)", path=source,
                        column=ARM_COLUMN)
    x = np.column_stack([tabular.parse_column(frame, c.name, source) for c in SCHEMA.columns])
    n = len(frame)
    arm = np.full(n, -1, dtype=np.int64)
    if ARM_COLUMN in frame.columns:
        raw = tabular.parse_column(frame, ARM_COLUMN, source)
        bad = ~np.isin(raw, np.arange(len(ARMS)))
        if require_outcome and bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise DataError(f"unknown treatment arm; allowed: 0-{len(ARMS) - 1} ({', '.join(ARMS)})",
                            path=source, row=i + 2, column=ARM_COLUMN)
        arm = np.where(bad, -1, np.nan_to_num(raw, nan=-1)).astype(np.int64)
    event = np.full(n, np.nan)
    if SCHEMA.label in frame.columns:
        event = tabular.parse_column(frame, SCHEMA.label, source)
        bad = ~np.isin(event, (0.0, 1.0))
        if require_outcome and bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise DataError("outcome must be 0 (no event) or 1 (event)", path=source, row=i + 2,
                            column=SCHEMA.label)
    elif require_outcome:
        raise DataError(f"outcome column is missing (expected '{SCHEMA.label}')", path=source,
                        column=SCHEMA.label)
    ids = (frame[ID_COLUMN].astype(str).str.strip().to_numpy() if ID_COLUMN in frame.columns
           else np.array([f"row{i + 2}" for i in range(n)]))
    table = tabular.clean(SCHEMA, x, np.nan_to_num(event), dedupe=False)
    return ids.astype(object), table.x, arm, event, table.cleaning


def read_csv(path: Path, *, require_outcome: bool = True) -> pd.DataFrame:
    """A hospital's ACTG-format CSV (comma-separated, header row) as text."""
    return tabular.read_csv(SCHEMA, path, require_label=require_outcome)


def ignored_post_randomisation(columns: Iterable[str]) -> list[str]:
    """Post-randomisation columns present in a file (reported, never read as features)."""
    return [c for c in columns if c in POST_RANDOMISATION - {"cens", "arms"}]
