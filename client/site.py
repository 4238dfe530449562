"""Which data a hospital trains on, loaded once per process and kept in memory.

A SuperNode's node config decides: ``data`` (the hospital's own file or folder, read
through the task's declared schema) or, in simulation, ``partition-id`` /
``num-partitions`` selecting one virtual hospital of a builtin dataset.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
from functools import lru_cache
from pathlib import Path

import numpy as np
from torch.utils.data import Dataset

from ..shared.config import RunConfig, SiteConfig
from ..shared.errors import ConfigError
from ..shared.registry import get_task
from ..shared.splits import partition_sites, split_site
from ..shared.tasks.base import Records, Site, Task


log = logging.getLogger("fedcare.client")


def load_site(task: Task, cfg: RunConfig, site_cfg: SiteConfig) -> Site:
    """The hospital's train/test records for this run, with a validation hold-out when the
    run asks for one (the hospital's own ``val-fraction`` share when it set one).

    A data file is split by the hospital's own ``split-seed``; a builtin virtual hospital
    (simulation only) by the run's seed, as its partition is.
    """
    split_seed = site_cfg.split_seed if site_cfg.data else cfg.seed
    if site_cfg.data:
        path = Path(site_cfg.data).expanduser()
        stamp = file_stamp(path)
        site = _file_site(task.name, cfg.dataset, str(path), stamp, site_cfg.strict, split_seed)
    elif site_cfg.partition_id is not None:
        sites = builtin_partition(task.name, cfg.dataset, cfg.partition, cfg.num_sites,
                                  cfg.dirichlet_alpha, cfg.seed)
        if (cfg.partition == "natural" and site_cfg.num_partitions is not None
                and site_cfg.num_partitions != len(sites)):
            # Flower's simulation engine decides how many virtual hospitals there are;
            # when that is not the dataset's own number, deal the pool IID instead.
            log.warning("%d virtual hospitals for %d natural sites: partitioning IID",
                        site_cfg.num_partitions, len(sites))
            sites = builtin_partition(task.name, cfg.dataset, "iid", site_cfg.num_partitions,
                                      cfg.dirichlet_alpha, cfg.seed)
        if site_cfg.num_partitions is not None and site_cfg.num_partitions != len(sites):
            raise ConfigError(
                f"{site_cfg.num_partitions} virtual hospitals but dataset '{cfg.dataset}' with "
                f"partition '{cfg.partition}' has {len(sites)} sites (set num-sites or partition)")
        if not 0 <= site_cfg.partition_id < len(sites):
            raise ConfigError(f"partition-id {site_cfg.partition_id} out of range 0..{len(sites) - 1}")
        site = sites[site_cfg.partition_id]
    else:
        raise ConfigError("node config names no data: set data=PATH (or partition-id in simulation)")
    if cfg.val_fraction > 0:
        share = site_cfg.val_fraction if site_cfg.val_fraction is not None else cfg.val_fraction
        site = with_validation(task, site, share, split_seed)
    if site_cfg.site:
        site = dataclasses.replace(site, name=site_cfg.site)
    return site


_VALIDATION: dict[tuple[int, float, int], tuple[Site, Site]] = {}


def with_validation(task: Task, site: Site, fraction: float, seed: int) -> Site:
    """The site with ``fraction`` of its training records held out for validation.

    Split like train/test (grouped by slide, scaffold or patient; else stratified), once
    per process: the same records object must come back on every message, because
    prepared tensors are cached by it.
    """
    key = (id(site.train), fraction, seed)
    if key not in _VALIDATION:
        train_idx, val_idx = task.split(site.train, fraction, seed + 104_729)
        split = Site(name=site.name, train=task.take(site.train, train_idx), test=site.test,
                     val=task.take(site.train, val_idx), pool=site.train)
        _VALIDATION[key] = (site, split)  # holds ``site`` so its id is never reused
    return _VALIDATION[key][1]


@lru_cache(maxsize=8)
def builtin_partition(task_name: str, dataset: str, scheme: str, num_sites: int, alpha: float,
                      seed: int) -> tuple[Site, ...]:
    task = get_task(task_name)
    sites = task.builtin_sites(dataset, seed)
    if scheme == "natural" and len(sites) == 1:
        scheme = "iid"  # a pooled dataset has no natural hospitals: deal it IID
    return tuple(partition_sites(task, sites, scheme, num_sites, alpha, seed))


@lru_cache(maxsize=4096)  # one per simulated hospital: re-reading files per message costs more than training
def file_records(task_name: str, dataset: str, path: str, stamp: int, strict: bool) -> Records:
    """A hospital file's records, read once per process (the simulator validates with it too)."""
    return get_task(task_name).read_file(Path(path), dataset, strict=strict)


def file_stamp(path: Path) -> int:
    """Changes whenever the data does: a file's modification time; for a folder of images,
    the latest modification time of its folders and the number of files in them (adding,
    removing or renaming an image moves its folder's time, where the top folder's own
    stays as it was). Folders only: it runs on every message, and statting each of 20,000
    images took half a second; an image overwritten in place under its old name is not
    seen until the process restarts."""
    if not path.exists():
        return 0
    if not path.is_dir():
        return path.stat().st_mtime_ns
    latest, count = 0, 0
    for folder, _, files in os.walk(path):
        latest = max(latest, os.stat(folder).st_mtime_ns)
        count += len(files)
    return hash((latest, count))


@lru_cache(maxsize=4096)
def _file_site(task_name: str, dataset: str, path: str, stamp: int, strict: bool, seed: int) -> Site:
    task = get_task(task_name)
    records = file_records(task_name, dataset, path, stamp, strict)
    return split_site(task, Path(path).stem, records, task.test_fraction, seed)


_DATASETS: dict[tuple, tuple[Records, Dataset]] = {}


def prepared(task: Task, site: Site, prep: dict[str, np.ndarray], cfg: RunConfig, *, train: bool) -> Dataset:
    """Tensors for a site's train or test records under the federation's preprocessing."""
    return prepared_records(task, site.train if train else site.test, prep, cfg, train=train)


def prepared_records(task: Task, records: Records, prep: dict[str, np.ndarray], cfg: RunConfig, *,
                     train: bool) -> Dataset:
    """Tensors for ``records`` under the federation's preprocessing, built once and reused."""
    digest = hashlib.sha256()
    for k in sorted(prep):
        digest.update(k.encode())
        digest.update(np.ascontiguousarray(prep[k]).tobytes())
    settings = tuple(getattr(cfg, field) for field in task.dataset_settings)
    key = (task.name, settings, id(records), train, digest.hexdigest())
    if key not in _DATASETS:
        if len(_DATASETS) > 4096:
            _DATASETS.clear()
        _DATASETS[key] = (records, task.to_dataset(records, prep, cfg, train=train))  # keeps the id alive
    return _DATASETS[key][1]
