"""The same ServerApp and ClientApp on Flower's Ray simulation engine.

For federations larger than one process should hold, or spread over several machines:
Flower's engine runs each virtual hospital's ClientApp in a pool of Ray actors, so when
``ray start --head`` / ``ray start --address=HEAD:6379`` have formed a cluster (and
``RAY_ADDRESS`` points at it), the actors spread over its machines (see the README).

Limits, both from Flower's engine: its virtual nodes get only ``partition-id`` and
``num-partitions`` as node config, so they use the task's builtin partitions and the
ClientApp's default privacy budget (ε = 1, δ = 1e-5; never set by the coordinator); and
the engine keeps no hospital state fedcare could checkpoint, so a Ray run resumes
without the virtual hospitals' accountant history (use the in-process engine for that).

The run config reaches the nodes the way Flower's own tooling delivers it: from the
``[tool.flwr.app.config]`` table of an app directory, written here for this run only.
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

from flwr.app import Context, RecordDict

from ..client.app import app as client_app
from ..server.app import app as server_app
from ..server.rounds import default_out_dir
from ..shared.config import DEFAULT_SITE_DELTA, DEFAULT_SITE_EPSILON, RunConfig
from ..shared.errors import ConfigError
from ..shared.flower_tools import write_app_pyproject
from ..shared.registry import get_task


def write_app_dir(folder: Path, mapping: dict) -> Path:
    """A minimal Flower app directory whose config table is this run's config."""
    for key, value in mapping.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"run config value {value!r} of '{key}' cannot be passed to Ray nodes")
    write_app_pyproject(folder, name="fedcare-ray-run", version="0.1.0", config=mapping)
    return folder


def simulate_ray(cfg: RunConfig, *, out: Path | None = None, epsilon: float = DEFAULT_SITE_EPSILON,
                 delta: float = DEFAULT_SITE_DELTA, num_cpus_per_client: float = 1.0,
                 backend_init_args: dict | None = None) -> Path:
    """Run the federation on Flower's Ray engine; return the finished run folder."""
    from flwr.simulation.run_simulation import NOOP_FEDERATION_ID, _run_simulation
    from flwr.supercore.run import Run
    from flwr.supercore.telemetry import EventType

    if epsilon != DEFAULT_SITE_EPSILON or delta != DEFAULT_SITE_DELTA:
        raise ConfigError(f"--engine ray: Flower's virtual nodes carry no node config, so every hospital "
                          f"uses the default budget ε={DEFAULT_SITE_EPSILON:g}, δ={DEFAULT_SITE_DELTA:g}; "
                          f"use the in-process engine for other budgets")
    task = get_task(cfg.task)
    resolved = cfg.resolved(task.defaults)
    from ..client.site import builtin_partition

    num_nodes = len(builtin_partition(task.name, resolved.dataset, resolved.partition, resolved.num_sites,
                                      resolved.dirichlet_alpha, resolved.seed))
    out = Path(out) if out else default_out_dir(cfg)
    if out.exists():
        raise ConfigError(f"output folder {out} already exists")
    mapping = cfg.replace(out_dir=str(out.resolve()), min_sites=min(cfg.min_sites, num_nodes)).to_mapping()
    backend = {"client_resources": {"num_cpus": num_cpus_per_client, "num_gpus": 0.0},
               "init_args": dict(backend_init_args or {})}
    with tempfile.TemporaryDirectory(prefix="fedcare-ray-") as tmp:
        app_dir = write_app_dir(Path(tmp), mapping)
        run = Run.create_empty(run_id=1)
        run.primary_task_id = 1
        run.federation_id = NOOP_FEDERATION_ID
        context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=dict(mapping))
        from .runner import _quiet_flower, _server_identity

        with _quiet_flower(), _server_identity(1):
            _run_simulation(num_supernodes=num_nodes, exit_event=EventType.PYTHON_API_RUN_SIMULATION_LEAVE,
                            client_app=client_app, server_app=server_app, backend_name="ray",
                            backend_config=backend, server_app_context=context, app_dir=str(app_dir),
                            run=run, is_app=True)
    if not out.exists():
        raise RuntimeError("the Ray simulation ended without a finished run folder (see the log above)")
    return out
