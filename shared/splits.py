"""Train/test splits and federated partitions, deterministic for a seed.

Splits respect ``Records.groups`` (a slide, scaffold or patient never straddles train
and test) and stratify by label where groups allow. Partitions re-deal pooled records
over N virtual hospitals: IID, or non-IID by a Dirichlet(alpha) draw of each label's
share per site.
"""

from __future__ import annotations

import logging
from typing import Sequence

import numpy as np

from .config import SiteConfig
from .tasks.base import Records, Site, Task

log = logging.getLogger("fedcare.partition")


def split_indices(records: Records, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified (or grouped) split of one site's records into train and test."""
    n = len(records)
    rng = np.random.default_rng(seed)
    if n < 2:
        return np.arange(n), np.arange(0)
    if records.groups is not None:
        groups = np.asarray(records.groups)
        uniq = np.unique(groups)
        rng.shuffle(uniq)
        target = test_fraction * n
        test_groups, size = [], 0
        counts = {g: int((groups == g).sum()) for g in uniq}
        for g in uniq:
            if size >= target:
                break
            test_groups.append(g)
            size += counts[g]
        is_test = np.isin(groups, test_groups)
        if is_test.all() and len(uniq) > 1:
            is_test[groups == test_groups[-1]] = False
        return np.flatnonzero(~is_test), np.flatnonzero(is_test)
    labels = np.asarray(records.labels)
    test = []
    for value in np.unique(labels):
        idx = np.flatnonzero(labels == value)
        rng.shuffle(idx)
        k = int(round(test_fraction * len(idx)))
        test.extend(idx[:k].tolist())
    is_test = np.zeros(n, dtype=bool)
    is_test[test] = True
    return np.flatnonzero(~is_test), np.flatnonzero(is_test)


def split_site(task: Task, name: str, records: Records, test_fraction: float, seed: int) -> Site:
    """A site's train/test split: the hospital's own test marks if it set any, else the task's."""
    if records.test_mask is not None:
        mask = np.asarray(records.test_mask, dtype=bool)
        train_idx, test_idx = np.flatnonzero(~mask), np.flatnonzero(mask)
    else:
        train_idx, test_idx = task.split(records, test_fraction, seed)
    return Site(name=name, train=task.take(records, train_idx), test=task.take(records, test_idx))


def partition_indices(labels: np.ndarray, num_sites: int, scheme: str, alpha: float, seed: int,
                      min_size: int = 2) -> list[np.ndarray]:
    """Deal record indices to ``num_sites`` sites, IID or Dirichlet(alpha) per label;
    a Dirichlet deal is redrawn (up to 100 times) until every site holds ``min_size``."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    n = len(labels)
    if scheme == "iid":
        perm = rng.permutation(n)
        return [np.sort(p) for p in np.array_split(perm, num_sites)]
    if scheme != "dirichlet":
        raise ValueError(f"unknown partition scheme {scheme!r}")
    # Resample until every site can take part (standard practice, as Flower Datasets'
    # min_partition_size).
    for _ in range(100):
        parts: list[list[int]] = [[] for _ in range(num_sites)]
        for value in np.unique(labels):
            idx = np.flatnonzero(labels == value)
            rng.shuffle(idx)
            shares = rng.dirichlet(np.full(num_sites, alpha))
            cuts = (np.cumsum(shares) * len(idx)).astype(int)[:-1]
            for site, chunk in enumerate(np.split(idx, cuts)):
                parts[site].extend(chunk.tolist())
        if min(len(p) for p in parts) >= min_size:
            break
    else:
        _warn_short(parts, min_size, f"Dirichlet({alpha:g}) deal over {num_sites} sites: after 100 draws",
                    "records and will take no part (raise alpha or lower the number of sites)")
    return [np.sort(np.asarray(p, dtype=int)) for p in parts]


def partition_sites(task: Task, sites: Sequence[Site], scheme: str, num_sites: int,
                    alpha: float, seed: int) -> list[Site]:
    """Natural sites as they are, or pooled and re-dealt into ``num_sites`` sites.

    A Dirichlet deal gives every site, where the pool allows, the node default
    ``min-records`` training and test records, below which a hospital shares no sums and
    no metrics and so could take no part.
    """
    if scheme == "natural":
        return list(sites)
    train = task.concat([s.train for s in sites])
    test = task.concat([s.test for s in sites])
    tr = partition_indices(train.labels, num_sites, scheme, alpha, seed,
                           min_size=_site_floor(len(train.labels), num_sites))
    # Test records follow the same label mix, drawn with a different stream.
    te = partition_indices(test.labels, num_sites, scheme, alpha, seed + 7919) if scheme == "iid" \
        else _follow_label_mix(test.labels, [train.labels[i] for i in tr], seed,
                               min_size=max(1, _site_floor(len(test.labels), num_sites)))
    return [Site(name=f"site{i:0{len(str(num_sites - 1))}d}", train=task.take(train, a), test=task.take(test, b))
            for i, (a, b) in enumerate(zip(tr, te))]


def _site_floor(pool: int, num_sites: int) -> int:
    """Records each dealt site should hold: the node default ``min-records``, or an even
    share where the pool is too small for that."""
    return min(SiteConfig.min_records, pool // num_sites)


def _follow_label_mix(test_labels: np.ndarray, train_label_sets: list[np.ndarray], seed: int,
                      min_size: int = 1) -> list[np.ndarray]:
    """Deal test records so each site's test label mix matches its train label mix."""
    rng = np.random.default_rng(seed + 104729)
    out: list[list[int]] = [[] for _ in train_label_sets]
    for value in np.unique(test_labels):
        idx = np.flatnonzero(test_labels == value)
        rng.shuffle(idx)
        weights = np.array([(t == value).sum() for t in train_label_sets], dtype=float)
        if weights.sum() == 0:
            weights[:] = 1
        cuts = (np.cumsum(weights / weights.sum()) * len(idx)).astype(int)[:-1]
        for site, chunk in enumerate(np.split(idx, cuts)):
            out[site].extend(chunk.tolist())
    # Every site evaluates: one with fewer than min_size test records borrows from the largest.
    for site in range(len(out)):
        while len(out[site]) < min_size:
            donor = max(range(len(out)), key=lambda i: len(out[i]))
            if len(out[donor]) <= min_size:
                break
            out[site].append(out[donor].pop())
    _warn_short(out, min_size, f"test deal over {len(out)} sites:", "test records (the pool has too few to go round)")
    return [np.sort(np.asarray(o, dtype=int)) for o in out]


def _warn_short(parts: Sequence[Sequence[int]], min_size: int, deal: str, consequence: str) -> None:
    """Name the dealt sites holding fewer than ``min_size`` records, if any."""
    short = [str(i) for i, p in enumerate(parts) if len(p) < min_size]
    if short:
        log.warning("%s site(s) %s hold fewer than %d %s", deal, ", ".join(short), min_size, consequence)
