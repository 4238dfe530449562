"""Conversions between torch models, numpy dicts and Flower ArrayRecords."""

from __future__ import annotations

from typing import Mapping

import numpy as np
import torch
from flwr.app import Array, ArrayRecord
from torch import nn


def to_record(arrays: Mapping[str, np.ndarray | torch.Tensor]) -> ArrayRecord:
    out = {}
    for k, v in arrays.items():
        if isinstance(v, torch.Tensor):
            v = v.detach().cpu().numpy()
        out[k] = Array(np.ascontiguousarray(v))
    return ArrayRecord(out)


def to_numpy(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in record.items()}


def load_into(model: nn.Module, arrays: Mapping[str, np.ndarray], *, strict_keys: set[str] | None = None) -> None:
    """Copy arrays into the model's state; keys and shapes must match exactly."""
    state = model.state_dict()
    expected = strict_keys if strict_keys is not None else set(state)
    if set(arrays) != expected:
        missing, extra = expected - set(arrays), set(arrays) - expected
        raise ValueError(f"array keys differ from the model: missing {sorted(missing)}, unexpected {sorted(extra)}")
    with torch.no_grad():
        for k, v in arrays.items():
            target = state[k]
            if tuple(v.shape) != tuple(target.shape):
                raise ValueError(f"array '{k}' has shape {tuple(v.shape)}, model expects {tuple(target.shape)}")
            target.copy_(torch.from_numpy(np.asarray(v)).to(target.dtype))
