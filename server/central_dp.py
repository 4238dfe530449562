"""Central differential privacy on the aggregate: Flower's fixed-clipping wrappers, made exact.

``central-dp = "server"`` wraps FedAvg in Flower's ``DifferentialPrivacyServerSideFixedClipping``
(the coordinator clips each update to ``central-clip``); ``"client"`` in
``DifferentialPrivacyClientSideFixedClipping`` (each site clips its own update, which is
what makes central DP work with secure aggregation). In both, Gaussian noise of standard
deviation ``central-noise * central-clip / m`` is added to the mean of the m updates.

Three things fedcare changes, each because the guarantee depends on it:

* Hospitals are weighted equally (FedAvg weighted by a constant), never by example
  counts: with count weights one site's influence, hence the sensitivity, is no longer
  ``clip / m``, and the aggregate would leak site sizes.
* ``m`` is the number of updates actually averaged this round (accepted replies), set
  per round; Flower's fixed ``num_sampled_clients`` would under-noise a round in which a
  site dropped out or was rejected.
* Noise comes from a generator seeded by the operating system's CSPRNG, not NumPy's
  global generator (which anyone may have seeded, making the noise predictable).

Accounting: each release is a Gaussian mechanism with noise multiplier ``central-noise``
on a site-level neighbouring relation (add or remove one hospital's whole update). The
ε reported in ``summary.json`` is the composition (``privacy.epsilon``) of the releases at
``delta`` with no amplification by sampling (sites are picked by a fixed-size draw, not
Poisson sampling): within PRV's 0.01 error budget of the exact ε when every site takes
part in every round, conservative otherwise.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideFixedClipping,
    FedAvg,
    Strategy,
)

from ..client import privacy
from ..shared.config import DEFAULT_SITE_DELTA, RunConfig

#: Metric every reply is given before aggregation: FedAvg then weights sites equally.
UNIT_WEIGHT = "fedcare-unit-weight"
CENTRAL_DELTA = DEFAULT_SITE_DELTA


def noise_generator() -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(int.from_bytes(os.urandom(32), "little")))


class CentralDP:
    """Mixin: per-round m, CSPRNG noise in float64, a count of releases.

    The count lives in a dict of numpy arrays (``central_account``) because that is what
    the coordinator's checkpoints save and restore of a strategy: a resumed run keeps
    accounting from where it stopped.
    """

    central_account: dict[str, np.ndarray]

    def __init__(self, strategy: Strategy, noise: float, clip: float) -> None:
        super().__init__(strategy, noise, clip, 1)  # type: ignore[call-arg]
        self.central_account = {"releases": np.zeros(1, dtype=np.int64)}

    @property
    def releases(self) -> int:
        return int(self.central_account["releases"][0])

    def _add_noise_to_aggregated_arrays(self, aggregated_arrays: ArrayRecord) -> ArrayRecord:
        std = self.noise_multiplier * self.clipping_norm / self.num_sampled_clients  # type: ignore[attr-defined]
        gen = noise_generator()
        out = {}
        for key, arr in aggregated_arrays.items():
            value = arr.numpy()
            noisy = value.astype(np.float64) + gen.normal(0.0, std, value.shape)
            out[key] = Array(noisy.astype(value.dtype))
        self.central_account = {"releases": self.central_account["releases"] + 1}
        return ArrayRecord(out)

    def noisy_mean(self, mean: dict[str, np.ndarray], count: int) -> dict[str, np.ndarray]:
        """Noise for a mean computed elsewhere (the secure-aggregation sum of ``count`` sites)."""
        self.num_sampled_clients = count  # type: ignore[attr-defined]
        record = self._add_noise_to_aggregated_arrays(ArrayRecord({k: Array(np.ascontiguousarray(v))
                                                                   for k, v in mean.items()}))
        return {k: v.numpy() for k, v in record.items()}

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        """Equal weights, m = the accepted replies, then Flower's clip/average/noise."""
        replies = list(replies)
        for msg in replies:
            msg.content.metric_records["metrics"][UNIT_WEIGHT] = 1
        self.num_sampled_clients = max(1, len(replies))  # type: ignore[attr-defined]
        return super().aggregate_train(server_round, replies)  # type: ignore[misc]


class ServerSideDP(CentralDP, DifferentialPrivacyServerSideFixedClipping):
    pass


class ClientSideDP(CentralDP, DifferentialPrivacyClientSideFixedClipping):
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        # Sites read the clipping bound from the run config; a message config key would be
        # refused by them (no coordinator may send settings a site did not agree to).
        return self.strategy.configure_train(server_round, arrays, config, grid)


def wrap(strategy: FedAvg, cfg: RunConfig) -> Strategy:
    """The strategy with central DP as configured (``strategy`` must weight by UNIT_WEIGHT)."""
    if cfg.central_dp == "server":
        return ServerSideDP(strategy, cfg.central_noise, cfg.central_clip)
    if cfg.central_dp == "client":
        return ClientSideDP(strategy, cfg.central_noise, cfg.central_clip)
    return strategy


def report(strategy: Strategy, cfg: RunConfig) -> dict[str, Any]:
    """``summary.json``'s ``central_dp`` entry (empty without central DP)."""
    if not isinstance(strategy, CentralDP):
        return {}
    releases = strategy.releases
    eps = privacy.epsilon([(cfg.central_noise, 1.0, releases)], CENTRAL_DELTA) if releases else 0.0
    return {"central_dp": {
        "clipping": cfg.central_dp, "noise_multiplier": cfg.central_noise, "clip": cfg.central_clip,
        "releases": releases, "epsilon": eps, "delta": CENTRAL_DELTA,
        "unit": "hospital (site-level: one site's whole update)", "weighting": "equal",
    }}
