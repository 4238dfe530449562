"""Pathology's augmentation views: vectorised augmentation, augmentation multiplicity under
DP-SGD (one clipped gradient per record, whatever the number of views), test-time views."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fedcare.client import training
from fedcare.shared.config import RunConfig
from fedcare.shared.errors import ConfigError
from fedcare.shared.registry import get_task
from fedcare.shared.tasks._patch_model import DIHEDRAL, PatchDataset
from fedcare.shared.tasks._stain import hed_jitter
from fedcare.shared.tasks.pathology import probabilities

TASK = get_task("pathology")


def cfg(**kw) -> RunConfig:
    return RunConfig(**{"task": "pathology", "model": "resnet-tiny", **kw}).resolved(TASK.defaults)


def patches(n: int = 12, size: int = 24, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, size, size), generator=gen, dtype=torch.uint8)
    return images, torch.arange(n) % 2


def dataset(images, labels, *, train: bool, views: int = 1, seed: int = 0) -> PatchDataset:
    return PatchDataset(images, labels, torch.full((3,), 0.5), torch.full((3,), 0.25), images.shape[-1] - 4,
                        train=train, seed=seed, views=views)


def loop_augment(x: torch.Tensor, crop: int, gen: torch.Generator, jitter: float = 0.05) -> torch.Tensor:
    """The per-image reference: the same draws, in the same order, one image at a time."""
    b = x.shape[0]
    flip = torch.rand(b, generator=gen) < 0.5
    x = torch.where(flip.view(b, 1, 1, 1), x.flip(-1), x)
    turns = torch.randint(0, 4, (b,), generator=gen)
    x = torch.stack([torch.rot90(img, int(k), dims=(1, 2)) for img, k in zip(x, turns)])
    span = x.shape[-1] - crop + 1
    oy = torch.randint(0, span, (b,), generator=gen).tolist()
    ox = torch.randint(0, span, (b,), generator=gen).tolist()
    x = torch.stack([img[:, i:i + crop, j:j + crop] for img, i, j in zip(x, oy, ox)])
    scale = 1 + (torch.rand(b, 3, generator=gen) * 2 - 1) * jitter
    offset = (torch.rand(b, 3, generator=gen) * 2 - 1) * (jitter / 5)
    scale[:, 2], offset[:, 2] = 1.0, 0.0
    return hed_jitter(x, scale, offset)


def test_vectorised_augmentation_equals_the_per_image_reference():
    images, labels = patches(16)
    data = dataset(images, labels, train=True, seed=5)
    got, y = data.batch(range(16))
    expected = loop_augment(images.float() / 255.0, data.crop, torch.Generator().manual_seed(5))
    torch.testing.assert_close(got, (expected - data.mean) / data.std, rtol=0, atol=1e-5)
    assert torch.equal(y, labels)


def test_training_views_are_adjacent_independent_copies_of_each_record():
    images, labels = patches(6)
    data = dataset(images, labels, train=True, views=4)
    assert data.views_per_record == 4 and len(data) == 6
    x, y = data.batch([2, 5])
    assert x.shape == (8, 3, 20, 20)
    assert torch.equal(y, torch.tensor([0, 0, 0, 0, 1, 1, 1, 1]))
    assert not torch.allclose(x[0], x[1])  # each view its own augmentation draw
    assert dataset(images, labels, train=False, views=4).views_per_record == 1


def test_on_device_shares_the_random_stream_and_is_uploaded_once():
    images, labels = patches(8)
    a, b = dataset(images, labels, train=True, seed=3), dataset(images, labels, train=True, seed=3)
    placed = b.on_device(torch.device("cpu"))
    assert placed is b  # already there
    torch.testing.assert_close(a.batch(range(8))[0], placed.batch(range(8))[0])
    if torch.cuda.is_available():
        gpu = a.on_device(torch.device("cuda"))
        assert gpu is a.on_device(torch.device("cuda")) and gpu.images.is_cuda
        torch.testing.assert_close(gpu.batch(range(8))[0].cpu(), b.batch(range(8))[0], atol=1e-5, rtol=0)


def test_average_views_clips_one_mean_gradient_per_record():
    """Opacus then clips and sums one gradient per record: the mean of its views' gradients."""
    from opacus import GradSampleModule

    torch.manual_seed(0)
    model = torch.nn.Linear(5, 2)
    x, y = torch.randn(6, 5), torch.tensor([0, 1, 1, 0, 1, 0])
    expected = torch.zeros(2, 2, 5)
    for row in range(6):  # each view's own gradient, by plain autograd
        model.zero_grad()
        torch.nn.functional.cross_entropy(model(x[row:row + 1]), y[row:row + 1]).backward()
        expected[row // 3] += model.weight.grad / 3
    gsm = GradSampleModule(model)
    torch.nn.functional.cross_entropy(gsm(x), y).backward()
    training.average_views(gsm, 3)
    torch.testing.assert_close(model.weight.grad_sample, expected, rtol=1e-5, atol=1e-6)
    gsm._close()
    with pytest.raises(ValueError, match="groups of 4"):
        model.weight.grad_sample = torch.zeros(6, 2, 5)
        training.average_views(model, 4)


def test_views_cost_no_privacy_and_train_under_dp():
    """Same sample rate, noise and steps: the accountant's history, hence ε, is unchanged."""
    from fedcare.client import privacy

    images, labels = patches(24, size=40)
    histories = []
    for views in (1, 4):
        c = cfg(batch_size=8, aug_mult=views)
        torch.manual_seed(0)
        model = TASK.build_model(c)
        before = [p.detach().clone() for p in model.parameters()]
        data = dataset(images, labels, train=True, views=views)
        out = training.train(TASK, model, data, c, noise_multiplier=1.1, seed=0)
        assert math.isfinite(out.loss) and out.steps == 3
        assert any(not torch.equal(p0, p.detach()) for p0, p in zip(before, model.parameters()))
        histories.append(out.history)
    assert histories[0] == histories[1]
    assert privacy.epsilon(histories[0], 1e-5) == privacy.epsilon(histories[1], 1e-5)


def test_test_views_make_scores_invariant_to_turning_and_mirroring_the_patch():
    images, labels = patches(4, size=28)
    torch.manual_seed(0)
    model = TASK.build_model(cfg()).eval()
    turned = torch.rot90(images, 1, dims=(2, 3))
    mirrored = images.flip(-1)
    with torch.no_grad():
        scores = {name: probabilities(model, dataset(imgs, labels, train=False, views=8).batch(range(4))[0])
                  for name, imgs in (("plain", images), ("turned", turned), ("mirrored", mirrored))}
        one = probabilities(model, dataset(images, labels, train=False).batch(range(4))[0])
    torch.testing.assert_close(scores["turned"], scores["plain"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(scores["mirrored"], scores["plain"], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(one, scores["plain"])
    x, _ = dataset(images, labels, train=False, views=4).batch(range(4))
    assert x.shape == (4, 4, 3, 24, 24) and len(DIHEDRAL) == 8
    loss = TASK.loss(model, (x, labels))  # the averaged probabilities' negative log-likelihood
    expected = -torch.log(probabilities(model, x)[torch.arange(4), labels]).mean()
    torch.testing.assert_close(loss, expected)


def test_views_are_run_config_for_tasks_that_augment_only():
    c = cfg()
    assert (c.aug_mult, c.test_views) == (1, 1)
    with pytest.raises(ConfigError, match="test-views"):
        RunConfig.from_mapping({"test-views": 3})
    with pytest.raises(ConfigError, match="aug-mult.*does not augment"):
        RunConfig(task="diagnosis", aug_mult=4).resolved(get_task("diagnosis").defaults)
    assert RunConfig(task="diagnosis").resolved(get_task("diagnosis").defaults).aug_mult == 1
    assert np.isfinite(RunConfig.from_mapping({"aug-mult": 8, "test-views": 8}).aug_mult)
