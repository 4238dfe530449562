"""Round checkpoints: what a killed run needs to continue exactly where it stopped.

After every round the coordinator writes ``checkpoint.npz`` into the ``.partial`` run
folder, atomically (a temporary file renamed over the old one), so a kill at any moment
leaves either the previous round's checkpoint or this one, never half of one. It holds:

* the round number and the run configuration it belongs to;
* the global model, its moving average (``ema-decay``) and the federation's
  preprocessing parameters;
* the strategy's state: every attribute that is a dict of arrays (FedAdam's ``m_t``,
  ``v_t`` and ``current_arrays``, control variates of strategies that keep them);
* the RNG states the server draws from (Python's ``random``, which Flower's node
  sampling uses, and torch's);
* each site's status (ε spent, last metrics, missed rounds) and the last global metric;
* the best validation round so far with its validation and test metric, exact (JSON
  floats round-trip; ``rounds.csv`` holds 6 significant digits);
* when the grid owns its nodes' ``Context`` (the in-process simulator), every virtual
  hospital's persistent state: its privacy accountant history and local parameters.
  Without it a resumed simulation would restart ε at zero.

Metrics files are not copied in: ``metrics.csv`` and ``rounds.csv`` already hold every
finished round, and resuming cuts them back to the checkpoint's round.

NumPy's global generator is deliberately not saved: restoring it would make server-side
noise drawn from it replayable from a file on disk.
"""

from __future__ import annotations

import io
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from ..shared.atomic import write_bytes_atomic
from ..shared.config import RunConfig
from ..shared.errors import ConfigError

FILE = "checkpoint.npz"
VERSION = 1
#: Run-config keys that may differ between the killed run and its resumption.
MAY_DIFFER = frozenset({"resume", "out-dir", "round-timeout"})


@dataclass
class Checkpoint:
    round: int
    config: dict[str, Any]
    global_arrays: dict[str, np.ndarray]
    prep: dict[str, np.ndarray]
    strategy_state: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    sites: dict[str, dict[str, Any]] = field(default_factory=dict)
    node_states: dict[int, bytes] = field(default_factory=dict)
    random_state: Any = None
    torch_rng: np.ndarray | None = None
    last_metric: float | None = None
    #: (round, validation metric, test metric) of the best validation round so far.
    best: tuple[int, float, float | None] | None = None
    #: The moving average of the global model (``ema-decay``), when the run keeps one.
    average: dict[str, np.ndarray] | None = None


def strategy_state(strategy: Any, prefix: str = "") -> dict[str, dict[str, np.ndarray]]:
    """Every attribute of ``strategy`` that is a non-empty dict of numpy arrays.

    Strategies that wrap another (Flower's DP wrappers) are searched too, the inner
    strategy's attributes named ``<attribute>.<name>``.
    """
    from flwr.serverapp.strategy import Strategy

    out = {}
    for name, value in vars(strategy).items():
        if isinstance(value, dict) and value and all(isinstance(v, np.ndarray) for v in value.values()):
            out[prefix + name] = {k: v.copy() for k, v in value.items()}
        elif isinstance(value, Strategy) and value is not strategy and prefix.count(".") < 3:
            out.update(strategy_state(value, f"{prefix}{name}."))
    return out


def restore_strategy(strategy: Any, state: Mapping[str, Mapping[str, np.ndarray]]) -> None:
    for path, arrays in state.items():
        *inner, name = path.split(".")
        target = strategy
        for attr in inner:
            target = getattr(target, attr)
        setattr(target, name, {k: np.array(v) for k, v in arrays.items()})


def capture_rng() -> tuple[Any, np.ndarray]:
    return random.getstate(), torch.get_rng_state().numpy().copy()


def restore_rng(ckpt: Checkpoint) -> None:
    if ckpt.random_state is not None:
        version, internal, gauss = ckpt.random_state
        random.setstate((version, tuple(internal), gauss))
    if ckpt.torch_rng is not None:
        torch.set_rng_state(torch.from_numpy(np.array(ckpt.torch_rng, dtype=np.uint8)))


def save(folder: Path, ckpt: Checkpoint) -> Path:
    """Write ``folder/checkpoint.npz`` atomically."""
    arrays: dict[str, np.ndarray] = {}
    for k, v in ckpt.global_arrays.items():
        arrays[f"global/{k}"] = np.asarray(v)
    for k, v in ckpt.prep.items():
        arrays[f"prep/{k}"] = np.asarray(v)
    for k, v in (ckpt.average or {}).items():
        arrays[f"average/{k}"] = np.asarray(v)
    for attr, values in ckpt.strategy_state.items():
        for k, v in values.items():
            arrays[f"strategy/{attr}/{k}"] = np.asarray(v)
    for node, blob in ckpt.node_states.items():
        arrays[f"node/{node}"] = np.frombuffer(blob, dtype=np.uint8)
    if ckpt.torch_rng is not None:
        arrays["rng/torch"] = np.asarray(ckpt.torch_rng, dtype=np.uint8)
    meta = {
        "version": VERSION, "round": ckpt.round, "config": ckpt.config, "sites": ckpt.sites,
        "random_state": ckpt.random_state, "last_metric": ckpt.last_metric,
        "best": None if ckpt.best is None else list(ckpt.best),
    }
    arrays["meta"] = np.frombuffer(json.dumps(meta, allow_nan=True).encode(), dtype=np.uint8)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    path = Path(folder) / FILE
    write_bytes_atomic(path, buf.getvalue(), fsync=True)
    return path


def load(path: Path) -> Checkpoint:
    try:
        with np.load(path, allow_pickle=False) as npz:
            data = {k: npz[k] for k in npz.files}
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: not a readable fedcare checkpoint ({type(exc).__name__})") from None
    if "meta" not in data:
        raise ConfigError(f"{path}: not a fedcare checkpoint (no metadata)")
    meta = json.loads(data.pop("meta").tobytes().decode())
    if meta.get("version") != VERSION:
        raise ConfigError(f"{path}: checkpoint version {meta.get('version')} is not supported")
    best = meta.get("best")  # absent in checkpoints written before it was kept
    ckpt = Checkpoint(round=int(meta["round"]), config=meta["config"], global_arrays={}, prep={},
                      sites=meta.get("sites", {}), random_state=meta.get("random_state"),
                      last_metric=meta.get("last_metric"),
                      best=None if best is None else (int(best[0]), float(best[1]),
                                                      None if best[2] is None else float(best[2])))
    for key, value in data.items():
        kind, _, rest = key.partition("/")
        if kind == "global":
            ckpt.global_arrays[rest] = value
        elif kind == "prep":
            ckpt.prep[rest] = value
        elif kind == "average":
            ckpt.average = ckpt.average or {}
            ckpt.average[rest] = value
        elif kind == "strategy":
            attr, _, name = rest.partition("/")
            ckpt.strategy_state.setdefault(attr, {})[name] = value
        elif kind == "node":
            ckpt.node_states[int(rest)] = value.tobytes()
        elif kind == "rng":
            ckpt.torch_rng = value
    return ckpt


def locate(run_dir: str | Path) -> Path:
    """The ``.partial`` folder of an interrupted run, given it or its final name."""
    path = Path(run_dir).expanduser()
    candidates = [path] if path.name.endswith(".partial") else [path.with_name(path.name + ".partial"), path]
    for cand in candidates:
        if (cand / FILE).is_file():
            return cand
    if path.is_dir() and (path / "summary.json").exists():
        raise ConfigError(f"{path} is a finished run: there is nothing to resume")
    raise ConfigError(f"{run_dir}: no interrupted run with a checkpoint ({FILE}) there; "
                      "a run killed before its first round ended cannot be resumed")


def final_name(partial: Path) -> Path:
    """The folder a resumed run is published under (``X.partial`` -> ``X``)."""
    return partial.with_name(partial.name[: -len(".partial")]) if partial.name.endswith(".partial") else partial


def check_compatible(saved: Mapping[str, Any], current: Mapping[str, Any], where: Path) -> None:
    """Refuse to continue a run under a different configuration."""
    # A key the checkpoint lacks was added to fedcare after it was written: the run had
    # that key's default.
    defaults = RunConfig().to_mapping()
    diff = sorted(k for k in set(saved) | set(current)
                  if k not in MAY_DIFFER and saved.get(k, defaults.get(k)) != current.get(k))
    if diff:
        detail = ", ".join(f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in diff)
        raise ConfigError(f"cannot resume {where}: run config differs from the checkpoint's ({detail})")
