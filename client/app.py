"""The hospital's ClientApp: thin Flower handlers around fedcare's training loop.

Three message types:

* ``query``: federated preprocessing statistics (counts, sums, sums of squares).
* ``train``: one round of local (DP-)training from the global model.
* ``evaluate``: metrics of the global model on the site's test records.

Whatever goes wrong, the reply carries a numeric code and a fixed reason written by
fedcare (``fedcare.shared.errors``); exception text, which could quote a patient value,
is logged locally only.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import weakref
from functools import cached_property
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from flwr.app import ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from ..shared import errors
from ..shared.arrays import load_into, to_numpy, to_record
from ..shared.config import RunConfig, SiteConfig
from ..shared.errors import BudgetExceeded, ConfigError, DataError, ReleaseRefused
from ..shared.registry import get_task
from ..shared.tasks.base import Records, Site, Task
from . import ledger as ledger_mod
from . import privacy, training, updates
from .releases import Releases
from .site import load_site, prepared, prepared_records

log = logging.getLogger("fedcare.client")

app = ClientApp()

PRIVACY_STATE = "fedcare.privacy"
LOCAL_STATE = "fedcare.local"
#: Keys a server may put in a message's config; anything else is refused.
MESSAGE_CONFIG_KEYS = {"server-round", "proximal-mu"}


class _Job:
    """Everything a handler needs, parsed once from the message and the context."""

    def __init__(self, msg: Message, context: Context) -> None:
        self.msg, self.context = msg, context
        self.site_cfg = SiteConfig.from_mapping(dict(context.node_config))
        raw = RunConfig.from_mapping(dict(context.run_config))
        self.task: Task = get_task(raw.task)
        self.cfg = raw.resolved(self.task.defaults)
        self.config = _message_config(msg)
        self.site: Site = load_site(self.task, self.cfg, self.site_cfg)

    @cached_property
    def prep(self) -> dict[str, np.ndarray]:
        content = self.msg.content
        return to_numpy(content["preprocess"]) if "preprocess" in content.array_records else {}

    @cached_property
    def global_arrays(self) -> dict[str, np.ndarray]:
        """The message's global model, decoded once per message."""
        return to_numpy(self.msg.content["arrays"])

    @cached_property
    def ledger_home(self) -> tuple[Path, str, str] | None:
        """This data set's ledger folder and its (key, label) there; None for a site
        that keeps no ledger (a virtual hospital without one, or ``ledger=off``)."""
        directory = ledger_mod.directory_for(self.site_cfg)
        if directory is None:
            return None
        return (directory, *ledger_mod.dataset_identity(self.site_cfg, self.cfg, self.site.name))

    @cached_property
    def prior(self) -> "_Prior":
        """What this data set released before this run: the ledger, read and verified once."""
        return _Prior(self)

    def model(self) -> torch.nn.Module:
        """Global shared arrays from the message plus this site's local parameters."""
        has_local = LOCAL_STATE in self.context.state.array_records
        if self.task.local_prefixes and not has_local:
            torch.manual_seed(self.cfg.seed)  # first sight: local parameters start reproducibly
        model = self.task.build_model(self.cfg)
        shared = set(self.task.shared_state(model))
        load_into_partial(model, self.global_arrays, shared)
        if LOCAL_STATE in self.context.state.array_records:
            local = to_numpy(self.context.state.array_records[LOCAL_STATE])
            load_into_partial(model, local, set(self.task.local_state(model)))
        return model

    def site_record(self) -> ConfigRecord:
        return ConfigRecord({"name": self.site.name})


def load_into_partial(model: torch.nn.Module, arrays: dict[str, np.ndarray], keys: set[str]) -> None:
    state = model.state_dict()
    full = {k: arrays[k] if k in arrays else None for k in keys}
    if any(v is None for v in full.values()) or set(arrays) - keys:
        raise ConfigError("global model arrays do not match this task's model")
    merged = {k: v.detach().cpu().numpy() for k, v in state.items()}
    merged.update(full)  # type: ignore[arg-type]
    load_into(model, merged)


def _message_config(msg: Message) -> dict[str, Any]:
    config = dict(msg.content["config"]) if "config" in msg.content.config_records else {}
    unknown = set(config) - MESSAGE_CONFIG_KEYS
    if unknown:
        raise ConfigError(f"message config key(s) not accepted by the site: {', '.join(sorted(unknown))}")
    return config


#: (error type, wire code, log level, local log line), first match wins; anything else is
#: INTERNAL_ERROR. The error's details go to the site's own log only.
WIRE_CODES: tuple[tuple[type[Exception], int, int, str], ...] = (
    (BudgetExceeded, errors.BUDGET_REFUSED, logging.WARNING, "refused: %s"),
    (ledger_mod.LedgerTampered, errors.LEDGER_INVALID, logging.ERROR, "privacy ledger failed verification: %s"),
    (ReleaseRefused, errors.RELEASE_REFUSED, logging.WARNING, "aggregate release refused: %s"),
    (ConfigError, errors.CONFIG_REJECTED, logging.WARNING, "config rejected: %s"),
    (DataError, errors.DATA_INVALID, logging.ERROR, "site data invalid: %s"),
)


def error_reply(msg: Message, exc: Exception, codes=WIRE_CODES) -> Message:
    """Log ``exc`` here; reply its code and fedcare's fixed reason, never the exception text.

    Exception text could quote a patient value. Only a budget refusal appends its message,
    which fedcare writes from ε, δ and the budget, never from data.
    """
    for kind, code, level, line in codes:
        if isinstance(exc, kind):
            log.log(level, line, exc)
            reason = errors.WIRE_REASONS[code]
            if code == errors.BUDGET_REFUSED:
                reason = f"{reason}: {exc}"
            return Message(Error(code, reason), reply_to=msg)
    log.error("internal error while handling %s", msg.metadata.message_type, exc_info=exc)
    return Message(Error(errors.INTERNAL_ERROR, errors.WIRE_REASONS[errors.INTERNAL_ERROR]), reply_to=msg)


def guard(handler: Callable[[Message, Context], RecordDict],
          codes=WIRE_CODES) -> Callable[[Message, Context], Message]:
    """The Flower handler: ``handler``'s records as the reply, or ``error_reply`` if it raises."""
    def wrapped(msg: Message, context: Context) -> Message:
        try:
            return Message(handler(msg, context), reply_to=msg)
        except Exception as exc:  # noqa: BLE001 - error_reply never sends the text
            return error_reply(msg, exc, codes)

    wrapped.__name__ = handler.__name__
    return wrapped


def _guarded(handler: Callable[[_Job], RecordDict]) -> Callable[[Message, Context], Message]:
    def with_job(msg: Message, context: Context) -> RecordDict:
        return handler(_Job(msg, context))

    with_job.__name__ = handler.__name__
    return guard(with_job)


@app.query()
@_guarded
def stats(job: _Job) -> RecordDict:
    """Sufficient statistics of the site's training records (sums, never rows).

    A sum over one record is that record: a site holding fewer than its ``min-records``
    (node config, default 5) refuses, as statistical offices suppress small cells. The
    sums include the records a validation hold-out takes (``Site.summed``), so their
    subset does not move with the coordinator's ``val-fraction``.
    """
    _require_records(len(job.site.summed), job.site_cfg.min_records, "training")
    _admit_release(job, job.site.summed, "sums")
    local = job.task.local_stats(job.site.summed, job.cfg)
    return RecordDict({
        "stats": to_record(local),
        "metrics": MetricRecord({"num-examples": len(job.site.train), "num-test": len(job.site.test)}),
        "site": job.site_record(),
    })


@app.train()
@_guarded
def train(job: _Job) -> RecordDict:
    data = prepared(job.task, job.site, job.prep, job.cfg, train=True)
    model = job.model()
    round_ = int(job.config.get("server-round", 1))
    seed = job.cfg.seed * 1_000_003 + round_ * 7_919 + _stable_hash(job.site.name)
    state = _privacy_state(job, len(data))

    sigma = state.noise_multiplier if state is not None else None
    prior = job.prior
    if state is not None:
        _, steps = training.steps_per_round(len(data), job.cfg)
        over, eps_after = privacy.round_would_exceed(prior.history, state, steps, job.site_cfg.epsilon,
                                                     job.site_cfg.delta)
        if over:
            raise BudgetExceeded(
                f"round {round_} would reach epsilon={eps_after:.4f} > budget {job.site_cfg.epsilon:g} "
                f"at delta={job.site_cfg.delta:g}")

    mu = float(job.config.get("proximal-mu", 0.0))
    outcome = training.train(job.task, model, data, job.cfg, noise_multiplier=sigma, seed=seed, proximal_mu=mu,
                             lr=training.round_lr(job.cfg, round_))

    eps = math.inf
    if state is not None:
        state.history.extend(outcome.history)
        job.context.state.config_records[PRIVACY_STATE] = ConfigRecord(state.to_record())
        eps = privacy.epsilon(prior.history + state.history, job.site_cfg.delta)
        prior.record(job, round_, outcome.history, eps)  # written before the update leaves the site
    local = job.task.local_state(model)
    if local:
        job.context.state.array_records[LOCAL_STATE] = to_record(local)

    shared = {k: v.detach().cpu().numpy() for k, v in job.task.shared_state(model).items()}
    name, update = updates.outgoing(job.msg, job.context, job.cfg, shared, job.global_arrays, len(data))
    metrics: dict[str, float | int] = {
        "num-examples": len(data),
        "steps": outcome.steps,
        "epsilon": eps if math.isfinite(eps) else -1.0,
        "delta": job.site_cfg.delta if state is not None else 0.0,
        "noise-multiplier": sigma or 0.0,
    }
    if state is None:
        # The round's mean loss is an exact statistic of the records it sampled: a DP site
        # keeps it (ε covers the noised update only), a site without DP may share it.
        metrics["train-loss"] = outcome.loss
    return RecordDict({name: update, "metrics": MetricRecord(metrics), "site": job.site_record()})


@app.evaluate()
@_guarded
def evaluate(job: _Job) -> RecordDict:
    """Metrics of the global model on the site's test records (and validation records).

    Like the preprocessing sums, a metric over fewer than ``min-records`` records is
    close to a per-record value (the loss of one record names its label): such a test
    set is refused, and such a validation set's metrics are left out.
    """
    _require_records(len(job.site.test), job.site_cfg.min_records, "test")
    _admit_release(job, job.site.test, "test")
    data = prepared(job.task, job.site, job.prep, job.cfg, train=False)
    model = job.model()
    scores, loss = training.evaluate(job.task, model, data)
    eps = _spent(job)
    metrics: dict[str, float | int] = {"num-examples": len(data), "loss": loss,
                                       "epsilon": eps, "delta": job.site_cfg.delta if eps >= 0 else 0.0}
    metrics.update({k: float(v) for k, v in scores.items()})
    if job.site.val is not None and len(job.site.val) >= job.site_cfg.min_records and _val_admitted(job):
        val = prepared_records(job.task, job.site.val, job.prep, job.cfg, train=False)
        val_scores, val_loss = training.evaluate(job.task, model, val)
        metrics.update({"num-val": len(val), "val_loss": val_loss})
        metrics.update({f"val_{k}": float(v) for k, v in val_scores.items()})
    return RecordDict({"metrics": MetricRecord(metrics), "site": job.site_record()})


#: (ledger folder, data set key, kind) -> the records this process last admitted there:
#: the same object again (every round's metrics) is not fingerprinted again.
#: Weak values: the memo must not keep a data set alive after the site cache dropped it.
_ADMITTED: "weakref.WeakValueDictionary[tuple[Path, str, str], Records]" = weakref.WeakValueDictionary()


def _admit_release(job: _Job, records: Records, kind: str) -> None:
    """Overlap control (``client.releases``) for a site with a privacy ledger: refuse an
    aggregate over records within ``min-records`` of an earlier release's of this kind."""
    if job.ledger_home is None:
        return
    directory, key, _ = job.ledger_home
    slot = (directory, key, kind)
    if _ADMITTED.get(slot) is not records:  # the records objects are cached per process (client.site)
        Releases(directory, key, kind).admit(job.task.fingerprints(records), job.site_cfg.min_records)
        _ADMITTED[slot] = records


def _val_admitted(job: _Job) -> bool:
    """Validation metrics are an extra: refused, they are left out, not the whole reply."""
    try:
        _admit_release(job, job.site.val, "val")
    except ReleaseRefused as exc:
        log.warning("validation metrics left out: %s", exc)
        return False
    return True


def _require_records(n: int, min_records: int, kind: str) -> None:
    if n < min_records:
        raise DataError(f"{n} {kind} record(s), fewer than min-records {min_records}: "
                        "aggregate statistics would reveal individuals")


def _privacy_state(job: _Job, n_train: int) -> privacy.PrivacyState | None:
    """This run's accountant state; on the first round, calibrate noise for the whole run."""
    if not job.site_cfg.private:
        return None
    records = job.context.state.config_records
    if PRIVACY_STATE in records:
        return privacy.PrivacyState.from_record(dict(records[PRIVACY_STATE]))
    q, steps = training.steps_per_round(n_train, job.cfg)
    planned = steps * job.cfg.num_rounds
    prior = job.prior.history
    try:
        sigma = privacy.calibrate_noise(prior, q, planned, job.site_cfg.epsilon, job.site_cfg.delta)
    except ValueError:
        spent = privacy.epsilon(prior, job.site_cfg.delta)
        raise BudgetExceeded(f"spent epsilon={spent:.4f} of budget {job.site_cfg.epsilon:g} at "
                             f"delta={job.site_cfg.delta:g}; no noise level keeps {planned} more steps "
                             f"within it") from None
    if sigma > job.site_cfg.max_noise:
        spent = privacy.epsilon(prior, job.site_cfg.delta)
        raise BudgetExceeded(f"spent epsilon={spent:.4f} of budget {job.site_cfg.epsilon:g} at "
                             f"delta={job.site_cfg.delta:g}; {planned} more steps would need noise multiplier "
                             f"{sigma:.1f} > the site's max-noise {job.site_cfg.max_noise:g}")
    state = privacy.PrivacyState(noise_multiplier=sigma, sample_rate=q, planned_steps=planned)
    records[PRIVACY_STATE] = ConfigRecord(state.to_record())
    return state


class _Prior:
    """What this data set released before this run (from the ledger), and how to record more."""

    def __init__(self, job: _Job) -> None:
        home = job.ledger_home if job.site_cfg.private else None
        self.directory = home[0] if home else None
        self.history: privacy.History = []
        if home is None:
            return
        _, self.key, self.label = home
        self.run = _run_tag(job.context)
        self.history = ledger_mod.Ledger(self.directory).verify(self.key).history(exclude_run=self.run)

    def record(self, job: _Job, round_: int, history: privacy.History, eps: float) -> None:
        if self.directory is None:
            return
        ledger_mod.Ledger(self.directory).append(self.key, self.label, {
            "run": self.run, "flower_run_id": int(job.context.run_id), "round": round_,
            "task": job.cfg.task, "model": job.cfg.model, "rounds": job.cfg.num_rounds,
            "sample_rate": history[0][1] if history else 0.0,
            "noise_multiplier": history[0][0] if history else 0.0,
            "steps": sum(int(h[2]) for h in history),
            "history": [[float(s), float(q), int(n)] for s, q, n in history],
            "epsilon": eps, "delta": job.site_cfg.delta,
            "budget_epsilon": job.site_cfg.epsilon,
        })


def _run_tag(context: Context) -> str:
    """A random id for this run at this site, kept in Context.state for the run's rounds.

    Ledger entries of this run are the run's own history (already in PrivacyState); all
    others are prior. A run whose state is lost (a restarted SuperNode) gets a new tag,
    so its earlier rounds then count as prior: conservative, never under-counted.
    """
    records = context.state.config_records
    if "fedcare.ledger" not in records:
        records["fedcare.ledger"] = ConfigRecord({"run": os.urandom(12).hex()})
    return str(records["fedcare.ledger"]["run"])


def _spent(job: _Job) -> float:
    """ε this data set has spent: this run's rounds on top of every earlier run's (the ledger)."""
    if not job.site_cfg.private:
        return -1.0
    records = job.context.state.config_records
    history = list(job.prior.history)
    if PRIVACY_STATE in records:
        history += privacy.PrivacyState.from_record(dict(records[PRIVACY_STATE])).history
    return privacy.epsilon(history, job.site_cfg.delta) if history else 0.0


def _stable_hash(text: str) -> int:
    return int(hashlib.sha256(text.encode()).hexdigest()[:8], 16) % 1_000_003


from . import secagg_client as _secagg_handlers  # noqa: E402,F401 - registers train.secagg_* handlers
