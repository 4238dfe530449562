"""Off-policy value of a treatment policy on randomised data, and ranking metrics.

Policy value (inverse-probability weighting). In a trial that assigned arm ``A_i`` with a
known probability ``p(A_i)``, the value of a policy ``pi`` (the rate of good outcomes if
everyone received ``pi(x_i)``) is estimated without bias by

    V(pi) = 1/n * sum_i 1[A_i = pi(x_i)] * G_i / p(A_i)

where ``G_i`` is 1 for a good outcome (Horvitz-Thompson, reported as ``*_ht``). The
headline estimate is its self-normalised (Hajek) form, which divides by the realised sum
of weights ``sum_i 1[A_i = pi(x_i)] / p(A_i)`` instead of ``n``: it stays within [0, 1]
and does not swing with chance imbalance between arms in a small test set. "Everyone
gets arm a" (the event-free rate in arm a) and "a uniformly random arm" (the mean of the
arm values) are policies too. Because ``p`` depends only on the arm, every patient's contribution
to every one of these estimators is fixed by three facts: the arm received, whether it
was the recommended one, and whether the outcome was good. A site's
(arm x recommended x good) contingency table is therefore a sufficient statistic for all
the estimators *and* for their nonparametric bootstrap: resampling patients with
replacement is a multinomial draw over the table's cells. Sites send the table's counts
(scalars, no patient rows); the coordinator pools them and bootstraps stratified by site,
which is exactly the patient-level bootstrap each site could not share.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np

#: Metric-key prefix of a count cell: ``ipw_a{arm}_r{recommended}_g{good}``.
CELL = "ipw_a{a}_r{r}_g{g}"
#: Metric-key prefix of an arm's known assignment probability.
PROPENSITY = "ipw_p{a}"


def contingency(arm: np.ndarray, recommended: np.ndarray, good: np.ndarray, n_arms: int) -> np.ndarray:
    """Counts[a, r, g]: patients who received arm a, r = 1 if it was recommended, g = good."""
    arm = np.asarray(arm, dtype=int)
    r = (np.asarray(recommended, dtype=int) == arm).astype(int)
    g = (np.asarray(good) > 0.5).astype(int)
    counts = np.zeros((n_arms, 2, 2), dtype=np.int64)
    np.add.at(counts, (arm, r, g), 1)
    return counts


def values(counts: np.ndarray, propensity: np.ndarray) -> dict[str, np.ndarray]:
    """IPW values from counts (shape [..., arms, 2, 2]; leading axes are replicates)."""
    counts = np.asarray(counts, dtype=np.float64)
    n = counts.sum(axis=(-3, -2, -1))
    n = np.where(n > 0, n, np.nan)
    inv = 1.0 / propensity[:, None]
    weighted_good = counts[..., 1] * inv  # [..., arms, r]
    weighted_all = counts.sum(axis=-1) * inv
    with np.errstate(invalid="ignore", divide="ignore"):
        policy = weighted_good[..., 1].sum(axis=-1) / weighted_all[..., 1].sum(axis=-1)
        arms = weighted_good.sum(axis=-1) / weighted_all.sum(axis=-1)
    arms_ht = weighted_good.sum(axis=-1) / n[..., None]
    return {"policy": policy, "arms": arms, "random": arms.mean(axis=-1),
            "policy_ht": weighted_good[..., 1].sum(axis=-1) / n, "arms_ht": arms_ht,
            "random_ht": arms_ht.mean(axis=-1)}


def point_estimates(arm: np.ndarray, recommended: np.ndarray, good: np.ndarray,
                    propensity: np.ndarray) -> dict[str, float]:
    """The per-patient IPW formulas written directly (the counts path must agree)."""
    arm = np.asarray(arm, dtype=int)
    good = np.asarray(good, dtype=np.float64)
    w = 1.0 / propensity[arm]
    match = arm == np.asarray(recommended)

    def hajek(mask: np.ndarray) -> float:
        return float(np.sum(mask * w * good) / np.sum(mask * w)) if np.any(mask) else float("nan")

    out = {"policy_value": hajek(match), "policy_value_ht": float(np.mean(match * w * good))}
    k = len(propensity)
    for a in range(k):
        out[f"arm{a}_value"] = hajek(arm == a)
    out["random_arm_value"] = float(np.mean([out[f"arm{a}_value"] for a in range(k)]))
    return out


def margin_policy(benefit: np.ndarray, margin: float) -> np.ndarray:
    """Each patient's recommended arm: the arm best on average for these patients unless
    another is predicted better for this one by more than ``margin``.

    ``benefit`` [patients, arms] holds predicted probabilities of a good outcome (no
    outcomes are seen). With noisy, DP-trained effect estimates a plain argmax follows
    noise; the margin keeps a patient on the population's best arm unless the predicted
    individual gain is large, as treatment rules are usually made.
    """
    benefit = np.asarray(benefit, dtype=np.float64)
    if benefit.size == 0:
        return np.zeros(len(benefit), dtype=int)
    default = int(np.argmax(benefit.mean(axis=0)))
    best = benefit.argmax(axis=1)
    gain = benefit[np.arange(len(benefit)), best] - benefit[:, default]
    return np.where(gain > margin, best, default)


def site_metrics(arm: np.ndarray, recommended: np.ndarray, good: np.ndarray,
                 propensity: np.ndarray) -> dict[str, float]:
    """What one site reports: its own estimates, the counts and the known propensities."""
    k = len(propensity)
    counts = contingency(arm, recommended, good, k)
    out = point_estimates(arm, recommended, good, propensity)
    for a in range(k):
        out[PROPENSITY.format(a=a)] = float(propensity[a])
        out[f"recommended_share_a{a}"] = float(np.mean(np.asarray(recommended) == a)) if len(arm) else 0.0
        for r in (0, 1):
            for g in (0, 1):
                out[CELL.format(a=a, r=r, g=g)] = float(counts[a, r, g])
    return out


def _site_counts(metrics: Mapping[str, float]) -> tuple[np.ndarray, np.ndarray] | None:
    k = 0
    while PROPENSITY.format(a=k) in metrics:
        k += 1
    if k == 0:
        return None
    try:
        counts = np.array([[[float(metrics[CELL.format(a=a, r=r, g=g)]) for g in (0, 1)] for r in (0, 1)]
                           for a in range(k)])
        prop = np.array([float(metrics[PROPENSITY.format(a=a)]) for a in range(k)])
    except (KeyError, TypeError, ValueError):
        return None
    if not (np.isfinite(counts).all() and (counts >= 0).all() and np.isfinite(prop).all() and (prop > 0).all()):
        return None
    return np.rint(counts).astype(np.int64), prop


def pooled_summary(sites: Mapping[str, Mapping[str, float]], *, replicates: int = 2000, seed: int = 0,
                   level: float = 0.95) -> dict[str, object]:
    """Federation-wide IPW values with stratified-bootstrap percentile intervals.

    The best single arm is the one with the highest pooled point estimate; its interval
    is that arm's. ``policy_gain`` is policy minus best arm, bootstrapped jointly (same
    resamples), so its interval accounts for the two estimates' correlation.
    """
    tables = [t for t in (_site_counts(m) for m in sites.values()) if t is not None]
    if not tables:
        return {}
    k = len(tables[0][1])
    tables = [t for t in tables if len(t[1]) == k]
    prop = tables[0][1]
    total = sum(t[0] for t in tables)
    point = values(total, prop)
    best = int(np.nanargmax(point["arms"]))
    rng = np.random.default_rng(seed)  # summary statistics only; not a DP noise source
    boot = np.zeros((replicates, k, 2, 2))
    for counts, _ in tables:
        n = int(counts.sum())
        if n == 0:
            continue
        draws = rng.multinomial(n, counts.reshape(-1) / n, size=replicates)
        boot += draws.reshape(replicates, k, 2, 2)
    reps = values(boot, prop)
    lo_q, hi_q = (1 - level) / 2, 1 - (1 - level) / 2

    def interval(x: np.ndarray) -> list[float]:
        return [float(np.nanquantile(x, lo_q)), float(np.nanquantile(x, hi_q))]

    gain = reps["policy"] - reps["arms"][:, best]
    return {
        "policy_value": float(point["policy"]),
        "policy_value_ht": float(point["policy_ht"]),
        "policy_value_ht_ci": interval(reps["policy_ht"]),
        "policy_value_ci": interval(reps["policy"]),
        "best_single_arm": best,
        "best_single_arm_value": float(point["arms"][best]),
        "best_single_arm_value_ci": interval(reps["arms"][:, best]),
        "random_arm_value": float(point["random"]),
        "random_arm_value_ci": interval(reps["random"]),
        "arm_values": [float(v) for v in point["arms"]],
        "policy_gain": float(point["policy"] - point["arms"][best]),
        "policy_gain_ci": interval(gain),
        "policy_patients": int(total.sum()),
        "policy_bootstrap": {"replicates": replicates, "level": level, "stratified_by": "site",
                             "estimator": "self-normalised IPW (Hajek); *_ht: Horvitz-Thompson",
                             "propensity": [float(p) for p in prop]},
    }


# ---- ranking of held-out responses ------------------------------------------------------
def ranking_metrics(patient: np.ndarray, predicted: np.ndarray, gain: np.ndarray,
                    ks: Sequence[int] = (1, 3)) -> dict[str, float]:
    """NDCG@k and hit rate@k over each patient's held-out treatments.

    For every patient with at least two held-out responses, the held-out treatments are
    ranked by predicted benefit. NDCG@k uses the true (good-direction) responses as gains;
    a hit@k means the truly best held-out treatment is among the top k predicted.
    """
    patient = np.asarray(patient)
    order = np.argsort(patient, kind="stable")
    patient, predicted, gain = patient[order], np.asarray(predicted)[order], np.asarray(gain)[order]
    starts = np.flatnonzero(np.r_[True, patient[1:] != patient[:-1]])
    ends = np.r_[starts[1:], len(patient)]
    ndcg = {k: [] for k in ks}
    hits = {k: [] for k in ks}
    for s, e in zip(starts, ends):
        if e - s < 2:
            continue
        p, g = predicted[s:e], gain[s:e]
        ranked = g[np.argsort(-p, kind="stable")]
        ideal = np.sort(g)[::-1]
        best = ideal[0]
        for k in ks:
            disc = 1.0 / np.log2(np.arange(2, min(k, e - s) + 2))
            idcg = float((ideal[:k] * disc).sum())
            ndcg[k].append(float((ranked[:k] * disc).sum()) / idcg if idcg > 0 else 1.0)
            hits[k].append(float(np.any(ranked[:k] >= best)))
    out: dict[str, float] = {"ranked_patients": float(len(ndcg[ks[0]]))}
    for k in ks:
        out[f"ndcg_at_{k}"] = float(np.mean(ndcg[k])) if ndcg[k] else math.nan
        out[f"hit_rate_at_{k}"] = float(np.mean(hits[k])) if hits[k] else math.nan
    return out


def pooled_ranking(sites: Mapping[str, Mapping[str, float]], ks: Sequence[int] = (1, 3)) -> dict[str, float]:
    """Ranking metrics over all sites' patients (each site's mean weighted by its patients)."""
    out: dict[str, float] = {}
    rows = [m for m in sites.values() if isinstance(m.get("ranked_patients"), (int, float))
            and m["ranked_patients"] and m["ranked_patients"] > 0]
    if not rows:
        return out
    total = sum(float(m["ranked_patients"]) for m in rows)
    for k in ks:
        for name in (f"ndcg_at_{k}", f"hit_rate_at_{k}"):
            vals = [(float(m[name]), float(m["ranked_patients"])) for m in rows
                    if isinstance(m.get(name), (int, float)) and math.isfinite(m[name])]
            if vals:
                out[name] = sum(v * w for v, w in vals) / sum(w for _, w in vals)
    out["ranked_patients"] = total
    return out
