"""The pathology model and the training-time view of a site's patches.

``PatchResNet`` is a compact residual CNN (four stages, GroupNorm, global average
pooling). DP-SGD needs per-sample gradients, which BatchNorm's cross-sample statistics
would break, so every normalisation is GroupNorm; the first convolution strides by two
so that per-sample gradient work stays small next to the forward pass.

``PatchDataset`` keeps a site's patches as one uint8 tensor, decoded once when the
hospital's data was read and, when training runs on a GPU, uploaded to it once; batches
are gathered and augmented there with batched tensor operations (flips, 90° rotations,
random crops, HED stain jitter) and never touch an image file again.
"""

from __future__ import annotations

import copy
from typing import Sequence

import torch
from torch import nn
from torch.nn import functional as F
from opacus.grad_sample import register_grad_sampler
from opacus.grad_sample import grad_sample_module as _gsm
from opacus.utils.tensor_utils import unfold2d
from torch.utils.data import Dataset

from ..config import TEST_VIEWS
from ._stain import hed_jitter

#: Output sizes (H x W) from which a per-sample convolution gradient is cheaper on the CPU
#: as one grouped convolution than as Opacus' unfold + einsum (measured on CPU, batch 64,
#: with ``client.memory`` keeping freed blocks: 1.5-3x faster at 22x22, 1.8x at 11x11 for
#: resnet's 96→96; at 6x6 about even). On CUDA the unfold path is the faster one at every
#: size (an H100, batch 2,048: a DP round took 0.45 s against 0.75 s), so it is used there.
_GROUPED_FROM = 100


class PatchConv(nn.Conv2d):
    """A Conv2d whose per-sample gradients (for DP-SGD) come, on the CPU, from one grouped convolution.

    Opacus' default computes them by unfolding every input patch (im2col) and a batched
    matrix product, which on large, thin feature maps costs far more than the layer's own
    backward pass. Treating the batch as convolution groups gives the same per-sample
    gradients from the optimised convolution-backward kernel (a test checks equality).

    While DP-SGD trains it (``per_sample_grads_only``, set by the training loop), its
    backward computes the input's gradient only: autograd's batch gradient of the weight
    would be computed, then overwritten by Opacus' clipped and noised sum unused.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.per_sample_grads_only = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.per_sample_grads_only and self.training:
            return self._input_grad_only(x)
        return self._conv_forward(x, self.weight, self.bias)

    @torch.jit.unused
    def _input_grad_only(self, x):  # unannotated: TorchScript reads it as Tensor -> Tensor
        if not torch.is_grad_enabled():
            return self._conv_forward(x, self.weight, self.bias)
        return _InputGradOnly.apply(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


class _InputGradOnly(torch.autograd.Function):
    """conv2d whose backward returns the input's gradient and none for weight and bias."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation, groups):  # type: ignore[override]
        ctx.save_for_backward(weight)
        ctx.conv = (x.shape, stride, padding, dilation, groups)
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        (weight,) = ctx.saved_tensors
        shape, stride, padding, dilation, groups = ctx.conv
        grad_in = None
        if ctx.needs_input_grad[0]:
            grad_in = torch.nn.grad.conv2d_input(shape, weight, grad_out, stride, padding, dilation, groups)
        return grad_in, None, None, None, None, None, None


def _patch_conv_grad_sample(layer: PatchConv, activations: list[torch.Tensor],
                            backprops: torch.Tensor) -> dict[nn.Parameter, torch.Tensor]:
    a = activations[0].to(backprops.dtype)
    n, cin, cout = a.shape[0], layer.in_channels, layer.out_channels
    if n == 0:
        grad = torch.zeros((0,) + tuple(layer.weight.shape), device=a.device, dtype=a.dtype)
    elif layer.kernel_size == (1, 1) and layer.stride == (1, 1) and layer.padding == (0, 0):
        # a 1x1 convolution is a matrix product per sample: no im2col, no grouped kernel
        grad = torch.bmm(backprops.reshape(n, cout, -1), a.reshape(n, cin, -1).transpose(1, 2))
    elif a.device.type == "cpu" and backprops.shape[-1] * backprops.shape[-2] >= _GROUPED_FROM:
        _, grad, _ = torch.ops.aten.convolution_backward(
            backprops.reshape(1, n * cout, *backprops.shape[2:]), a.reshape(1, n * cin, *a.shape[2:]),
            layer.weight.detach().repeat(n, 1, 1, 1), None, layer.stride, layer.padding, layer.dilation,
            False, [0, 0], n, [False, True, False])
    else:  # Opacus' own method (small maps, or CUDA): im2col, then one batched product
        cols = unfold2d(a, kernel_size=layer.kernel_size, padding=layer.padding, stride=layer.stride,
                        dilation=layer.dilation)
        grad = torch.einsum("noq,npq->nop", backprops.reshape(n, cout, -1), cols)
    out = {layer.weight: _owned(grad.reshape(n, cout, cin, *layer.kernel_size))}
    if layer.bias is not None and layer.bias.requires_grad:
        out[layer.bias] = _owned(backprops.sum(dim=(2, 3)))
    return out


register_grad_sampler(PatchConv)(_patch_conv_grad_sample)

_OWNED = "_fedcare_owned"


def _owned(grad_sample: torch.Tensor) -> torch.Tensor:
    """Mark a per-sample gradient this module allocated and nothing else refers to."""
    setattr(grad_sample, _OWNED, True)
    return grad_sample


def _adopt_owned(original):
    """Opacus' ``create_or_accumulate_grad_sample``, but a full batch of per-sample
    gradients marked ``_owned`` becomes the parameter's buffer as it is.

    Opacus always allocates a zeroed buffer of the batch size and copies the layer's
    per-sample gradients into it (for recurrent layers, which accumulate): for this
    model that is two passes over 44 M floats per step. Same values either way.
    """
    def create_or_accumulate_grad_sample(*, param, grad_sample, max_batch_len):
        if (getattr(grad_sample, _OWNED, False) and param.requires_grad
                and not hasattr(param, "_current_grad_sample") and grad_sample.shape[0] == max_batch_len):
            param._current_grad_sample = grad_sample
            return
        original(param=param, grad_sample=grad_sample, max_batch_len=max_batch_len)

    create_or_accumulate_grad_sample.wrapped = original
    return create_or_accumulate_grad_sample


if not hasattr(_gsm.create_or_accumulate_grad_sample, "wrapped"):
    _gsm.create_or_accumulate_grad_sample = _adopt_owned(_gsm.create_or_accumulate_grad_sample)

WIDTHS = {"resnet": (24, 48, 96, 192), "resnet-tiny": (8, 16, 32, 32)}


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(8, channels // 4) or 1, channels)


class Block(nn.Module):
    """Pre-activation-free basic residual block: conv-GN-ReLU-conv-GN + (projected) input."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = PatchConv(cin, cout, 3, stride, 1, bias=False)
        self.gn1 = _norm(cout)
        self.conv2 = PatchConv(cout, cout, 3, 1, 1, bias=False)
        self.gn2 = _norm(cout)
        self.skip = None
        if stride != 1 or cin != cout:
            self.skip = nn.Sequential(PatchConv(cin, cout, 1, stride, bias=False), _norm(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.gn1(self.conv1(x)))
        out = self.gn2(self.conv2(out))
        return F.relu(out + (x if self.skip is None else self.skip(x)))


class PatchResNet(nn.Module):
    def __init__(self, num_classes: int, widths: Sequence[int] = WIDTHS["resnet"], dropout: float = 0.0,
                 stem: int = 2) -> None:
        super().__init__()
        w0 = widths[0]
        k = 3 if stem == 2 else stem
        self.stem = nn.Sequential(PatchConv(3, w0, k, stem, 1 if stem == 2 else 0, bias=False), _norm(w0), nn.ReLU())
        stages, cin = [], w0
        for i, w in enumerate(widths):
            stages.append(Block(cin, w, 1 if i == 0 else 2))
            cin = w
        self.stages = nn.Sequential(*stages)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages(self.stem(x))
        return self.head(self.dropout(x.mean(dim=(2, 3))))


class PatchDataset(Dataset):
    """uint8 patches (N, 3, H, W) and labels; augmented per batch when ``train``.

    ``views`` > 1 when training yields that many independently augmented copies of each
    requested record, adjacent (record i's copies are rows i*views .. i*views+views-1;
    ``views_per_record`` tells the training loop to average their per-sample gradients).
    ``views`` > 1 at evaluation yields, per record, the centre crop under the first
    ``views`` symmetries of the square (``DIHEDRAL``), shaped (B, views, 3, h, w), for
    the task to average its scores over (test-time augmentation).
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, mean: torch.Tensor, std: torch.Tensor,
                 crop: int, *, train: bool, seed: int = 0, jitter: float = 0.05, views: int = 1) -> None:
        if views < 1 or (not train and views not in TEST_VIEWS):
            raise ValueError(f"views: {views} (training: >= 1; evaluation: 1, 4 or 8)")
        self.images, self.labels = images, labels
        self.mean, self.std = mean.view(1, 3, 1, 1), std.view(1, 3, 1, 1)
        self.crop, self.train, self.jitter, self.views = crop, train, jitter, views
        self.gen = torch.Generator().manual_seed(seed)
        self._placed: dict[torch.device, PatchDataset] = {}

    @property
    def views_per_record(self) -> int:
        return self.views if self.train else 1

    def __len__(self) -> int:
        return len(self.labels)

    def on_device(self, device: torch.device) -> "PatchDataset":
        """This dataset with its patches held on ``device``, uploaded once and kept, so
        batches are gathered and augmented there. Shares the augmentation generator, so
        the random stream (drawn on the CPU) is the same wherever the patches live."""
        device = torch.device(device)
        if self.images.device == device:
            return self
        if device not in self._placed:
            view = copy.copy(self)
            view.images, view.labels = self.images.to(device), self.labels.to(device)
            view.mean, view.std = self.mean.to(device), self.std.to(device)
            view._placed = {}
            self._placed[device] = view
        return self._placed[device]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.batch([i])
        return x[0], y[0]

    def __getitems__(self, indices: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Whole-batch fetch (DataLoader calls it): one gather, one vectorised augmentation."""
        if len(indices) == 0:
            return []
        x, y = self.batch(indices)
        return list(zip(x.unbind(0), y.unbind(0)))

    def batch(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.as_tensor(list(indices), dtype=torch.long)
        if self.train and self.views > 1:
            idx = idx.repeat_interleave(self.views)
        idx = idx.to(self.images.device)
        x = self.images[idx].float().div_(255.0)
        if self.train:
            return (self.augment(x) - self.mean) / self.std, self.labels[idx]
        x = (self.centre(x) - self.mean) / self.std
        if self.views > 1:
            x = torch.stack([transform(x) for transform in DIHEDRAL[:self.views]], dim=1)
        return x, self.labels[idx]

    def centre(self, x: torch.Tensor) -> torch.Tensor:
        off = (x.shape[-1] - self.crop) // 2
        return x[:, :, off:off + self.crop, off:off + self.crop]

    def augment(self, x: torch.Tensor) -> torch.Tensor:
        """Mirror, quarter turns, a random crop and HED jitter, one draw per image; the
        draws come from the CPU generator, the pixel work runs where ``x`` is."""
        b, g, dev = x.shape[0], self.gen, x.device
        flip = (torch.rand(b, generator=g) < 0.5).to(dev)
        x = torch.where(flip.view(b, 1, 1, 1), x.flip(-1), x)
        turns = torch.randint(0, 4, (b,), generator=g).to(dev).view(b, 1, 1, 1)
        # rot90 by k on a square as a transpose (odd k), then a flip of rows (k = 1, 2)
        # and of columns (k = 2, 3): three selections, no per-turn masks or device syncs
        x = torch.where(turns % 2 == 1, x.transpose(-2, -1), x)
        x = torch.where((turns == 1) | (turns == 2), x.flip(-2), x)
        x = torch.where(turns >= 2, x.flip(-1), x)
        span = x.shape[-1] - self.crop + 1
        oy = torch.randint(0, span, (b,), generator=g).to(dev)
        ox = torch.randint(0, span, (b,), generator=g).to(dev)
        steps = torch.arange(self.crop, device=dev)
        rows, cols = (oy[:, None] + steps)[:, :, None], (ox[:, None] + steps)[:, None, :]
        x = x[torch.arange(b, device=dev)[:, None, None], :, rows, cols].permute(0, 3, 1, 2)
        if self.jitter > 0:
            scale = 1 + (torch.rand(b, 3, generator=g) * 2 - 1) * self.jitter
            offset = (torch.rand(b, 3, generator=g) * 2 - 1) * (self.jitter / 5)
            scale[:, 2], offset[:, 2] = 1.0, 0.0
            x = hed_jitter(x, scale.to(dev), offset.to(dev))
        return x.contiguous()


def _turn(k: int, mirror: bool):
    def transform(x: torch.Tensor) -> torch.Tensor:
        return torch.rot90(x.flip(-1) if mirror else x, k, dims=(-2, -1))
    return transform


#: The symmetries of the square, rotations first: evaluation's ``views`` takes the first 1, 4 or 8.
DIHEDRAL = tuple(_turn(k, mirror) for mirror in (False, True) for k in range(4))
