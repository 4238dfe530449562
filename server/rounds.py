"""The coordinator's round loop: preprocessing, training, validation, evaluation, files.

Per run:

1. A ``query`` round collects each site's sufficient statistics (sums only); their
   total becomes the federation's preprocessing parameters, sent with every later
   message.
2. Each round: the strategy samples sites and builds ``train`` messages; every reply is
   validated (``validation``) and only accepted replies are aggregated; then every site
   evaluates the new global model on its own test records.
3. Per-site and global metrics are written after each round; the final model, summary
   and plot when the run ends. With ``ema-decay`` the model evaluated and saved is the
   moving average of the rounds' aggregates (``averaging``).
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Collection
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from ..shared.arrays import to_numpy, to_record
from ..shared.config import RunConfig
from ..shared.errors import FederationError
from ..shared.registry import get_task
from . import averaging, central_dp, checkpoint, events, export, report, results, secagg_round, validation
from .aggregation import make_aggregator
from .strategies import build_strategy

log = logging.getLogger("fedcare.server")

#: Update-norm bound for a reply, relative to nothing: absolute L2 distance from the
#: global model. Honest DP updates are orders of magnitude smaller.
MAX_UPDATE_NORM = 1e4


@dataclass
class SiteStatus:
    name: str
    num_train: int = 0
    num_test: int = 0
    #: Training records the site declared in the preprocessing round: the most any of its
    #: train replies may claim (``validation.check_declared_count``).
    declared_train: int = 0
    epsilon: float = math.nan
    delta: float = math.nan
    last_eval: dict[str, float] = field(default_factory=dict)
    last_eval_round: int = 0
    missed: list[int] = field(default_factory=list)
    #: Rounds whose training reply was refused by the site (budget, data) or rejected here.
    rejected: list[int] = field(default_factory=list)
    #: What the site reported of this round's accepted training (steps, noise multiplier,
    #: and, from a site without DP, its training loss), for the round's metrics.csv row;
    #: emptied as each training round starts.
    last_train: dict[str, float] = field(default_factory=dict)


#: Train-reply metrics copied into metrics.csv (reply key -> column).
TRAIN_COLUMNS = {"train-loss": "train_loss", "steps": "steps", "noise-multiplier": "noise_multiplier"}


def default_out_dir(cfg: RunConfig) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path(cfg.out_dir) if cfg.out_dir else Path("runs") / f"{cfg.task}-{stamp}"


#: The global model of the round with the best validation main metric (with ``val-fraction``).
BEST_MODEL = "model_best_val.pt"


def run_federation(grid: Grid, raw_cfg: RunConfig, out: Path | None = None) -> Path:
    """Run all rounds on ``grid`` and return the finished run folder.

    With ``resume`` set, continue the interrupted run in that folder from its last
    checkpoint instead of starting over (see ``checkpoint``).
    """
    task = get_task(raw_cfg.task)
    cfg = raw_cfg.resolved(task.defaults)
    observer = events.current.get()
    random.seed(cfg.seed)  # Flower's node sampling; not a DP noise source
    torch.manual_seed(cfg.seed)
    model = task.build_model(cfg)
    global_arrays = {k: v.detach().cpu().numpy().copy() for k, v in task.shared_state(model).items()}

    saved = None
    if cfg.resume:
        partial = checkpoint.locate(cfg.resume)
        saved = checkpoint.load(partial / checkpoint.FILE)
        checkpoint.check_compatible(saved.config, cfg.to_mapping(), partial)
        out = checkpoint.final_name(partial)
    folder = results.RunFolder(out or default_out_dir(cfg), resume=saved is not None)
    try:
        folder.write_config(cfg.to_mapping())
        nodes = _wait_for_nodes(grid, cfg)
        sites, refused, prep = _preprocessing_round(grid, nodes, task, cfg)
        first = 1
        if saved is not None:
            first = saved.round + 1
            prep = saved.prep
            global_arrays = saved.global_arrays
            _restore_sites(sites, saved.sites)
            folder.truncate(saved.round)
        observer.started(cfg.num_rounds, {n: s.name for n, s in sites.items()}, cfg.to_mapping())
        prep_record = to_record(prep)
        strategy = build_strategy(cfg, len(nodes))
        if saved is not None:
            checkpoint.restore_strategy(strategy, saved.strategy_state)
            checkpoint.restore_rng(saved)
            if saved.node_states and hasattr(grid, "restore_node_states"):
                grid.restore_node_states(saved.node_states)
            observer.round_done(saved.round, cfg.num_rounds, task.main_metric,
                                math.nan if saved.last_metric is None else saved.last_metric,
                                _max_epsilon(sites), [])
        # (round, validation metric, test metric) of the best model so far. A resumed run
        # takes it from the checkpoint, exact (rounds.csv holds 6 significant digits).
        best = saved.best if saved is not None else None
        # The model the sites evaluate and the run saves (``served``): the plain aggregate,
        # or with ema-decay its moving average over rounds (training continues from the aggregate).
        average = saved.average if saved is not None else None
        served = average if average is not None else global_arrays
        if best is not None and best[0] == saved.round:
            # The best model is saved after its round's checkpoint; a kill in between
            # left the file a round behind, and the checkpoint holds that round's model.
            folder.save_arrays(BEST_MODEL, served)
        for rnd in range(first, cfg.num_rounds + 1):
            global_arrays = _train_round(grid, strategy, rnd, global_arrays, prep_record, sites, cfg,
                                         folder, observer)
            if cfg.ema_decay > 0:
                average = averaging.updated(average, global_arrays, cfg.ema_decay)
            served = average if average is not None else global_arrays
            metric, val_metric = _evaluate_round(grid, strategy, rnd, served, prep_record, sites, task,
                                                 cfg, folder, observer)
            improved = val_metric is not None and math.isfinite(val_metric) and (best is None or val_metric > best[1])
            if improved:
                best = (rnd, val_metric, metric)
            _save_checkpoint(folder, rnd, cfg, global_arrays, prep, strategy, sites, grid, metric, best, average)
            if improved:
                folder.save_arrays(BEST_MODEL, served)
        summary = _summary(task, cfg, sites, refused)
        if best is not None:
            summary["validation"] = {
                "val_fraction": cfg.val_fraction, "best_round": best[0], f"best_val_{task.main_metric}": best[1],
                f"test_{task.main_metric}_at_best_round": best[2],
                "model": BEST_MODEL,
            }
        summary.update(central_dp.report(strategy, cfg))
        folder.write_summary(summary)
        folder.save_model(served, prep)
        results.plot_progress(folder.path, task.main_metric)
        export.write_all(folder.path, task, cfg, summary)
        report.write_report(folder.path)
        folder.file(checkpoint.FILE).unlink(missing_ok=True)
        final = folder.finish()
    except BaseException:
        if folder.file(checkpoint.FILE).exists():
            log.warning("run interrupted; resume it with --resume %s", folder.path)
        else:
            folder.discard()
        raise
    observer.finished(str(final), summary)
    return final


def _save_checkpoint(folder, rnd, cfg, global_arrays, prep, strategy, sites, grid, metric, best, average) -> None:
    random_state, torch_rng = checkpoint.capture_rng()
    node_states = grid.node_states() if hasattr(grid, "node_states") else {}
    checkpoint.save(folder.path, checkpoint.Checkpoint(
        round=rnd, config=cfg.to_mapping(), global_arrays=global_arrays, prep=prep,
        strategy_state=checkpoint.strategy_state(strategy),
        sites={s.name: {"epsilon": s.epsilon, "delta": s.delta, "last_eval": s.last_eval,
                        "last_eval_round": s.last_eval_round, "missed": s.missed, "rejected": s.rejected,
                        "num_train": s.num_train, "num_test": s.num_test,
                        "declared_train": s.declared_train} for s in sites.values()},
        node_states=node_states, random_state=random_state, torch_rng=torch_rng,
        last_metric=metric if metric is not None and math.isfinite(metric) else None, best=best,
        average=average))


def _restore_sites(sites: dict[int, "SiteStatus"], saved: dict[str, dict[str, Any]]) -> None:
    for site in sites.values():
        s = saved.get(site.name)
        if s is None:
            continue
        site.epsilon = math.nan if s["epsilon"] is None else float(s["epsilon"])
        site.delta = math.nan if s["delta"] is None else float(s["delta"])
        site.last_eval = {k: (math.nan if v is None else float(v)) for k, v in s["last_eval"].items()}
        site.last_eval_round = int(s["last_eval_round"])
        site.missed = [int(r) for r in s["missed"]]
        site.rejected = [int(r) for r in s.get("rejected", [])]
        site.num_train, site.num_test = int(s["num_train"]), int(s["num_test"])
        site.declared_train = int(s.get("declared_train", site.declared_train))


def _max_epsilon(sites: dict[int, "SiteStatus"]) -> float:
    eps = [s.epsilon for s in sites.values() if not math.isnan(s.epsilon)]
    return max(eps) if eps else math.inf


def _wait_for_nodes(grid: Grid, cfg: RunConfig) -> list[int]:
    deadline = time.monotonic() + cfg.round_timeout
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= cfg.min_sites:
            return nodes
        if time.monotonic() > deadline:
            raise FederationError(f"only {len(nodes)} site(s) connected within round-timeout "
                                  f"{cfg.round_timeout:g} s; min-sites is {cfg.min_sites}")
        time.sleep(0.5)


def _preprocessing_round(grid: Grid, nodes: list[int], task, cfg: RunConfig):
    """Ask every site for sums; the federation's preprocessing is their total.

    Returns the sites that joined, the reasons of those that did not (site name -> the
    refusal's code text or the check it failed; no record ever leaves a site in it), and
    the preprocessing.
    """
    msgs = [Message(RecordDict({"config": ConfigRecord({"server-round": 0})}), dst_node_id=n,
                    message_type=MessageType.QUERY) for n in nodes]
    replies = list(grid.send_and_receive(msgs, timeout=cfg.round_timeout))
    sites: dict[int, SiteStatus] = {}
    refused: dict[str, str] = {}
    totals: dict[str, np.ndarray] | None = None
    observer = events.current.get()
    for msg in sorted(replies, key=lambda m: m.metadata.src_node_id):
        node = msg.metadata.src_node_id
        name = validation.site_name(msg)
        verdict = _check_stats(msg, totals)
        if not verdict.ok:
            observer.rejected(0, name, verdict.reason)
            refused[_unique(name, node, refused)] = verdict.reason
            continue
        stats = to_numpy(msg.content.array_records["stats"])
        metrics = msg.content.metric_records["metrics"]
        declared = int(metrics["num-examples"])
        sites[node] = SiteStatus(name=_unique(name, node, {s.name for s in sites.values()}),
                                 num_train=declared, declared_train=declared,
                                 num_test=int(metrics.get("num-test", 0)))
        totals = stats if totals is None else {k: totals[k] + stats[k] for k in totals}
    if len(sites) < cfg.min_sites:
        raise FederationError(f"only {len(sites)} of {len(nodes)} site(s) answered the preprocessing round "
                              f"(min-sites {cfg.min_sites}); the others' refusals are listed above and, in "
                              "detail, in each site's own log")
    return sites, refused, task.finalize_stats(totals or {}, cfg)


def _check_stats(msg: Message, totals: dict[str, np.ndarray] | None) -> validation.Verdict:
    verdict = validation.answered(msg)
    if not verdict.ok:
        return verdict
    if set(msg.content.array_records) != {"stats"}:
        return validation.Verdict(False, "expected one ArrayRecord 'stats'")
    stats = msg.content.array_records["stats"]
    for k, v in stats.items():
        arr = v.numpy()
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            return validation.Verdict(False, f"statistic '{k}' is not finite")
        if totals is not None and (k not in totals or totals[k].shape != arr.shape):
            return validation.Verdict(False, f"statistic '{k}' does not match the other sites'")
    if totals is not None and set(stats.keys()) != set(totals):
        return validation.Verdict(False, "statistics keys differ from the other sites'")
    return validation.Verdict(True)


def _unique(name: str, node: int, taken: Collection[str]) -> str:
    return name if name not in taken else f"{name}-{node}"


def _train_round(grid, strategy, rnd, global_arrays, prep_record, sites, cfg, folder, observer):
    """Send the global model, validate each reply as it arrives, aggregate the accepted."""
    # A SuperLink lists only nodes whose heartbeat is current. Flower's sampler would wait
    # for min-sites of them without limit; this waits one round-timeout, then fails the run.
    online = set(_wait_for_nodes(grid, cfg))
    msgs = _to_sites(strategy.configure_train(rnd, to_record(global_arrays), ConfigRecord(), grid), sites)
    sent = {m.metadata.dst_node_id for m in msgs}
    for m in msgs:
        m.content["preprocess"] = prep_record
    rows: list[dict[str, Any]] = []
    answered: set[int] = set()
    declared = {node: site.declared_train for node, site in sites.items()}
    for site in sites.values():
        site.last_train = {}

    def reject(node: int, reason: str, msg: Message | None = None) -> None:
        answered.add(node)
        site = sites.get(node)
        if site is not None:
            site.rejected.append(rnd)
        name = site.name if site else (validation.site_name(msg) if msg is not None else f"node-{node}")
        observer.rejected(rnd, name, reason)
        rows.append({"round": rnd, "site": name, "node_id": node, "status": f"rejected: {reason}", "phase": "train"})

    def accept(msg: Message) -> None:
        node = msg.metadata.src_node_id
        answered.add(node)
        site = sites[node]
        m = msg.content.metric_records["metrics"]
        eps = float(m.get("epsilon", -1.0))
        if eps >= 0:
            site.epsilon, site.delta = eps, float(m["delta"])
        site.num_train = int(m["num-examples"])
        site.last_train = {column: float(m[key]) for key, column in TRAIN_COLUMNS.items() if key in m}

    if cfg.secure_aggregation:
        # Masked updates: validated for form only, summed and unmasked in secagg_round.
        new = secagg_round.run(grid, msgs, rnd, global_arrays, cfg, reject, accept,
                               central=strategy if isinstance(strategy, central_dp.CentralDP) else None,
                               declared=declared)
    else:
        aggregator = make_aggregator(strategy, rnd, global_arrays)
        bound = cfg.central_clip * (1 + 1e-4) if cfg.central_dp == "client" else MAX_UPDATE_NORM
        for msg in _in_node_order(grid.send_and_receive(msgs, timeout=cfg.round_timeout)):
            node = msg.metadata.src_node_id
            if node not in sent:
                continue  # made by the SuperLink (node unavailable, reply expired): counted as missed below
            verdict = validation.check_train_reply(msg, global_arrays, bound)
            decoded = verdict.arrays
            if verdict.ok:
                verdict = validation.check_declared_count(msg, declared.get(node, 0))
            if not verdict.ok:
                reject(node, verdict.reason, msg)
                continue
            accept(msg)
            aggregator.add(msg, decoded)
    for node in sorted((sent - answered) | (set(sites) - online)):
        if node in sites:
            sites[node].missed.append(rnd)
            observer.rejected(rnd, sites[node].name, "no reply (offline, or past the round timeout)")
    folder.append_metrics(rows)
    if cfg.secure_aggregation:
        return global_arrays if new is None else new
    if aggregator.count < min(cfg.min_sites, len(sites)):
        log.warning("round %d: %d accepted update(s) < min-sites %d; global model unchanged",
                    rnd, aggregator.count, cfg.min_sites)
        return global_arrays
    return aggregator.result()


def _to_sites(msgs, sites: dict[int, "SiteStatus"]) -> list[Message]:
    """The strategy's messages to the sites that joined the preprocessing round only.

    A node that refused it (too few records, invalid data) or connected later has no part
    in the run: a train message would make it spend ε on an update the coordinator must
    discard, and an evaluation would be computed for nothing.
    """
    return [m for m in msgs if m.metadata.dst_node_id in sites]


def _in_node_order(replies):
    """Replies sorted by node id (deterministic float sums) unless the grid streams them.

    A grid that yields replies lazily (a generator) is consumed as it goes, so that a
    thousand hospitals' updates are never held at once; the order is then the grid's own
    (the in-process grid sends in node order).
    """
    if isinstance(replies, (list, tuple)):
        return sorted(replies, key=lambda m: m.metadata.src_node_id)
    return replies


def _evaluate_round(grid, strategy, rnd, global_arrays, prep_record, sites, task, cfg, folder, observer):
    msgs = _to_sites(strategy.configure_evaluate(rnd, to_record(global_arrays), ConfigRecord(), grid), sites)
    for m in msgs:
        m.content["preprocess"] = prep_record
    replies = list(grid.send_and_receive(msgs, timeout=cfg.round_timeout))
    rows, problems = [], []
    weighted: dict[str, float] = {}
    totals: dict[str, int] = {}
    for msg in sorted(replies, key=lambda m: m.metadata.src_node_id):
        node = msg.metadata.src_node_id
        site = sites.get(node)
        if site is None:
            continue
        verdict = validation.check_evaluate_reply(msg)
        if not verdict.ok:
            observer.rejected(rnd, site.name, verdict.reason)
            problems.append(f"{site.name}: {verdict.reason}")
            continue
        m = {k: float(v) for k, v in msg.content.metric_records["metrics"].items()}
        n = int(m.pop("num-examples"))
        n_val = int(m.pop("num-val", 0))
        eps, delta = m.pop("epsilon", -1.0), m.pop("delta", math.nan)
        if math.isfinite(eps) and eps >= 0:
            # What the site has spent so far, also when it refused every round (0 then, not "no DP").
            site.epsilon, site.delta = eps, delta
        site.num_test, site.last_eval, site.last_eval_round = n, m, rnd
        rows.append({"round": rnd, "site": site.name, "node_id": node, "status": "ok", "phase": "evaluate",
                     "num_train": site.num_train, "num_test": n, **({"num_val": n_val} if n_val else {}),
                     **site.last_train,
                     "epsilon": site.epsilon if not math.isnan(site.epsilon) else None,
                     "delta": site.delta if not math.isnan(site.delta) else None, **m})
        for k, v in m.items():
            weight = n_val if k.startswith("val_") else n
            if math.isfinite(v) and weight:
                weighted[k] = weighted.get(k, 0.0) + v * weight
                totals[k] = totals.get(k, 0) + weight
    folder.append_metrics(rows)
    glob = {k: v / totals[k] for k, v in weighted.items()}
    max_eps = _max_epsilon(sites)
    folder.append_round({"round": rnd, "sites_evaluated": len(rows),
                         "max_epsilon": max_eps if math.isfinite(max_eps) else None, **glob})
    observer.round_done(rnd, cfg.num_rounds, task.main_metric, glob.get(task.main_metric, math.nan),
                        max_eps, problems)
    return glob.get(task.main_metric), glob.get(f"val_{task.main_metric}")


def _summary(task, cfg: RunConfig, sites: dict[int, SiteStatus], refused: dict[str, str]) -> dict[str, Any]:
    per_site: dict[str, Any] = {}
    for node, s in sorted(sites.items(), key=lambda kv: kv[1].name):
        entry = {k: s.last_eval.get(k) for k in s.last_eval if k != "loss"}
        entry.update({
            "num_examples": s.num_test,
            "num_train": s.num_train,
            "epsilon": s.epsilon if not math.isnan(s.epsilon) else None,
            "delta": s.delta if not math.isnan(s.delta) else None,
            "dp": not math.isnan(s.epsilon),
            "evaluated_round": s.last_eval_round,
            "missed_rounds": s.missed,
            "rejected_rounds": s.rejected,
        })
        per_site[s.name] = entry
    summary: dict[str, Any] = {
        "task": cfg.task, "dataset": cfg.dataset, "model": cfg.model, "strategy": cfg.strategy,
        "rounds": cfg.num_rounds, "seed": cfg.seed, "main_metric": task.main_metric,
        "sites": per_site,
    }
    for metric in ("accuracy", "precision", "recall", "f1", "roc_auc", task.main_metric):
        vals = [v[metric] for v in per_site.values() if isinstance(v.get(metric), float) and math.isfinite(v[metric])]
        if vals:
            summary[f"mean_site_{metric}"] = float(np.mean(vals))
    summary.update(task.summarize(per_site))
    summary["missing_sites"] = sorted(s.name for s in sites.values() if s.missed and s.missed[-1] == cfg.num_rounds)
    summary["refused_sites"] = refused  # in node order
    max_eps = _max_epsilon(sites)
    summary["max_epsilon"] = max_eps if math.isfinite(max_eps) else None
    return summary
