"""Robust aggregation as *screening*: a robust centre picks out the outliers, the rest are averaged.

With few hospitals the classic rules lose accuracy even when they resist an attack:
with four sites and one sign-flipped, the coordinate-wise median (= trimmed mean with
beta = 0.25) is, per coordinate, the mean of the two honest values nearest the flipped
one, so every round's step is shrunk towards zero and biased; Krum keeps a single site's update and throws the
other honest ones away. fedcare therefore uses each rule as a filter:

1. a robust centre of the n accepted updates: the coordinate-wise median
   (``median``), the coordinate-wise beta-trimmed mean (``trimmed-mean``), or the update
   Krum selects (``krum``; score = summed squared distance to its n - f - 2 nearest
   neighbours);
2. the f = max(1, n // 4) updates farthest (L2) from that centre are excluded;
3. the n - f kept updates are averaged, weighted by example count as FedAvg does.

One hostile site among four is far from any of these centres (scaled x100 or flipped,
its distance to the centre is about that of its update or twice it, against the honest
sites' spread), so it is the one excluded; with no attacker the farthest honest site
is left out of that round. All three centres and the L2 distances are
translation-equivariant, so screening weights or updates (weights minus the global
model) is the same. Below 3 updates there is nothing to screen against: all are
averaged. These are Flower's ``FedMedian`` / ``FedTrimmedAvg`` / ``Krum`` for sampling,
configuration and metric aggregation, with ``aggregate_train``'s array rule replaced.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MetricRecord
from flwr.serverapp.strategy import FedMedian, FedTrimmedAvg, Krum


def num_excluded(n: int) -> int:
    """Updates screened out of n: the assumed number of hostile sites, f = max(1, n // 4)."""
    return max(1, n // 4) if n >= 3 else 0


def _flatten(replies: list[Message], keys: list[str]) -> np.ndarray:
    return np.stack([np.concatenate([r.content["arrays"][k].numpy().astype(np.float64).ravel() for k in keys])
                     for r in replies])


def _centre(flat: np.ndarray, rule: str, beta: float, f: int) -> np.ndarray:
    if rule == "median":
        return np.median(flat, axis=0)
    if rule == "trimmed-mean":
        n = flat.shape[0]
        cut = int(beta * n)
        srt = np.sort(flat, axis=0)
        return srt[cut:n - cut].mean(axis=0) if n - 2 * cut > 0 else np.median(flat, axis=0)
    if rule == "krum":
        sq = (flat ** 2).sum(axis=1)
        d2 = np.maximum(sq[:, None] + sq[None, :] - 2 * flat @ flat.T, 0.0)
        k = max(1, flat.shape[0] - f - 2)
        scores = np.sort(d2, axis=1)[:, 1:k + 1].sum(axis=1)  # column 0: distance to itself
        return flat[int(np.argmin(scores))]
    raise ValueError(rule)


def kept(replies: list[Message], rule: str, beta: float = 0.25) -> list[int]:
    """Indices of the replies kept after screening against the rule's robust centre."""
    n = len(replies)
    f = num_excluded(n)
    if f == 0:
        return list(range(n))
    keys = list(replies[0].content["arrays"].keys())
    flat = _flatten(replies, keys)
    dist = np.linalg.norm(flat - _centre(flat, rule, beta, f), axis=1)
    order = np.argsort(dist, kind="stable")
    return sorted(int(i) for i in order[:n - f])


def screened_mean(replies: list[Message], rule: str, weight_key: str, beta: float = 0.25) -> ArrayRecord:
    keep = [replies[i] for i in kept(replies, rule, beta)]
    weights = np.array([float(r.content["metrics"][weight_key]) for r in keep])
    weights = weights / weights.sum()
    first = keep[0].content["arrays"]
    out = ArrayRecord()
    for k in first.keys():
        acc = sum(w * r.content["arrays"][k].numpy().astype(np.float64) for w, r in zip(weights, keep))
        out[k] = Array(np.asarray(acc, dtype=first[k].numpy().dtype))
    return out


class _Screened:
    _rule = ""

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        valid, _ = self._check_and_log_replies(replies, is_train=True)
        if not valid:
            return None, None
        arrays = screened_mean(valid, self._rule, self.weighted_by_key, getattr(self, "beta", 0.25))
        metrics = self.train_metrics_aggr_fn([m.content for m in valid], self.weighted_by_key)
        return arrays, metrics


class MedianScreenedMean(_Screened, FedMedian):
    """``median``: exclude the f updates farthest from the coordinate-wise median, average the rest."""

    _rule = "median"


class TrimmedMeanScreenedMean(_Screened, FedTrimmedAvg):
    """``trimmed-mean``: exclude the f updates farthest from the beta-trimmed mean, average the rest."""

    _rule = "trimmed-mean"


class KrumScreenedMean(_Screened, Krum):
    """``krum``: exclude the f updates farthest from Krum's choice, average the rest."""

    _rule = "krum"
