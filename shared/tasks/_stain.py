"""H&E stain colour: per-site stain shifts, federated stain normalisation, HED jitter.

All three work in scikit-image's haematoxylin-eosin-DAB (HED) space (Ruifrok &
Johnston's colour deconvolution, ``skimage.color.rgb2hed``/``hed2rgb``). Hospitals
differ mostly in how strongly and in which hue they stain, which is a scale and offset
of the H and E channels after deconvolution; that is what the simulator's site shift
draws, what normalisation undoes, and what training-time jitter randomises (Tellez et
al., "Quantifying the effects of data augmentation and stain color normalization in
convolutional neural networks for computational pathology", MedIA 2019).

The torch jitter uses scikit-image's own matrices (``hed_from_rgb``, ``rgb_from_hed``)
and its exact formulas, so it agrees with ``rgb2hed``/``hed2rgb`` (a test checks) while
running on batches of tensors, on the GPU when there is one.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from skimage.color import hed2rgb, hed_from_rgb, rgb2hed, rgb_from_hed

#: scikit-image's log offset in separate_stains/combine_stains.
_LOG_ADJUST = float(np.log(1e-6))
_HED_FROM_RGB = torch.tensor(hed_from_rgb, dtype=torch.float32)
_RGB_FROM_HED = torch.tensor(rgb_from_hed, dtype=torch.float32)
#: Images are processed in chunks so a large site never needs a float64 copy of all of it.
_CHUNK = 512


def to_hed(images: np.ndarray) -> np.ndarray:
    """HED stain densities (float32) of uint8 RGB images shaped (..., H, W, 3)."""
    return rgb2hed(images).astype(np.float32)


def to_uint8_rgb(hed: np.ndarray) -> np.ndarray:
    return np.round(hed2rgb(hed) * 255.0).astype(np.uint8)


def draw_site_shift(rng: np.random.Generator, strength: float = 0.3) -> tuple[np.ndarray, np.ndarray]:
    """A hospital's stain: (scale, offset) for H, E, D; DAB is left as it is (no DAB in H&E)."""
    scale = np.ones(3, dtype=np.float32)
    offset = np.zeros(3, dtype=np.float32)
    scale[:2] = rng.uniform(1 - strength, 1 + strength, size=2)
    offset[:2] = rng.uniform(-0.02, 0.02, size=2) * strength / 0.3
    return scale, offset


def apply_shift(images: np.ndarray, scale: np.ndarray, offset: np.ndarray) -> np.ndarray:
    """uint8 RGB images (N, H, W, 3) as if stained by a hospital with this (scale, offset)."""
    out = np.empty_like(images)
    for start in range(0, len(images), _CHUNK):
        hed = to_hed(images[start:start + _CHUNK])
        out[start:start + _CHUNK] = to_uint8_rgb(hed * scale + offset)
    return out


# ---- federated stain normalisation ------------------------------------------------
def stain_sums(images: np.ndarray) -> dict[str, np.ndarray]:
    """Pixel sums and sums of squares of H, E and D densities over a set of images."""
    return channel_sums(images, to_hed, "stain")


def channel_sums(images: np.ndarray, transform: Callable[[np.ndarray], np.ndarray], prefix: str,
                 chunk: int = _CHUNK) -> dict[str, np.ndarray]:
    """``<prefix>_sum``, ``_sq_sum`` and ``_count`` of ``transform``'s 3 channels over every
    pixel of (N, H, W, 3) uint8 images, a chunk of images at a time: a float64 copy of a
    whole site (19k PCam patches) would take about 4 GB."""
    total, squares, count = np.zeros(3), np.zeros(3), 0.0
    for start in range(0, len(images), chunk):
        values = transform(images[start:start + chunk]).reshape(-1, 3).astype(np.float64)
        total += values.sum(axis=0)
        squares += (values ** 2).sum(axis=0)
        count += len(values)
    return {f"{prefix}_sum": total, f"{prefix}_sq_sum": squares, f"{prefix}_count": np.array([count])}


def stain_target(totals: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Mean and spread of H, E, D densities over all sites' pixels: the reference stain."""
    n = max(float(totals["stain_count"][0]), 1.0)
    mean = totals["stain_sum"] / n
    std = np.sqrt(np.maximum(totals["stain_sq_sum"] / n - mean ** 2, 1e-8))
    return {"stain_mean": mean.astype(np.float32), "stain_std": np.maximum(std, 1e-4).astype(np.float32)}


def normalise(images: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """Reinhard-style normalisation in HED space, per site: the H/E/D mean and spread of
    this set of images (a hospital's patches) moved to the federation's reference.

    Per set, not per image: how much haematoxylin one patch holds compared with the
    others is what tells tumour from normal tissue, and must survive normalisation.
    """
    own = stain_target(stain_sums(images))
    scale = std / own["stain_std"]
    shift = mean - own["stain_mean"] * scale
    out = np.empty_like(images)
    for start in range(0, len(images), _CHUNK):
        out[start:start + _CHUNK] = to_uint8_rgb(to_hed(images[start:start + _CHUNK]) * scale + shift)
    return out


# ---- training-time jitter on tensors ------------------------------------------------
def hed_jitter(x: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """``hed2rgb(rgb2hed(x) * scale + offset)`` for float RGB in [0, 1], shaped (B, 3, H, W).

    ``scale`` and ``offset`` are (B, 3): one stain draw per image.
    """
    dev = x.device
    rgb = x.clamp_min(1e-6).permute(0, 2, 3, 1)  # B, H, W, 3
    stains = ((torch.log(rgb) / _LOG_ADJUST) @ _HED_FROM_RGB.to(dev)).clamp_min(0)
    stains = stains * scale[:, None, None, :] + offset[:, None, None, :]
    out = torch.exp((stains * _LOG_ADJUST) @ _RGB_FROM_HED.to(dev)).clamp(0, 1)
    return out.permute(0, 3, 1, 2)
