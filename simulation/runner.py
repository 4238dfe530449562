"""Run a whole federation in one process: the real ServerApp and ClientApp, N hospitals.

Everything a run needs is validated before anything is written: the run config, every
site's data file (errors name file, row and column) and the output folder.
"""

from __future__ import annotations

import csv
import logging
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Mapping, Sequence

from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp

from ..client.app import app as client_app
from ..client.site import builtin_partition, file_records, file_stamp
from ..server import events
from ..server.app import app as server_app
from ..server.rounds import default_out_dir
from ..shared.config import RunConfig, SiteConfig
from ..shared.errors import ConfigError, DataError
from ..shared.registry import get_task
from .grid import InProcessGrid


@dataclass(frozen=True)
class Federation:
    """Who takes part: one node config per virtual hospital."""

    node_configs: dict[int, dict]
    #: (site, row or path, reason) of records skipped while reading hospitals' files.
    skipped: tuple[tuple[str, str, str], ...] = ()

    @property
    def size(self) -> int:
        return len(self.node_configs)


def plan_federation(cfg: RunConfig, *, epsilon: float, delta: float, data: Sequence[Path] = (),
                    strict: bool = False, ledger: str = "off", min_records: int | None = None) -> Federation:
    """Node configs for builtin partitions or one hospital per data file, validated.

    ``ledger``: the privacy-ledger directory every virtual hospital writes to; "off" by
    default, so that a simulation never spends a real hospital's recorded budget.
    ``min_records``: every virtual hospital's ``min-records`` (default: the node default).
    """
    task = get_task(cfg.task)
    resolved = cfg.resolved(task.defaults)
    budget = {"epsilon": epsilon, "delta": delta, "ledger": ledger or "off"}
    if min_records is not None:
        budget["min-records"] = min_records
    SiteConfig.from_mapping(budget)
    if data:
        configs = {}
        names: set[str] = set()
        skipped: list[tuple[str, str, str]] = []
        for i, path in enumerate(data):
            path = Path(path)
            # DataError names file/row/column; read through the hospitals' own cache, so a
            # virtual hospital does not read its file a second time.
            records = file_records(task.name, resolved.dataset, str(path.resolve()), file_stamp(path.resolve()),
                                   strict)
            name = path.stem if path.stem not in names else f"{path.stem}-{i}"
            names.add(name)
            skipped += [(name, where, why) for where, why in records.skipped]
            # The researcher owns both sides here: the run's seed also deals each file's
            # train/test split (a real hospital's split-seed stays its own, 0 by default).
            configs[i + 1] = {"data": str(path.resolve()), "site": name, "strict": strict,
                              "split-seed": resolved.seed, **budget}
        return Federation(configs, tuple(skipped))
    if resolved.dataset not in task.datasets:
        raise ConfigError(f"task {task.name}: unknown dataset '{resolved.dataset}' ({', '.join(task.datasets)})")
    sites = builtin_partition(task.name, resolved.dataset, resolved.partition, resolved.num_sites,
                              resolved.dirichlet_alpha, resolved.seed)
    return Federation({i + 1: {"partition-id": i, "num-partitions": len(sites), **budget}
                       for i in range(len(sites))})


@contextmanager
def observing(observer: events.Observer | None) -> Iterator[None]:
    if observer is None:
        yield
        return
    token = events.current.set(observer)
    try:
        yield
    finally:
        events.current.reset(token)


def simulate(cfg: RunConfig, federation: Federation, *, out: Path | None = None,
             observer: events.Observer | None = None,
             unreachable: Callable[[int, Message], bool] | None = None,
             tap: Callable[[Message], None] | None = None,
             apps: Mapping[int, ClientApp] | None = None) -> Path:
    """Run the federation in this process and return the finished run folder."""
    out = Path(out) if out else default_out_dir(cfg)
    if out.exists():
        raise ConfigError(f"output folder {out} already exists")
    run_cfg = cfg.replace(out_dir=str(out), min_sites=min(cfg.min_sites, federation.size))
    mapping = run_cfg.to_mapping()
    grid = InProcessGrid(client_app, federation.node_configs, mapping, unreachable=unreachable, tap=tap, apps=apps)
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=mapping)
    with observing(observer), _quiet_flower(), _server_identity(context.run_id):
        server_app(grid, context)
    if federation.skipped:
        with (out / "skipped.csv").open("w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["site", "record", "reason"])
            writer.writerows(federation.skipped)
    return out


def with_split_seeds(node_configs: dict[int, dict], seed: int) -> dict[int, dict]:
    """Node configs of a checkpoint with each data file's ``split-seed`` spelled out.

    Checkpoints written before ``split-seed`` defaulted to 0 left it out, and their runs
    split files by the run's seed: resumed on the new default, a hospital would move
    records between its train and test sides mid-run.
    """
    return {node: ({"split-seed": seed, **c} if "data" in c else c) for node, c in node_configs.items()}


def resume(run_dir: Path, *, observer: events.Observer | None = None) -> Path:
    """Continue an interrupted in-process run from its last checkpoint.

    The checkpoint holds the run config, the global model, the strategy and RNG states
    and every virtual hospital's node config and ``Context.state`` (so ε continues
    where it stopped); the federation is rebuilt from it.
    """
    from ..server import checkpoint
    from .grid import node_configs_from_states

    partial = checkpoint.locate(run_dir)
    saved = checkpoint.load(partial / checkpoint.FILE)
    if not saved.node_states:
        raise ConfigError(f"{partial}: the checkpoint holds no hospital states (not an in-process run)")
    cfg = RunConfig.from_mapping({**saved.config, "resume": str(partial)})
    node_configs = with_split_seeds(node_configs_from_states(saved.node_states), cfg.seed)
    grid = InProcessGrid(client_app, node_configs, cfg.to_mapping())
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=cfg.to_mapping())
    with observing(observer), _quiet_flower(), _server_identity(context.run_id):
        server_app(grid, context)
    return checkpoint.final_name(partial)


@contextmanager
def _server_identity(run_id: int) -> Iterator[None]:
    """Identify this process as the ServerApp's task, as Flower's runtime does."""
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, run_id, SUPERLINK_NODE_ID
    try:
        yield
    finally:
        TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved


@contextmanager
def _quiet_flower() -> Iterator[None]:
    """Flower logs every sampling step at INFO; a researcher wants the progress bar."""
    logger = logging.getLogger("flwr")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


__all__ = ["Federation", "plan_federation", "simulate", "resume", "DataError"]
