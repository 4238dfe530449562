"""Where tensors are computed: the GPU when one is present, else the CPU.

Shared because both the training loop and datasets that keep their records on the
compute device (pathology's patches) must agree on it.
"""

from __future__ import annotations

import torch


def device() -> torch.device:
    """CUDA when present, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
