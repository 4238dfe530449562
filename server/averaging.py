"""The coordinator's moving average of the global model over rounds (``ema-decay``).

Under DP-SGD every round's global model carries that round's noise. Averaging the
iterates (Polyak-Ruppert; an exponential moving average as in De et al. 2022, "Unlocking
high-accuracy differentially private image classification through scale") cancels part
of it without touching training: the sites keep training from the plain aggregate, and
the average is what they evaluate and what the run saves. It is computed from the
aggregates alone, so it is post-processing and costs no ε.

The average starts at the first round's aggregate rather than the initial model, so
early rounds are not pulled towards the random initialisation.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np


def updated(average: Mapping[str, np.ndarray] | None, latest: Mapping[str, np.ndarray],
            decay: float) -> dict[str, np.ndarray]:
    """``decay * average + (1 - decay) * latest``, per array; ``latest`` itself when
    there is no average yet. Non-float arrays (counters, integer buffers) are not
    averaged: the latest value is taken."""
    if average is None:
        return {k: np.array(v, copy=True) for k, v in latest.items()}
    return {k: (decay * average[k] + (1.0 - decay) * v).astype(v.dtype, copy=False) if v.dtype.kind == "f"
            else np.array(v, copy=True) for k, v in latest.items()}
