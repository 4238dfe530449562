"""Classification metrics shared by the tasks (scikit-learn under the hood).

Metrics that are undefined on a site (ROC-AUC with one class in its test set) are
reported as NaN rather than a misleading number.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
from scipy.stats import rankdata
from sklearn import metrics as skm


def binary_metrics(prob: np.ndarray, y: np.ndarray, threshold: float = 0.5) -> dict[str, float]:
    """Accuracy, precision, recall, F1 at ``threshold`` and ROC-AUC, in plain numpy.

    The same definitions as scikit-learn's (zero_division=0; ROC-AUC as the
    Mann-Whitney statistic with ties averaged), without its per-call validation, which
    costs more than a small hospital's whole evaluation.
    """
    prob = np.asarray(prob, dtype=np.float64).reshape(-1)
    y = np.asarray(y).reshape(-1).astype(int)
    if len(y) == 0:
        return {"accuracy": math.nan, "precision": 0.0, "recall": 0.0, "f1": 0.0, "roc_auc": math.nan}
    pred = prob >= threshold
    pos = y == 1
    tp = float(np.sum(pred & pos))
    fp = float(np.sum(pred & ~pos))
    fn = float(np.sum(~pred & pos))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0
    return {
        "accuracy": float(np.mean(pred == pos)),
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "roc_auc": roc_auc(prob, pos),
    }


def roc_auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve (NaN when only one class is present)."""
    positive = np.asarray(positive, dtype=bool)
    n_pos = int(positive.sum())
    n_neg = len(positive) - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan
    ranks = rankdata(scores)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def multiclass_metrics(prob: np.ndarray, y: np.ndarray, class_names: list[str] | None = None) -> dict[str, float]:
    """Accuracy, macro precision/recall/F1, one-vs-rest macro ROC-AUC, per-class F1."""
    prob = np.asarray(prob, dtype=np.float64)
    y = np.asarray(y).reshape(-1).astype(int)
    k = prob.shape[1]
    pred = prob.argmax(axis=1)
    labels = list(range(k))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = {
            "accuracy": float(skm.accuracy_score(y, pred)) if len(y) else math.nan,
            "precision": float(skm.precision_score(y, pred, labels=labels, average="macro", zero_division=0)),
            "recall": float(skm.recall_score(y, pred, labels=labels, average="macro", zero_division=0)),
            "f1": float(skm.f1_score(y, pred, labels=labels, average="macro", zero_division=0)),
        }
        present = np.unique(y)
        if len(present) == k and k > 2:
            p = prob / np.clip(prob.sum(axis=1, keepdims=True), 1e-12, None)
            out["roc_auc"] = float(skm.roc_auc_score(y, p, multi_class="ovr", labels=labels))
        elif k == 2 and len(present) == 2:
            out["roc_auc"] = float(skm.roc_auc_score(y, prob[:, 1]))
        else:
            out["roc_auc"] = math.nan
        per_f1 = skm.f1_score(y, pred, labels=labels, average=None, zero_division=0)
    names = class_names or [str(i) for i in labels]
    for name, f in zip(names, per_f1):
        out[f"f1_{name}"] = float(f)
    return out
