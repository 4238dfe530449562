"""Typed configuration, parsed once at the edge.

Two sources, two owners:

* ``RunConfig`` comes from the coordinator (Flower's run config: pyproject defaults plus
  ``--run-config`` overrides). Unknown keys are rejected by name.
* ``SiteConfig`` comes from the hospital's own node config (``--node-config``). The
  privacy budget and the data path live only here: no run config key can set or raise
  them.

Numeric run settings use 0 (or "" / -1 where 0 is meaningful) to mean "the task's own
default"; ``RunConfig.resolved(task)`` fills them in.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, fields
from typing import Any, Mapping

from .errors import ConfigError

STRATEGIES = ("fedavg", "fedprox", "fedadam", "median", "trimmed-mean", "krum", "multi-krum")
PARTITIONS = ("natural", "iid", "dirichlet")
OPTIMIZERS = ("sgd", "adam")
LR_SCHEDULES = ("constant", "cosine")
CENTRAL_DP = ("off", "server", "client")
#: Evaluation views: the identity, the four rotations, or rotations and mirror images.
TEST_VIEWS = (1, 4, 8)

#: Budget a virtual hospital gets when its node config names none (Flower's simulation
#: engine passes only partition ids). Deliberately strict; never taken from run config.
DEFAULT_SITE_EPSILON = 1.0
DEFAULT_SITE_DELTA = 1e-5
#: Rounds when neither the run config nor the task names a number.
FALLBACK_ROUNDS = 20
#: Clipping bound for tasks that declare none.
FALLBACK_CLIP = 1.0
#: Largest validation share of a hospital's training records, asked (run config) or
#: pinned (node config): at least as many records keep training.
MAX_VAL_FRACTION = 0.5


def _key(name: str) -> str:
    return name.replace("_", "-")


@dataclass(frozen=True)
class RunConfig:
    """Everything the coordinator decides about a run."""

    task: str = "diagnosis"
    dataset: str = ""
    model: str = ""
    num_rounds: int = 0
    strategy: str = "fedavg"
    proximal_mu: float = 0.01
    server_lr: float = 0.05
    local_epochs: int = 0
    batch_size: int = 0
    lr: float = 0.0
    optimizer: str = ""
    #: "constant", or "cosine": round r of R trains at lr * (1 + cos(pi * (r - 1) / R)) / 2,
    #: the usual decay for long runs, with the round number the coordinator sends.
    lr_schedule: str = "constant"
    weight_decay: float = -1.0
    dropout: float = -1.0
    #: Pathology stain normalisation: "none" or "hed" ("" = the task's default).
    stain_norm: str = ""
    #: DP-SGD per-sample clipping bound (0 = the task's default, else 1.0).
    max_grad_norm: float = 0.0
    #: Augmented views of each sampled record per training step (tasks that augment:
    #: pathology). Under DP-SGD a record's views are averaged into one gradient before
    #: clipping ("augmentation multiplicity", De et al. 2022): the same sensitivity and ε,
    #: a less noisy signal, K times the compute. 0 = the task's default (1).
    aug_mult: int = 0
    #: Views averaged at evaluation (test-time augmentation over the square's symmetries;
    #: pathology): 1, 4 (the four rotations) or 8 (rotations and their mirror images).
    #: 0 = the task's default (1).
    test_views: int = 0
    #: Decay of the coordinator's exponential moving average of the global model over
    #: rounds (0 = off). The average is what sites evaluate and what the run saves;
    #: training continues from the plain aggregate. Post-processing: no ε.
    ema_decay: float = 0.0
    partition: str = "natural"
    num_sites: int = 4
    dirichlet_alpha: float = 0.5
    #: Share of each hospital's training records held out for validation (0 = none). The
    #: coordinator reports validation metrics per round and keeps the best round's model.
    val_fraction: float = 0.0
    seed: int = 0
    min_sites: int = 2
    fraction_train: float = 1.0
    round_timeout: float = 600.0
    out_dir: str = ""
    reproducible_noise: bool = False
    #: Secure aggregation (fedavg/fedprox only): the coordinator sees masked vectors and their sum.
    secure_aggregation: bool = False
    #: Fraction of a round's sampled sites that must survive for the sum to be unmasked.
    secagg_threshold: float = 0.66
    #: Central DP on the aggregate: "off", "server" (server clips) or "client" (sites clip).
    central_dp: str = "off"
    central_noise: float = 1.0
    central_clip: float = 1.0
    #: An interrupted run folder (or its ``.partial``) to continue from its last checkpoint.
    resume: str = ""

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> "RunConfig":
        """Parse Flower's run config (kebab-case keys); reject unknown keys by name."""
        known = {_key(f.name): f for f in fields(cls)}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ConfigError(
                f"unknown run-config key(s): {', '.join(unknown)}; "
                f"known keys: {', '.join(sorted(known))}"
            )
        kwargs = {}
        for key, value in values.items():
            f = known[key]
            kwargs[f.name] = _coerce(key, value, f.type)
        cfg = cls(**kwargs)
        cfg.validate()
        return cfg

    def to_mapping(self) -> dict[str, Any]:
        return {_key(k): v for k, v in dataclasses.asdict(self).items()}

    def replace(self, **changes: Any) -> "RunConfig":
        return dataclasses.replace(self, **changes)

    def validate(self) -> None:
        def need(ok: bool, key: str, why: str) -> None:
            if not ok:
                raise ConfigError(f"run-config '{key}': {why}")

        need(self.num_rounds >= 0, "num-rounds", "must be >= 1 (0 = the task's default)")
        need(self.strategy in STRATEGIES, "strategy", f"one of {', '.join(STRATEGIES)}")
        need(self.partition in PARTITIONS, "partition", f"one of {', '.join(PARTITIONS)}")
        need(self.optimizer in ("",) + OPTIMIZERS, "optimizer", "sgd or adam")
        need(self.lr_schedule in LR_SCHEDULES, "lr-schedule", f"one of {', '.join(LR_SCHEDULES)}")
        need(self.local_epochs >= 0, "local-epochs", "must be >= 0")
        need(self.batch_size >= 0, "batch-size", "must be >= 0")
        need(self.lr >= 0, "lr", "must be >= 0")
        need(self.max_grad_norm >= 0, "max-grad-norm", "must be > 0 (0 = the task's default)")
        need(self.num_sites >= 1, "num-sites", "must be >= 1")
        need(self.dirichlet_alpha > 0, "dirichlet-alpha", "must be > 0")
        need(0 <= self.val_fraction <= MAX_VAL_FRACTION, "val-fraction", f"must be in [0, {MAX_VAL_FRACTION}]")
        need(self.min_sites >= 1, "min-sites", "must be >= 1")
        need(0 < self.fraction_train <= 1, "fraction-train", "must be in (0, 1]")
        need(self.round_timeout > 0, "round-timeout", "must be > 0")
        need(self.proximal_mu >= 0, "proximal-mu", "must be >= 0")
        need(self.dropout < 1, "dropout", "must be < 1")
        need(self.stain_norm in ("", "none", "hed"), "stain-norm", "none or hed")
        need(self.aug_mult >= 0, "aug-mult", "must be >= 1 (0 = the task's default)")
        need(self.test_views in (0,) + TEST_VIEWS, "test-views", "1, 4 or 8 (0 = the task's default)")
        need(0 <= self.ema_decay < 1, "ema-decay", "must be in [0, 1) (0 = off)")
        need(0 < self.secagg_threshold <= 1, "secagg-threshold", "must be in (0, 1]")
        need(self.central_dp in CENTRAL_DP, "central-dp", f"one of {', '.join(CENTRAL_DP)}")
        need(self.central_noise > 0, "central-noise", "must be > 0")
        need(self.central_clip > 0, "central-clip", "must be > 0")
        need(not self.secure_aggregation or self.strategy in ("fedavg", "fedprox"), "secure-aggregation",
             "needs a linear aggregate: strategy fedavg or fedprox")
        need(not (self.secure_aggregation and self.central_dp == "server"), "central-dp",
             "'server' clips each update, which secure aggregation hides: use 'client'")
        need(self.central_dp == "off" or self.strategy in ("fedavg", "fedprox"), "central-dp",
             "needs strategy fedavg or fedprox (equal-weight mean)")

    def resolved(self, defaults: Mapping[str, Any]) -> "RunConfig":
        """Fill "task default" sentinels from a task's defaults mapping."""
        sentinel = {"dataset": "", "model": "", "local_epochs": 0, "batch_size": 0,
                    "lr": 0.0, "optimizer": "", "weight_decay": -1.0, "dropout": -1.0,
                    "stain_norm": "", "max_grad_norm": 0.0, "num_rounds": 0, "aug_mult": 0, "test_views": 0}
        for name in ("aug_mult", "test_views"):
            if getattr(self, name) > 1 and name not in defaults:
                raise ConfigError(f"run-config '{_key(name)}': task '{self.task}' does not augment its "
                                  "records (only tasks whose defaults declare this key do)")
        defaults = {"num_rounds": FALLBACK_ROUNDS, "max_grad_norm": FALLBACK_CLIP, "aug_mult": 1,
                    "test_views": 1, **defaults}
        changes = {name: defaults[name] for name, empty in sentinel.items()
                   if getattr(self, name) == empty and name in defaults}
        return dataclasses.replace(self, **changes)


def parse_epsilon(text: str) -> float:
    """A command line's ``--epsilon``: a positive number, or 'inf' for no DP."""
    if text.strip().lower() in ("inf", "infinity", "none"):
        return math.inf
    try:
        value = float(text)
    except ValueError:
        raise ConfigError(f"--epsilon: expected a number or 'inf', got {text!r}") from None
    if not value > 0:
        raise ConfigError("--epsilon must be > 0 (or 'inf' for no DP)")
    return value


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """``KEY=VALUE`` pairs as Flower's --run-config would type them."""
    out: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"--set expects KEY=VALUE, got {pair!r}")
        key, value = pair.split("=", 1)
        value = value.strip()
        typed: Any = value
        if value.lower() in ("true", "false"):
            typed = value.lower() == "true"
        else:
            for conv in (int, float):
                try:
                    typed = conv(value)
                    break
                except ValueError:
                    continue
        out[key.strip()] = typed
    return out


@dataclass(frozen=True)
class SiteConfig:
    """What the hospital itself decides: its data, its name and its privacy budget."""

    epsilon: float = DEFAULT_SITE_EPSILON
    delta: float = DEFAULT_SITE_DELTA
    data: str = ""
    site: str = ""
    partition_id: int | None = None
    num_partitions: int | None = None
    ledger: str = ""
    strict: bool = False
    #: The most noise (multiplier) the hospital accepts: a run whose planned steps fit
    #: the remaining budget only with more noise is refused before training (the model
    #: would be noise, and the budget spent for nothing).
    max_noise: float = 30.0
    #: Fewest training records with which the site shares aggregate statistics or
    #: updates (a sum over one record is that record).
    min_records: int = 5
    #: Seed of the hospital's own train/test (and validation) split of its data file.
    #: Never the run's seed: a coordinator choosing seeds would choose which of the
    #: hospital's records its exact preprocessing sums cover in each run. (The simulator
    #: sets it to the run's seed, since there the researcher holds every hospital's data.)
    split_seed: int = 0
    #: The hospital's own validation share of its training records: set, it replaces the
    #: run's ``val-fraction`` whenever a run asks for validation, so a coordinator varying
    #: the share cannot vary which records the validation metrics cover.
    val_fraction: float | None = None

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> "SiteConfig":
        known = {_key(f.name): f for f in fields(cls)}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ConfigError(f"unknown node-config key(s): {', '.join(unknown)}")
        kwargs: dict[str, Any] = {}
        for key, value in values.items():
            f = known[key]
            if key == "epsilon" and isinstance(value, str):
                value = math.inf if value.strip().lower() in ("inf", "infinity") else value
            kwargs[f.name] = _coerce(key, value, f.type)
        cfg = cls(**kwargs)
        if not (cfg.epsilon > 0):
            raise ConfigError("node-config 'epsilon': must be > 0 (use inf to train without DP)")
        if not (0 < cfg.delta < 1):
            raise ConfigError("node-config 'delta': must be in (0, 1)")
        if cfg.min_records < 2:
            raise ConfigError("node-config 'min-records': must be >= 2")
        if not (cfg.max_noise > 0):
            raise ConfigError("node-config 'max-noise': must be > 0")
        if cfg.val_fraction is not None and not (0 < cfg.val_fraction <= MAX_VAL_FRACTION):
            raise ConfigError(f"node-config 'val-fraction': must be in (0, {MAX_VAL_FRACTION}] "
                              "(unset: the run's share)")
        return cfg

    def to_mapping(self) -> dict[str, Any]:
        return {_key(k): v for k, v in dataclasses.asdict(self).items()}

    @property
    def private(self) -> bool:
        return math.isfinite(self.epsilon)


def _coerce(key: str, value: Any, type_name: Any) -> Any:
    t = str(type_name)
    try:
        if t.startswith("int | None"):
            return None if value is None else _as_int(value)
        if t.startswith("float | None"):
            return None if value is None else _coerce(key, value, "float")
        if t == "int":
            return _as_int(value)
        if t == "float":
            if isinstance(value, bool):
                raise TypeError
            return float(value)
        if t == "bool":
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "false"):
                return value.lower() == "true"
            raise TypeError
        if t == "str":
            if not isinstance(value, str):
                raise TypeError
            return value
    except (TypeError, ValueError):
        raise ConfigError(f"config '{key}': expected {t}, got {value!r}") from None
    raise ConfigError(f"config '{key}': unsupported type {t}")


def _as_int(value: Any) -> int:
    if isinstance(value, bool):
        raise TypeError
    if isinstance(value, float):
        if not value.is_integer():
            raise ValueError
        return int(value)
    return int(value)
