"""Classification metrics shared by the tasks (scikit-learn under the hood).

Metrics that are undefined on a site (ROC-AUC with one class in its test set) are
reported as NaN rather than a misleading number.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
from sklearn import metrics as skm


def binary_metrics(prob: np.ndarray, y: np.ndarray, threshold: float = 0.5) -> dict[str, float]:
    prob = np.asarray(prob, dtype=np.float64).reshape(-1)
    y = np.asarray(y).reshape(-1).astype(int)
    pred = (prob >= threshold).astype(int)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = {
            "accuracy": float(skm.accuracy_score(y, pred)) if len(y) else math.nan,
            "precision": float(skm.precision_score(y, pred, zero_division=0)),
            "recall": float(skm.recall_score(y, pred, zero_division=0)),
            "f1": float(skm.f1_score(y, pred, zero_division=0)),
        }
        out["roc_auc"] = float(skm.roc_auc_score(y, prob)) if len(np.unique(y)) == 2 else math.nan
    return out


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
