"""Case diagnosis from tabular records (demographics, vitals, labs).

Datasets:

* ``heart``: UCI Heart Disease from four hospitals (Cleveland, Hungary, Switzerland,
  VA Long Beach), shipped in ``fedcare/shared/datasets/heart_disease`` with its citation.
  Rows and per-centre train/test sizes follow FLamby's Fed-Heart-Disease (records
  complete in the first ten columns; 199/104, 172/89, 30/16, 85/45), but all 13
  features are kept, with imputation and missingness indicators.
* ``breast-cancer``: the Wisconsin diagnostic data shipped with scikit-learn, one pool
  that the simulator deals into N sites (IID or Dirichlet).

Model: the 64-32 MLP with dropout (the source article's baseline), logistic output.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import TensorDataset

from .. import tabular
from ..errors import ConfigError
from ..metrics import binary_metrics
from ..registry import register
from ..splits import split_site
from .base import CheckReport, Records, Site, Task, row_digests

DATA_DIR = Path(__file__).resolve().parent.parent / "datasets" / "heart_disease"

HEART = tabular.Schema(
    name="heart",
    columns=(
        tabular.Column("age", lo=1, hi=120, description="years"),
        tabular.Column("sex", kind="binary", description="1 male, 0 female"),
        tabular.Column("cp", kind="categorical", categories=(1, 2, 3, 4), description="chest pain type"),
        tabular.Column("trestbps", lo=50, hi=250, impossible=(0,), description="resting blood pressure, mm Hg"),
        tabular.Column("chol", lo=50, hi=700, impossible=(0,), description="serum cholesterol, mg/dl"),
        tabular.Column("fbs", kind="binary", description="fasting blood sugar > 120 mg/dl"),
        tabular.Column("restecg", kind="categorical", categories=(0, 1, 2), description="resting ECG"),
        tabular.Column("thalach", lo=40, hi=250, impossible=(0,), description="maximum heart rate"),
        tabular.Column("exang", kind="binary", description="exercise-induced angina"),
        tabular.Column("oldpeak", lo=-5, hi=10, description="ST depression"),
        tabular.Column("slope", kind="categorical", categories=(1, 2, 3), description="ST slope"),
        tabular.Column("ca", lo=0, hi=3, description="major vessels coloured (0-3)"),
        tabular.Column("thal", kind="categorical", categories=(3, 6, 7), description="thallium test"),
    ),
    label="num",
    label_values=(0, 1, 2, 3, 4),
    positive=(1, 2, 3, 4),
    aliases={"target": "num", "thalch": "thalach"},
)

HEART_SITES = {  # file stem -> (site name, FLamby test size, FLamby total)
    "cleveland": ("cleveland", 104, 303),
    "hungarian": ("hungary", 89, 261),
    "switzerland": ("switzerland", 16, 46),
    "va": ("va_long_beach", 45, 130),
}


def _breast_schema() -> tabular.Schema:
    from sklearn.datasets import load_breast_cancer

    names = [n.replace(" ", "_") for n in load_breast_cancer().feature_names]
    return tabular.Schema(
        name="breast-cancer",
        columns=tuple(tabular.Column(n, lo=0) for n in names),
        label="malignant",
        label_values=(0, 1),
        positive=(1,),
    )


@lru_cache(maxsize=None)
def schema_for(dataset: str) -> tabular.Schema:
    if dataset == "heart":
        return HEART
    if dataset == "breast-cancer":
        return _breast_schema()
    raise ConfigError(f"diagnosis: unknown dataset '{dataset}' (heart, breast-cancer)")


class MLP(nn.Module):
    """Two hidden layers (64, 32) with ReLU and dropout, one logit out.

    ``site_bias`` is a per-hospital intercept (a centre effect, as in multi-centre
    studies): it is trained with DP like every other parameter but never leaves the
    hospital (``Diagnosis.local_prefixes``), so each site keeps its own base rate while
    the shared weights are federated. It is a bias-free Linear on a constant input so
    that Opacus computes its per-sample gradients.
    """

    def __init__(self, in_dim: int, hidden: Sequence[int] = (64, 32), dropout: float = 0.1) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        prev = in_dim
        for h in hidden:
            layers += [nn.Linear(prev, h), nn.ReLU(), nn.Dropout(dropout)]
            prev = h
        layers.append(nn.Linear(prev, 1))
        self.net = nn.Sequential(*layers)
        self.site_bias = nn.Linear(1, 1, bias=False)
        nn.init.zeros_(self.site_bias.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.net(x) + self.site_bias(torch.ones_like(x[:, :1]))).squeeze(-1)


@register
class Diagnosis(Task):
    name = "diagnosis"
    datasets = ("heart", "breast-cancer")
    models = ("logreg", "mlp")
    #: Chosen by measurement on the heart federation (bench/heart.py, README): under DP
    #: at ε = 1 the 4.4k-parameter MLP drowns in noise while logistic regression (37
    #: parameters) keeps its accuracy; without DP both reach about 0.84.
    defaults = {
        "dataset": "heart",
        "model": "logreg",
        "num_rounds": 5,
        "local_epochs": 1,
        "batch_size": 32,
        "lr": 0.2,
        "optimizer": "sgd",
        "weight_decay": 1e-4,
        "dropout": 0.1,
    }
    test_fraction = 0.34
    local_prefixes = ("site_bias",)

    # ---- data -------------------------------------------------------------------
    def builtin_sites(self, dataset: str, seed: int) -> list[Site]:
        if dataset == "heart":
            return [split_site(self, name, recs, test / total, seed)
                    for name, recs, test, total in _heart_records()]
        if dataset == "breast-cancer":
            from sklearn.datasets import load_breast_cancer

            data = load_breast_cancer()
            schema = schema_for(dataset)
            malignant = (data.target == 0).astype(float)  # sklearn: 0 = malignant
            table = tabular.clean(schema, data.data.astype(np.float64), malignant)
            recs = Records(data=table.x, labels=table.y, source="sklearn:breast_cancer")
            return [split_site(self, "wisconsin", recs, 0.25, seed)]
        schema_for(dataset)
        raise AssertionError

    def read_file(self, path: Path, dataset: str, *, strict: bool = False) -> Records:
        schema = schema_for(dataset)
        frame = tabular.read_csv(schema, path)
        x, y_raw = tabular.parse_frame(schema, frame, str(path))
        table = tabular.clean(schema, x, y_raw)
        if len(table.y) == 0:
            from ..errors import DataError

            raise DataError("no records left after cleaning", path=str(path))
        return Records(data=table.x, labels=table.y, source=str(path))

    def check_file(self, path: Path, dataset: str) -> CheckReport:
        schema = schema_for(dataset)
        report = CheckReport(path=str(path))
        frame = tabular.read_csv(schema, path)
        report.rows = len(frame)
        report.columns = tabular.describe(schema, frame)
        x, y_raw = tabular.parse_frame(schema, frame, str(path))
        table = tabular.clean(schema, x, y_raw)
        values, counts = np.unique(table.y, return_counts=True)
        report.label_counts = {("positive" if v else "negative"): int(c) for v, c in zip(values, counts)}
        for key, count in table.cleaning.items():
            if key == "duplicates_removed":
                report.notes.append(f"{count} exact duplicate record(s) will be removed")
            else:
                report.notes.append(f"{count} impossible value(s) in '{key.split(':', 1)[1]}' treated as missing")
        extra = [c["column"] for c in report.columns if c["kind"] == "ignored"]
        if extra:
            report.notes.append("ignored column(s): " + ", ".join(extra))
        if len(values) < 2:
            report.problems.append("only one label class present: the site cannot evaluate ROC-AUC")
        if len(table.y) < 10:
            report.problems.append(f"only {len(table.y)} record(s): too few to train with DP")
        return report

    def input_schema(self, dataset: str) -> dict[str, Any]:
        return {"dataset": dataset, **schema_for(dataset).describe()}

    def take(self, records: Records, index: np.ndarray) -> Records:
        index = np.asarray(index, dtype=int)
        return Records(data=records.data[index], labels=records.labels[index],
                       groups=None if records.groups is None else records.groups[index],
                       source=records.source)

    def fingerprints(self, records: Records) -> np.ndarray:
        return row_digests(records.data, records.labels)

    def concat(self, parts: Sequence[Records]) -> Records:
        return Records(data=np.concatenate([p.data for p in parts]),
                       labels=np.concatenate([p.labels for p in parts]), source="pooled")

    # ---- federated preprocessing -------------------------------------------------
    def local_stats(self, train: Records, cfg: Any) -> dict[str, np.ndarray]:
        return tabular.stats(schema_for(cfg.dataset), train.data)

    def finalize_stats(self, totals: dict[str, np.ndarray], cfg: Any) -> dict[str, np.ndarray]:
        return tabular.finalize(totals)

    def to_dataset(self, records: Records, prep: dict[str, np.ndarray], cfg: Any, *, train: bool) -> TensorDataset:
        x = tabular.encode(schema_for(cfg.dataset), records.data, prep)
        return TensorDataset(torch.from_numpy(x), torch.from_numpy(records.labels.astype(np.float32)))

    # ---- model ------------------------------------------------------------------
    def build_model(self, cfg: Any) -> nn.Module:
        dim = schema_for(cfg.dataset).input_dim()
        if cfg.model == "logreg":
            return MLP(dim, hidden=(), dropout=0.0)
        if cfg.model != "mlp":
            raise ConfigError(f"diagnosis: unknown model '{cfg.model}' ({', '.join(self.models)})")
        return MLP(dim, dropout=cfg.dropout)

    def loss(self, model: nn.Module, batch: Sequence[torch.Tensor]) -> torch.Tensor:
        x, y = batch
        return nn.functional.binary_cross_entropy_with_logits(model(x), y)

    def predict(self, model: nn.Module, batch: Sequence[torch.Tensor]) -> tuple[np.ndarray, np.ndarray]:
        x, y = batch
        return torch.sigmoid(model(x)).cpu().numpy(), y.cpu().numpy()

    def metrics(self, scores: np.ndarray, targets: np.ndarray) -> dict[str, float]:
        return binary_metrics(scores, targets)

    def infer(self, model: nn.Module, prep: dict[str, np.ndarray], cfg: Any, inputs: Sequence[str]) -> pd.DataFrame:
        """Probability of disease for each record of each CSV (label column optional)."""
        schema = schema_for(cfg.dataset)
        frames = []
        for path in inputs:
            frame = tabular.read_csv(schema, Path(path), require_label=False)
            x = np.column_stack([tabular.parse_column(frame, c.name, path) for c in schema.columns])
            table = tabular.clean(schema, x, np.zeros(len(x)), dedupe=False)
            with torch.no_grad():
                prob = torch.sigmoid(model(torch.from_numpy(tabular.encode(schema, table.x, prep)))).numpy()
            frames.append(pd.DataFrame({"file": str(path), "row": np.arange(2, len(x) + 2),
                                        "p_positive": prob, "prediction": (prob >= 0.5).astype(int)}))
        return pd.concat(frames, ignore_index=True)


@lru_cache(maxsize=1)
def _heart_records() -> tuple[tuple[str, Records, int, int], ...]:
    """The four centres, FLamby's row selection, cleaned through the declared schema."""
    out = []
    names = HEART.feature_names + [HEART.label]
    for stem, (site, test, total) in HEART_SITES.items():
        path = DATA_DIR / f"processed.{stem}.data"
        frame = pd.read_csv(path, header=None, names=names, na_values="?")
        frame = frame[frame[names[:10]].notna().all(axis=1)]  # FLamby's rows
        table = tabular.clean(HEART, frame[HEART.feature_names].to_numpy(np.float64),
                              frame[HEART.label].to_numpy(np.float64))
        out.append((site, Records(data=table.x, labels=table.y, source=str(path)), test, total))
    return tuple(out)


def export_heart_csvs(folder: Path, *, split: str = "all", seed: int = 0) -> list[Path]:
    """Write each heart centre as a hospital CSV in the declared schema (for demos/tests)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for stem, (site, _, _) in HEART_SITES.items():
        frame = pd.read_csv(DATA_DIR / f"processed.{stem}.data", header=None,
                            names=HEART.feature_names + [HEART.label], na_values="?")
        path = folder / f"{site}.csv"
        frame.to_csv(path, index=False, na_rep="")
        paths.append(path)
    return paths
