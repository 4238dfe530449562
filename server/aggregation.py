"""Folding accepted train replies into the next global model.

The round loop hands each accepted reply to an ``Aggregator`` as it arrives and asks for
the result at the end of the round. ``StreamingFedAvg`` keeps only a running weighted
sum, so memory does not grow with the number of hospitals; ``StrategyAggregator``
collects the replies for a Flower strategy whose rule needs them all at once (FedAdam's
server optimiser, median, trimmed mean, Krum).
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
from flwr.app import ArrayRecord, Message
from flwr.serverapp.strategy import FedAvg, FedProx, Strategy

from ..shared.arrays import to_numpy


class Aggregator(Protocol):
    def add(self, msg: Message, decoded: dict[str, np.ndarray] | None = None) -> None:
        """Take one accepted (already validated) train reply; ``decoded``: its arrays as
        validation decoded them, if it did."""

    def result(self) -> dict[str, np.ndarray] | None:
        """The aggregated arrays, or None if nothing was accepted."""

    @property
    def count(self) -> int:
        """Number of replies taken."""


class StreamingFedAvg:
    """Example-weighted mean, accumulated one reply at a time in float64."""

    def __init__(self, reference: dict[str, np.ndarray], weight_key: str = "num-examples") -> None:
        self._reference = reference
        self._sum: dict[str, np.ndarray] | None = None
        self._weight = 0.0
        self._key = weight_key
        self.count = 0

    def add(self, msg: Message, decoded: dict[str, np.ndarray] | None = None) -> None:
        w = float(msg.content.metric_records["metrics"][self._key])
        arrays = msg.content.array_records["arrays"]
        if self._sum is None:
            self._sum = {k: np.zeros(v.shape, dtype=np.float64) for k, v in self._reference.items()}
        for k in self._sum:
            self._sum[k] += w * (decoded[k] if decoded is not None else arrays[k].numpy())
        self._weight += w
        self.count += 1

    def result(self) -> dict[str, np.ndarray] | None:
        if self._sum is None or self._weight <= 0:
            return None
        return {k: (v / self._weight).astype(self._reference[k].dtype) for k, v in self._sum.items()}


class StrategyAggregator:
    """Collect replies and let the Flower strategy aggregate them."""

    def __init__(self, strategy: Strategy, server_round: int, reference: dict[str, np.ndarray]) -> None:
        self._strategy, self._round, self._reference = strategy, server_round, reference
        self._replies: list[Message] = []

    @property
    def count(self) -> int:
        return len(self._replies)

    def add(self, msg: Message, decoded: dict[str, np.ndarray] | None = None) -> None:
        # Flower's strategies decode the records themselves (``decoded`` is not used).
        # Flower's rules pair arrays by position: put them in the global model's order,
        # whatever order the site sent them in (names were validated, order was not).
        arrays = msg.content.array_records["arrays"]
        msg.content["arrays"] = ArrayRecord({k: arrays[k] for k in self._reference})
        self._replies.append(msg)

    def result(self) -> dict[str, np.ndarray] | None:
        if not self._replies:
            return None
        arrays, _ = self._strategy.aggregate_train(self._round, self._replies)
        if arrays is None:
            return None
        out = to_numpy(arrays)
        return {k: out[k].astype(self._reference[k].dtype, copy=False) for k in self._reference}


def make_aggregator(strategy: Strategy, server_round: int, reference: dict[str, np.ndarray]) -> Aggregator:
    """Streaming for plain (example-weighted) averaging, the strategy's own rule otherwise."""
    if type(strategy) in (FedAvg, FedProx):
        return StreamingFedAvg(reference, strategy.weighted_by_key)
    return StrategyAggregator(strategy, server_round, reference)
