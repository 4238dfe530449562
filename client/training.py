"""The local training and evaluation loop every task shares.

With a finite budget the loop is Opacus DP-SGD: Poisson sampling (sample rate
batch_size / n), per-sample clipping, Gaussian noise from a generator seeded by the
operating system's CSPRNG (unless the run asks for reproducible noise), and every step
recorded in the accountant history that ``client.privacy`` composes. Without a budget
(ε = inf) it is plain mini-batch training, for comparison.

FedProx' proximal term is applied as a decoupled step after each optimiser step
(w <- w - lr * mu * (w - w_global)). It depends on no record, so it is post-processing
of the private gradient and costs no privacy; added to the loss it would be silently
dropped by Opacus, which privatises per-sample gradients only.
"""

from __future__ import annotations

import functools
import math
import os
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..shared.compute import device
from ..shared.config import RunConfig
from ..shared.tasks.base import PER_SAMPLE_ONLY, Task
from .memory import keep_freed_memory

# Opacus warns that its "secure RNG" (torchcsprng) is off; fedcare instead seeds the
# noise generator from the OS CSPRNG (``noise_generator``), so the warning misleads.
warnings.filterwarnings("ignore", message="Secure RNG turned off")
# Opacus' hooks on a first layer whose input needs no grad: expected, harmless.
warnings.filterwarnings("ignore", message="Full backward hook is firing")


def noise_generator(reproducible: bool, seed: int, dev: torch.device) -> torch.Generator:
    """DP noise source: OS CSPRNG seed unless reproducibility is asked for explicitly."""
    gen = torch.Generator(device=dev)
    gen.manual_seed(seed if reproducible else int.from_bytes(os.urandom(8), "little") >> 1)
    return gen


def steps_per_round(n: int, cfg: RunConfig) -> tuple[float, int]:
    """(sample rate, local steps) of one round for a site with ``n`` training records.

    The rate is Opacus' own for a Poisson loader built from a batch-size loader
    (1 / number of batches), so calibration and accounting use the same q.
    """
    batches = max(1, math.ceil(n / cfg.batch_size))
    return 1.0 / batches, max(1, int(math.ceil(cfg.local_epochs * batches)))


@dataclass
class TrainOutcome:
    loss: float
    steps: int
    history: list[tuple[float, float, int]]


#: Learning-rate multiplier for a site's local parameters (``Task.local_prefixes``). They
#: see only this site's few local steps per round, never an average over sites, and
#: their per-sample gradients are a small share of the clipped norm, so at the shared
#: rate a small hospital's intercept would barely move within a run.
LOCAL_LR_SCALE = 3.0


def round_lr(cfg: RunConfig, round_: int) -> float:
    """The learning rate of federated round ``round_`` (1-based) under ``cfg.lr_schedule``."""
    if cfg.lr_schedule == "cosine":
        done = min(max(round_ - 1, 0), cfg.num_rounds) / max(cfg.num_rounds, 1)
        return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * done))
    return cfg.lr


def make_optimizer(model: nn.Module, cfg: RunConfig, local_prefixes: tuple[str, ...] = (),
                   lr: float | None = None) -> torch.optim.Optimizer:
    lr = cfg.lr if lr is None else lr
    shared, local = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (local if local_prefixes and name.startswith(local_prefixes) else shared).append(p)
    groups = [{"params": shared}]
    if local:
        groups.append({"params": local, "lr": lr * LOCAL_LR_SCALE, "weight_decay": 0.0})
    if cfg.optimizer == "adam":
        return torch.optim.Adam(groups, lr=lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(groups, lr=lr, momentum=0.9, weight_decay=cfg.weight_decay)


def _model_stays_home(fn):
    """Run ``fn(task, model, ...)`` on the compute device, then put the model back where the
    caller had it (the CPU, as a rule): callers read weights and feed CPU tensors, and
    must never be handed a CUDA model they did not ask for."""

    @functools.wraps(fn)
    def wrapped(task: Task, model: nn.Module, *args, **kwargs):
        home = next(model.parameters()).device
        try:
            return fn(task, model, *args, **kwargs)
        finally:
            model.to(home)

    return wrapped


@_model_stays_home
def train(task: Task, model: nn.Module, data: Dataset, cfg: RunConfig, *, noise_multiplier: float | None,
          seed: int, proximal_mu: float = 0.0, lr: float | None = None) -> TrainOutcome:
    """One round of local training; ``noise_multiplier=None`` trains without DP; ``lr``
    (default ``cfg.lr``) is this round's rate (``round_lr``)."""
    dev = device()
    keep_freed_memory()
    model.to(dev).train()
    data = _placed(data, dev)
    views = getattr(data, "views_per_record", 1)
    if views > 1 and noise_multiplier is not None and task.ghost_clipping:
        raise ValueError("augmentation multiplicity needs per-sample gradients (hooks mode), not ghost clipping")
    n = len(data)
    q, steps = steps_per_round(n, cfg)
    sampler_gen = torch.Generator().manual_seed(seed)
    global_params = [p.detach().clone() for p in model.parameters()] if proximal_mu > 0 else None
    optimizer = make_optimizer(model, cfg, task.local_prefixes, lr)
    proximal_scale = optimizer.param_groups[0]["lr"] * proximal_mu  # this round's rate, as the optimiser has it

    if noise_multiplier is None:
        loader = DataLoader(data, batch_size=cfg.batch_size, shuffle=True, generator=sampler_gen,
                            drop_last=False)
        history: list[tuple[float, float, int]] = []
        batches = _cycle(loader, steps)
        run_model = model
    else:
        from opacus import PrivacyEngine

        engine = PrivacyEngine(accountant="rdp")
        loader = DataLoader(data, batch_size=cfg.batch_size, generator=sampler_gen)
        ghost = {"grad_sample_mode": "ghost", "criterion": _MeanLoss()} if task.ghost_clipping else {}
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*[Ss]ecure.*")
            run_model, optimizer, *_, loader = engine.make_private(
                module=model, optimizer=optimizer, data_loader=loader,
                noise_multiplier=noise_multiplier, max_grad_norm=cfg.max_grad_norm,
                poisson_sampling=True,
                noise_generator=noise_generator(cfg.reproducible_noise, seed + 1, dev),
                **ghost,
            )
        batches = _cycle(loader, steps)
        history = engine.accountant.history  # filled as the optimiser steps

    total, count = 0.0, 0
    with per_sample_only(model, noise_multiplier is not None and not task.ghost_clipping):
        for batch in batches:
            batch = [t.to(dev) for t in batch]
            optimizer.zero_grad(set_to_none=True)
            if len(batch[0]) == 0:
                # An empty Poisson batch still costs a step: Opacus adds noise to zero grads.
                if noise_multiplier is not None:
                    _zero_grads(run_model, ghost=task.ghost_clipping)
                    optimizer.step()
                continue
            if noise_multiplier is not None and task.ghost_clipping:
                loss = _ghost_loss(run_model, optimizer, task.loss_per_sample(run_model, batch))
            else:
                loss = task.loss(run_model, batch)
            loss.backward()
            if views > 1 and noise_multiplier is not None:
                average_views(run_model, views)
            optimizer.step()
            if global_params is not None:
                _proximal_step(model, global_params, proximal_scale)
            total += float(loss.detach()) * len(batch[0])
            count += len(batch[0])

    if noise_multiplier is not None:
        run_model._close() if hasattr(run_model, "_close") else None
        history = list(history)
    return TrainOutcome(loss=total / max(count, 1), steps=steps, history=history)


def _placed(data: Dataset, dev: torch.device) -> Dataset:
    """``data`` held on the compute device when it can be (``on_device``), so that its
    batches are gathered and augmented there rather than on the CPU."""
    place = getattr(data, "on_device", None)
    return place(dev) if place is not None else data


def average_views(model: nn.Module, views: int) -> None:
    """Replace each per-sample gradient by the mean over its record's ``views`` adjacent
    augmented copies, before Opacus clips them.

    One record then contributes one gradient, clipped to the bound as before, so the
    sensitivity, the sample rate and hence ε are those of one view per record (De et al.
    2022, "augmentation multiplicity"); the averaged gradient varies less, so the same
    noise drowns less of it.
    """
    for p in model.parameters():
        grad = getattr(p, "grad_sample", None)
        if grad is None:
            continue
        if isinstance(grad, list):
            grad = torch.cat(grad, dim=0)
        if grad.shape[0] % views:
            raise ValueError(f"{grad.shape[0]} per-sample gradients are not whole groups of {views} views")
        p.grad_sample = grad.view(grad.shape[0] // views, views, *grad.shape[1:]).mean(dim=1)


@contextmanager
def per_sample_only(model: nn.Module, on: bool) -> Iterator[None]:
    """While Opacus computes per-sample gradients (hooks mode), let modules that can
    (``PER_SAMPLE_ONLY``) skip their weights' batch gradient, which DP-SGD overwrites."""
    modules = [m for m in model.modules() if hasattr(m, PER_SAMPLE_ONLY)] if on else []
    for m in modules:
        setattr(m, PER_SAMPLE_ONLY, True)
    try:
        yield
    finally:
        for m in modules:
            setattr(m, PER_SAMPLE_ONLY, False)


@_model_stays_home
def evaluate(task: Task, model: nn.Module, data: Dataset, batch_size: int = 256) -> tuple[dict[str, float], float]:
    """Task metrics and mean loss on ``data``."""
    dev = device()
    model.to(dev).eval()
    data = _placed(data, dev)
    scores, targets = [], []
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in DataLoader(data, batch_size=batch_size):
            batch = [t.to(dev) for t in batch]
            total += float(task.loss(model, batch)) * len(batch[0])
            count += len(batch[0])
            s, t = task.predict(model, batch)
            scores.append(s)
            targets.append(t)
    if not scores:
        return {}, math.nan
    return task.metrics(np.concatenate(scores), np.concatenate(targets)), total / max(count, 1)


def _cycle(loader, steps: int):
    """Yield exactly ``steps`` batches, restarting the loader as needed."""
    done = 0
    while done < steps:
        empty = True
        for batch in loader:
            empty = False
            yield batch
            done += 1
            if done >= steps:
                return
        if empty:
            return


class _MeanLoss(nn.Module):
    """Stand-in criterion for Opacus' ghost mode, which insists on one; the loop builds
    the two-pass loss from ``Task.loss_per_sample`` itself (``_ghost_loss``)."""

    reduction = "mean"


def _ghost_loss(model, optimizer, per_sample: torch.Tensor):
    """A loss whose ``backward`` runs ghost clipping's two passes: per-sample norms, then
    the sum of clipped per-sample gradients (what the hooks mode sums after clipping)."""
    from opacus.utils.fast_gradient_clipping_utils import DPTensorFastGradientClipping

    return DPTensorFastGradientClipping(model, optimizer, per_sample, loss_reduction="mean")


def _zero_grads(model: nn.Module, ghost: bool = False) -> None:
    for p in model.parameters():
        if p.requires_grad:
            if ghost:  # the ghost optimiser noises p.grad, the summed clipped gradient
                p.grad = torch.zeros_like(p)
            else:
                p.grad_sample = torch.zeros((0,) + tuple(p.shape), device=p.device)


def _proximal_step(model: nn.Module, global_params: list[torch.Tensor], scale: float) -> None:
    with torch.no_grad():
        for p, g in zip(model.parameters(), global_params):
            p.sub_(scale * (p - g))
