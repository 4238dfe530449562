"""What a site sends back from a train round: its shared arrays, made safe to send.

* Central DP with client-side clipping: the update (new - global) is clipped to
  ``central-clip`` in L2 norm here, at the site, so the coordinator's Gaussian noise on
  the equal-weight mean covers every site even when it cannot see single updates.
* Secure aggregation: the (weighted) arrays leave only quantised and masked
  (``secagg_client.masked_update``); the weight is the example count for FedAvg and 1
  under central DP (equal weights: the noise calibration holds and no size leaks).
"""

from __future__ import annotations

import math

import numpy as np
from flwr.app import ArrayRecord, Context, Message

from ..shared.arrays import to_record
from ..shared.config import RunConfig


def clip_update(arrays: dict[str, np.ndarray], reference: dict[str, np.ndarray], bound: float) -> dict[str, np.ndarray]:
    """``reference + clip(arrays - reference)`` with the update's L2 norm at most ``bound``."""
    delta = {k: arrays[k].astype(np.float64) - reference[k].astype(np.float64) for k in arrays}
    norm = math.sqrt(sum(float(np.sum(d * d)) for d in delta.values()))
    scale = min(1.0, bound / norm) if norm > 0 else 1.0
    return {k: (reference[k].astype(np.float64) + scale * delta[k]).astype(arrays[k].dtype) for k in arrays}


def outgoing(msg: Message, context: Context, cfg: RunConfig, arrays: dict[str, np.ndarray],
             reference: dict[str, np.ndarray], num_examples: int) -> tuple[str, ArrayRecord]:
    """(record name, record) of the site's update: ``arrays`` or, masked, ``masked``."""
    if cfg.central_dp == "client":
        arrays = clip_update(arrays, reference, cfg.central_clip)
    if not cfg.secure_aggregation:
        return "arrays", to_record(arrays)
    from .secagg_client import masked_update

    weight = 1.0 if cfg.central_dp != "off" else float(num_examples)
    return "masked", masked_update(msg, context, arrays, weight)
