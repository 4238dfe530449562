"""The task contract: everything fedcare needs to federate one kind of model.

A task is one module in ``fedcare.shared.tasks`` holding one ``Task`` subclass,
registered with ``@register``. Server, client and simulator talk to tasks only
through this interface, so a new task needs no change anywhere else.

Data flows through three stages:

1. ``Records``: a site's cleaned records (task-specific payload), read from a builtin
   dataset or a hospital's own file, validated with errors naming file, row and column.
2. Federated statistics: ``local_stats`` returns sums only (counts, sums, sums of
   squares); the server adds them up and ``finalize_stats`` turns the totals into
   preprocessing parameters (means, scales). Rows never leave a site.
3. ``to_dataset``: records plus preprocessing parameters become a torch ``Dataset`` of
   tensors that the generic DP training loop consumes.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Mapping, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

if TYPE_CHECKING:
    import pandas as pd

Arrays = dict[str, np.ndarray]

#: A model module's flag, set by the DP-SGD loop (Opacus hooks mode) while it trains:
#: the module's backward may then skip its weights' batch gradient, which DP-SGD
#: discards, since Opacus computes the per-sample gradients it clips and noises from the
#: same activations and backprops (``_patch_model.PatchConv``).
PER_SAMPLE_ONLY = "per_sample_grads_only"


@dataclass(frozen=True)
class Records:
    """A site's cleaned records before federation-wide preprocessing.

    ``labels`` holds one stratification label per record (for splits and non-IID
    partitions); ``groups`` marks records that must stay on one side of a split (a
    slide, a scaffold, a patient), or is None when every record stands alone.
    """

    data: Any
    labels: np.ndarray
    groups: np.ndarray | None = None
    source: str = ""
    #: Records left out as unreadable (without ``strict``): (row or path, reason) pairs.
    #: Reasons name the problem, never a record's value; the simulator lists them in the
    #: run folder as ``skipped.csv``.
    skipped: tuple[tuple[str, str], ...] = ()
    #: Records the hospital itself set aside for testing (a ``test/`` folder, a manifest's
    #: ``split`` column), or None to draw the split; ``splits.split_site`` honours it.
    test_mask: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.labels)


@dataclass(frozen=True)
class Site:
    """One hospital's data: a name and its train/test (and optional validation) records."""

    name: str
    train: Records
    test: Records
    val: Records | None = None
    #: The training records before a validation hold-out took ``val`` from them (None:
    #: ``train``). The preprocessing sums cover these, so a coordinator that varies
    #: ``val-fraction`` between runs gets the same sums each time, not sums over different
    #: subsets whose differences single out records.
    pool: Records | None = None

    @property
    def summed(self) -> Records:
        """The records the site's preprocessing sums are computed over."""
        return self.train if self.pool is None else self.pool


@dataclass
class CheckReport:
    """What ``fedcare hospital check`` prints: facts about a file, then problems."""

    path: str
    rows: int = 0
    columns: list[dict[str, Any]] = field(default_factory=list)
    label_counts: dict[str, int] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    #: Unreadable records the reader would skip; a reader with ``strict`` refuses the data.
    unreadable: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems


class Task(ABC):
    """One federated learning task (data, model, loss, metrics, defaults)."""

    #: Registry name, also the run-config value ``task``.
    name: ClassVar[str]
    #: Builtin datasets; the first is the default.
    datasets: ClassVar[tuple[str, ...]]
    #: Model kinds; the first is the default.
    models: ClassVar[tuple[str, ...]]
    #: Defaults for run-config sentinels (dataset, model, lr, batch_size, ...).
    defaults: ClassVar[Mapping[str, Any]]
    #: Metric used for the headline ("mean site ...") and plots.
    main_metric: ClassVar[str] = "accuracy"
    #: Parameter-name prefixes that stay at the hospital (never sent, never aggregated).
    local_prefixes: ClassVar[tuple[str, ...]] = ()
    #: The run-config fields ``to_dataset`` reads: a hospital's prepared tensors are built
    #: once and reused while these and the preprocessing stay the same
    #: (``client.site.prepared_records``).
    dataset_settings: ClassVar[tuple[str, ...]] = ("dataset", "model")
    #: DP-SGD with Opacus' fast gradient ("ghost") clipping: per-sample gradient norms
    #: from two backward passes instead of materialised per-sample gradients (batch x
    #: parameters), which dominate the step of a small model. Same clipping, noise and
    #: accounting; a task opting in must implement ``loss_per_sample``.
    ghost_clipping: ClassVar[bool] = False

    # ---- data -------------------------------------------------------------------
    @abstractmethod
    def builtin_sites(self, dataset: str, seed: int) -> list[Site]:
        """The dataset's natural sites (hospitals), each split into train/test."""

    @abstractmethod
    def read_file(self, path: Path, dataset: str, *, strict: bool = False) -> Records:
        """Read and validate a hospital's own data in ``dataset``'s declared schema.

        Raise DataError naming file, row and column. Without ``strict``, a task may skip
        unreadable records (counted in ``Records.source`` notes); with it, it refuses.
        """

    def check_file(self, path: Path, dataset: str) -> CheckReport:
        """Validate a hospital's file and describe it (overridden by richer tasks)."""
        report = CheckReport(path=str(path))
        records = self.read_file(path, dataset)
        report.rows = len(records)
        values, counts = np.unique(records.labels, return_counts=True)
        report.label_counts = {str(v): int(c) for v, c in zip(values, counts)}
        return report

    @abstractmethod
    def take(self, records: Records, index: np.ndarray) -> Records:
        """The subset of records at ``index`` (used by splits and partitions)."""

    def concat(self, parts: Sequence[Records]) -> Records:
        """Pool several sites' records (used by IID/Dirichlet re-partitioning)."""
        raise NotImplementedError(f"task {self.name} cannot pool records")

    @abstractmethod
    def fingerprints(self, records: Records) -> np.ndarray:
        """One 64-bit digest per record (uint64) of its content, never of its position or
        of anything derived from the other records: the site compares the record sets of
        its exact aggregate releases (``client.releases``), and a digest that moved with
        the file's order would make one added patient look like a new set."""

    test_fraction: ClassVar[float] = 0.25

    def split(self, records: Records, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """Train/test indices of one site's records (``split_site`` calls this when the
        hospital marked no test set of its own).

        The default is ``splits.split_indices`` (grouped or stratified); a task with its
        own notion of a fair held-out set (the drug task's balanced scaffold split)
        overrides it.
        """
        from ..splits import split_indices

        return split_indices(records, test_fraction, seed)

    # ---- federated preprocessing -------------------------------------------------
    def local_stats(self, train: Records, cfg: Any) -> Arrays:
        """Sufficient statistics (sums only) of a site's training records."""
        return {}

    def finalize_stats(self, totals: Arrays, cfg: Any) -> Arrays:
        """Preprocessing parameters from federation-wide totals."""
        return {}

    @abstractmethod
    def to_dataset(self, records: Records, prep: Arrays, cfg: Any, *, train: bool) -> Dataset:
        """Tensors for training or evaluation (augmentation only when ``train``)."""

    # ---- model ------------------------------------------------------------------
    @abstractmethod
    def build_model(self, cfg: Any) -> nn.Module:
        """A fresh model; shapes depend on cfg only, never on one site's data."""

    @abstractmethod
    def loss(self, model: nn.Module, batch: Sequence[torch.Tensor]) -> torch.Tensor:
        """Mean loss over the batch (Opacus expects mean reduction)."""

    def loss_per_sample(self, model: nn.Module, batch: Sequence[torch.Tensor]) -> torch.Tensor:
        """Loss of each record, shape (batch,), whose mean is ``loss`` (for ``ghost_clipping``)."""
        raise NotImplementedError(f"task {self.name} has no per-sample loss")

    @abstractmethod
    def predict(self, model: nn.Module, batch: Sequence[torch.Tensor]) -> tuple[np.ndarray, np.ndarray]:
        """(scores, targets) for one batch, scores as probabilities."""

    @abstractmethod
    def metrics(self, scores: np.ndarray, targets: np.ndarray) -> dict[str, float]:
        """Scalar metrics from all of a site's scores and targets."""

    # ---- documentation ---------------------------------------------------------------
    def input_schema(self, dataset: str) -> dict[str, Any]:
        """What a hospital's input looks like, as plain data (for model cards)."""
        return {"dataset": dataset, "columns": [], "note": f"see the '{self.name}' task's documentation"}

    # ---- run-level summary -----------------------------------------------------------
    def summarize(self, sites: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
        """Extra top-level ``summary.json`` keys from the sites' final metrics.

        The coordinator only sees each site's scalar metrics; a task that reports a
        federation-level estimate (a pooled policy value, say) combines them here.
        """
        return {}

    # ---- applying a trained model to new inputs (fedcare predict) -----------------
    def infer(self, model: nn.Module, prep: Arrays, cfg: Any, inputs: Sequence[str]) -> "pd.DataFrame":
        """Predictions for new cases: one row per input, probabilities per class/label.

        ``inputs`` are what the user gave on the command line: file or folder paths, or
        (for tasks that accept them) literal values such as SMILES strings. Invalid
        inputs raise DataError naming the file and row.
        """
        raise NotImplementedError(f"task {self.name} does not support prediction on new inputs")

    # ---- helpers shared by tasks --------------------------------------------------
    def default(self, name: str) -> Any:
        return self.defaults[name]

    def shared_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The parameters and buffers that are federated (everything not local)."""
        return {k: v for k, v in model.state_dict().items()
                if not k.startswith(self.local_prefixes or ("\0",))}

    def local_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return {k: v for k, v in model.state_dict().items()
                if self.local_prefixes and k.startswith(self.local_prefixes)}


def row_digests(*columns: np.ndarray) -> np.ndarray:
    """uint64 digests of aligned rows: row ``i`` of every column (numbers by their bytes,
    strings and other objects by their text), for ``Task.fingerprints``."""
    n = len(columns[0])
    if any(len(c) != n for c in columns):
        raise ValueError("row_digests: columns of different lengths")
    cols = [c if c.dtype == object else np.ascontiguousarray(c) for c in map(np.asarray, columns)]
    out = np.empty(n, dtype=np.uint64)
    for i in range(n):
        h = hashlib.blake2b(digest_size=8)
        for c in cols:
            h.update(str(c[i]).encode() if c.dtype == object else c[i].tobytes())
            h.update(b"\x1f")
        out[i] = int.from_bytes(h.digest(), "little")
    return out
