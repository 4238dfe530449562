"""Pathology task: hospital image folders, slide-aware splits, stain shift, DP model, federation."""

from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from skimage.color import hed2rgb, rgb2hed

from fedcare.shared.config import RunConfig
from fedcare.shared.errors import DataError
from fedcare.shared.registry import get_task
from fedcare.shared.splits import split_indices, split_site
from fedcare.shared.tasks import _stain
from fedcare.shared.tasks.pathology import DATASETS_DIR, _pixel_sums, site_stain

PCAM = DATASETS_DIR / "pcam"
TASK = get_task("pathology")


def pcam_files(split: str, label: str, n: int) -> list[Path]:
    return sorted((PCAM / split / label).iterdir())[:n]


def hospital(root: Path, n_train: int = 12, n_test: int = 4, offset: int = 0) -> Path:
    """A hospital folder in PCam's own layout: train/<class>/, test/<class>/."""
    for split, n in (("train", n_train), ("test", n_test)):
        for label in ("0", "1"):
            dst = root / split / label
            dst.mkdir(parents=True)
            for src in pcam_files(split, label, n + offset)[offset:]:
                shutil.copy(src, dst / src.name)
    return root


def cli(*args: str):
    """The ``fedcare`` command in this process (errors come back as ``result.exception``)."""
    from typer.testing import CliRunner

    from fedcare.shared import cli as entry

    if not any(c.name == "predict" for c in entry.app.registered_commands):
        entry._attach()
    return CliRunner().invoke(entry.app, list(args))


def cfg(**kw) -> RunConfig:
    base = {"task": "pathology", "model": "resnet-tiny", **kw}
    return RunConfig(**base).resolved(TASK.defaults)


# ---- reading a hospital's data -------------------------------------------------------
def test_split_layout_keeps_the_hospitals_own_test_set(tmp_path):
    root = hospital(tmp_path / "h", n_train=6, n_test=3)
    (root / "valid" / "0").mkdir(parents=True)
    records = TASK.read_file(root, "pcam")
    assert len(records) == 18 and records.data.images.shape == (18, 96, 96, 3)
    assert records.data.images.dtype == np.uint8
    site = split_site(TASK, "h", records, 0.5, seed=3)
    assert all("/test/" in p for p in site.test.data.paths)
    assert not any("/test/" in p for p in site.train.data.paths)
    report = TASK.check_file(root, "pcam")
    assert report.ok and report.label_counts == {"normal": 9, "tumour": 9}
    assert any("valid" in n and "not used" in n for n in report.notes)


def test_slide_split_never_puts_one_slide_on_both_sides(tmp_path):
    files = pcam_files("train", "0", 20) + pcam_files("train", "1", 20)
    manifest = tmp_path / "manifest.csv"
    with manifest.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "label", "slide"])
        for i, f in enumerate(files):
            w.writerow([str(f), "tumour" if f.parent.name == "1" else "normal", f"slide-{i % 7}"])
    records = TASK.read_file(manifest, "pcam")
    assert records.groups is not None and len(set(records.groups)) == 7
    for seed in range(8):
        train, test = split_indices(records, 0.3, seed)
        assert len(train) and len(test)
        assert not set(records.groups[train]) & set(records.groups[test])
    # the builtin Kather tiles are grouped by source slide as well
    site = TASK.builtin_sites("kather", 0)[0]
    assert not set(site.train.groups) & set(site.test.groups)


def _png(path: Path, array: np.ndarray, mode: str | None = None) -> None:
    Image.fromarray(array, mode=mode).save(path) if mode else Image.fromarray(array).save(path)


def bad_hospital(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    root = hospital(tmp_path / "bad", n_train=4, n_test=2)
    good = np.asarray(Image.open(pcam_files("train", "0", 1)[0]))
    d = root / "train" / "0"
    (d / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nthis is not a png")
    data = pcam_files("train", "1", 1)[0].read_bytes()
    (d / "truncated.jpg").write_bytes(data[: len(data) // 3])
    (d / "notes.txt").write_text("not an image")
    _png(d / "gray.png", good[..., 0])
    _png(d / "rgba.png", np.dstack([good, np.full(good.shape[:2], 255, np.uint8)]))
    _png(d / "small.tif", good[:64, :64])
    expected = {"corrupt.png": "not a readable image", "truncated.jpg": "truncated",
                "notes.txt": "not an image file", "gray.png": "grayscale", "rgba.png": "RGBA",
                "small.tif": "64x64"}
    return root, expected


def test_bad_files_are_skipped_with_their_path_and_reason(tmp_path):
    root, expected = bad_hospital(tmp_path)
    records = TASK.read_file(root, "pcam")
    assert len(records) == 12
    reasons = {Path(where).name: why for where, why in records.skipped}
    assert set(reasons) == set(expected)
    for name, fragment in expected.items():
        assert fragment in reasons[name], (name, reasons[name])
    notes = "\n".join(TASK.check_file(root, "pcam").notes)
    assert all(name in notes for name in expected) and "6 file(s) will be skipped" in notes


@pytest.mark.parametrize("name", ["corrupt.png", "gray.png", "rgba.png", "small.tif", "notes.txt"])
def test_strict_refuses_each_bad_file_naming_it(tmp_path, name):
    root, expected = bad_hospital(tmp_path)
    for other in expected:
        if other != name:
            (root / "train" / "0" / other).unlink()
    with pytest.raises(DataError) as err:
        TASK.read_file(root, "pcam", strict=True)
    assert name in str(err.value)


def test_empty_class_folder_missing_manifest_file_and_unknown_class(tmp_path):
    root = tmp_path / "flat"
    (root / "normal").mkdir(parents=True)
    (root / "tumour").mkdir()
    for f in pcam_files("train", "0", 3):
        shutil.copy(f, root / "normal" / f.name)
    records = TASK.read_file(root, "pcam")
    assert records.skipped == ((str(root / "tumour"), "empty class folder"),)
    assert not TASK.check_file(root, "pcam").ok  # a class with no usable image
    with pytest.raises(DataError, match="tumour"):
        TASK.read_file(root, "pcam", strict=True)

    manifest = tmp_path / "m.csv"
    manifest.write_text("path,label\nflat/normal/%s,0\nflat/nowhere.png,1\n" % pcam_files("train", "0", 1)[0].name)
    records = TASK.read_file(manifest, "pcam")
    assert len(records) == 1
    (where, why), = records.skipped
    assert "nowhere.png" in where and "row 3" in where and why == "file not found"
    with pytest.raises(DataError, match="nowhere.png"):
        TASK.read_file(manifest, "pcam", strict=True)

    (root / "lymphoma").mkdir()
    with pytest.raises(DataError, match="lymphoma"):
        TASK.read_file(root, "pcam")
    with pytest.raises(DataError, match="no such file"):
        TASK.read_file(tmp_path / "absent", "pcam")


# ---- stain ----------------------------------------------------------------------------
def test_site_stain_shift_changes_colour_statistics_not_labels(tmp_path):
    records = TASK.read_file(hospital(tmp_path / "h", n_train=16, n_test=0), "pcam")
    shifted = [TASK.restained(records, *site_stain(i)) for i in range(3)]
    hed = _stain.to_hed(records.data.images).reshape(-1, 3).mean(0)
    for i, s in enumerate(shifted):
        np.testing.assert_array_equal(s.labels, records.labels)
        assert s.data.images.shape == records.data.images.shape and s.data.images.dtype == np.uint8
        moved = np.abs(_stain.to_hed(s.data.images).reshape(-1, 3).mean(0)[:2] - hed[:2]) / hed[:2]
        assert moved.max() > 0.05, (i, moved)  # H or E density moved by > 5 %
    a, b = (s.data.images.reshape(-1, 3).mean(0) for s in shifted[:2])
    assert np.abs(a - b).max() > 3  # two hospitals differ in mean RGB by more than 3 grey levels
    # the shift is a property of the hospital: the same every time
    np.testing.assert_array_equal(TASK.restained(records, *site_stain(1)).data.images, shifted[1].data.images)

    # federated stain normalisation brings the hospitals' colour back together
    totals: dict[str, np.ndarray] = {}
    for s in shifted:
        for k, v in _stain.stain_sums(s.data.images).items():
            totals[k] = totals.get(k, 0) + v
    target = _stain.stain_target(totals)
    before = np.ptp([_stain.to_hed(s.data.images).mean(axis=(0, 1, 2)) for s in shifted], axis=0)
    after = np.ptp([_stain.to_hed(_stain.normalise(s.data.images, target["stain_mean"], target["stain_std"]))
                    .mean(axis=(0, 1, 2)) for s in shifted], axis=0)
    assert (after[:2] < before[:2] / 2).all(), (before, after)
    # per site, not per image: a patch's haematoxylin relative to the others survives
    site = shifted[0].data.images
    normed = _stain.normalise(site, target["stain_mean"], target["stain_std"])
    h_before, h_after = (_stain.to_hed(x)[..., 0].mean(axis=(1, 2)) for x in (site, normed))
    assert np.corrcoef(h_before, h_after)[0, 1] > 0.98 and h_after.std() > 0.3 * h_before.std()


def test_torch_hed_jitter_agrees_with_scikit_image():
    img = np.asarray(Image.open(pcam_files("test", "1", 1)[0]), dtype=np.float64) / 255.0
    scale, offset = np.array([1.2, 0.8, 1.0]), np.array([0.01, -0.005, 0.0])
    expected = hed2rgb(rgb2hed(img) * scale + offset)
    x = torch.tensor(img, dtype=torch.float32).permute(2, 0, 1)[None]
    got = _stain.hed_jitter(x, torch.tensor(scale[None], dtype=torch.float32),
                            torch.tensor(offset[None], dtype=torch.float32))[0].permute(1, 2, 0).numpy()
    assert np.abs(got - expected).max() < 1e-4


# ---- model ----------------------------------------------------------------------------
def test_model_passes_opacus_validator_and_grouped_per_sample_grads_match():
    from opacus import GradSampleModule
    from opacus.validators import ModuleValidator

    from fedcare.shared.tasks._patch_model import PatchConv

    for model_name in TASK.models:
        model = TASK.build_model(cfg(model=model_name))
        assert ModuleValidator.validate(model, strict=True) == []
        assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())

    # 20x20 output: the grouped-convolution path; 1x1: the per-sample matrix product;
    # 8x8 output: Opacus' own im2col path
    for kernel, stride, padding, size in ((3, 2, 1, 40), (1, 1, 0, 12), (3, 1, 1, 8)):
        torch.manual_seed(0)
        ours = PatchConv(4, 6, kernel, stride, padding, bias=True)
        ref = torch.nn.Conv2d(4, 6, kernel, stride, padding, bias=True)
        ref.load_state_dict(ours.state_dict())
        x = torch.randn(5, 4, size, size)
        grads = []
        for layer in (ours, ref):
            gsm = GradSampleModule(layer)
            (gsm(x) ** 2).sum().backward()
            grads.append((layer.weight.grad_sample.clone(), layer.bias.grad_sample.clone()))
            gsm._close()
        torch.testing.assert_close(grads[0][0], grads[1][0], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(grads[0][1], grads[1][1], rtol=1e-4, atol=1e-4)


def test_per_sample_only_backward_keeps_per_sample_grads_and_input_grads():
    """Under DP-SGD the convolutions skip autograd's batch weight gradient; the per-sample
    gradients Opacus clips, and the gradients flowing to earlier layers, are unchanged."""
    from opacus import GradSampleModule

    from fedcare.client.training import per_sample_only

    x, y = torch.randn(6, 3, 40, 40), torch.tensor([0, 1, 1, 0, 1, 0])
    runs = []
    for on in (False, True):
        torch.manual_seed(0)
        model = TASK.build_model(cfg(model="resnet-tiny"))
        gsm = GradSampleModule(model)
        with per_sample_only(model, on):
            TASK.loss(gsm, (x, y)).backward()
        runs.append({n: (p.grad_sample.clone(), p.grad) for n, p in model.named_parameters()})
        # Opacus took the convolutions' per-sample gradients as computed, without its zeroed copy
        assert getattr(model.stem[0].weight.grad_sample, "_fedcare_owned", False)
        gsm._close()
        if on:
            assert not any(getattr(m, "per_sample_grads_only", False) for m in model.modules())  # reset
    plain, fast = runs
    convs = [n for n, _ in plain.items() if n.endswith("weight") and plain[n][0].dim() == 5]
    assert convs and all(fast[n][1] is None for n in convs)  # no batch gradient computed
    assert all(plain[n][1] is not None for n in convs)
    for n in plain:
        torch.testing.assert_close(fast[n][0], plain[n][0], rtol=1e-5, atol=1e-6)
    # the export still compiles the model (the DP-only backward is left out of TorchScript)
    model.eval()
    torch.testing.assert_close(torch.jit.script(model)(x), model(x))


def test_scattering_front_end_is_fixed_and_orientation_selective():
    from opacus import GradSampleModule

    from fedcare.shared.tasks._scatter import ORIENTATIONS, Scattering, ScatterNet

    model = ScatterNet(2)
    assert not any(k.startswith("scatter") for k in model.state_dict())  # never federated, never trained
    assert not list(model.scatter.parameters())
    assert ScatterNet(8)(torch.randn(1, 3, 142, 142)).shape == (1, 8)  # kather's crops: not divisible by 4

    scatter = Scattering()
    r = torch.arange(88, dtype=torch.float32)
    stripes = torch.sin(r * 3 * math.pi / 4)[None, :].expand(88, 88)  # varies along x only
    first = {}
    for name, image in (("x", stripes), ("y", stripes.T)):
        out = scatter(image.expand(1, 3, 88, 88).contiguous())
        assert out.shape == (1, 243, 22, 22)
        # channels 3..26 are red/green/blue x 8 orientations at scale 0; the interior only
        energy = out[0, 3:3 + ORIENTATIONS, 4:-4, 4:-4].mean(dim=(1, 2))
        first[name] = int(energy.argmax())
        assert energy.max() > 5 * energy.min()
    assert abs(first["x"] - first["y"]) == ORIENTATIONS // 2
    flat = scatter(torch.full((1, 3, 88, 88), 0.7))[0, 3:3 + ORIENTATIONS, 4:-4, 4:-4]
    assert flat.abs().max() < 1e-3  # zero-mean wavelets: no response to a flat stain

    gsm = GradSampleModule(model)
    torch.nn.functional.cross_entropy(gsm(torch.randn(3, 3, 88, 88)), torch.tensor([0, 1, 1])).backward()
    assert all(p.grad_sample.shape[0] == 3 for p in model.parameters())
    gsm._close()


def test_one_dp_step_changes_the_model_and_spends_budget(tmp_path):
    from fedcare.client import privacy, training

    records = TASK.read_file(hospital(tmp_path / "h", n_train=8, n_test=0), "pcam")
    c = cfg(batch_size=8, local_epochs=1)
    stats = TASK.local_stats(records, c)
    data = TASK.to_dataset(records, TASK.finalize_stats(stats, c), c, train=True)
    x, y = data[0]
    assert x.shape == (3, 88, 88) and x.dtype == torch.float32 and int(y) in (0, 1)
    model = TASK.build_model(c)
    before = [p.detach().clone() for p in model.parameters()]
    out = training.train(TASK, model, data, c, noise_multiplier=1.0, seed=0)
    assert out.steps == 2 and math.isfinite(out.loss)
    assert any(not torch.equal(a, b.detach()) for a, b in zip(before, model.parameters()))
    assert privacy.epsilon(out.history, 1e-5) > 0


def test_prepared_tensors_are_reused_only_under_the_same_settings(tmp_path):
    """A hospital's tensors are built once per process; a run with another seed (the
    augmentation stream), views or stain setting must not get the previous run's."""
    from fedcare.client.site import prepared_records

    records = TASK.read_file(hospital(tmp_path / "h", n_train=8, n_test=0), "pcam")
    c = cfg(batch_size=8)
    prep = TASK.finalize_stats(TASK.local_stats(records, c), c)
    first = prepared_records(TASK, records, prep, c, train=True)
    assert prepared_records(TASK, records, prep, cfg(batch_size=8), train=True) is first
    for other in (cfg(batch_size=8, seed=1), cfg(batch_size=8, aug_mult=2)):
        assert prepared_records(TASK, records, prep, other, train=True) is not first
    augmented = [prepared_records(TASK, records, prep, cfg(batch_size=8, seed=s), train=True).batch([0, 1])[0]
                 for s in (0, 1)]
    assert not torch.equal(*augmented)


# ---- a federation, then predictions -----------------------------------------------------
def test_federation_of_two_hospitals_then_predict(tmp_path):
    from fedcare.simulation.runner import plan_federation, simulate

    a = hospital(tmp_path / "north", n_train=10, n_test=4)
    b = hospital(tmp_path / "south", n_train=10, n_test=4, offset=20)
    (a / "train" / "1" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    c = RunConfig(task="pathology", model="resnet-tiny", num_rounds=1, batch_size=8, seed=1)
    federation = plan_federation(c, epsilon=8.0, delta=1e-5, data=[a, b])
    run = simulate(c, federation, out=tmp_path / "run")
    summary = json.loads((run / "summary.json").read_text())
    assert set(summary["sites"]) == {"north", "south"}
    for site in summary["sites"].values():
        assert {"accuracy", "precision", "recall", "f1", "roc_auc"} <= set(site)
        assert site["num_examples"] == 8 and 0 < site["epsilon"] <= 8.0
    rows = list(csv.DictReader((run / "skipped.csv").open()))
    assert rows == [{"site": "north", "record": str(a / "train" / "1" / "broken.jpg"),
                     "reason": "corrupt or truncated image"}]

    out = tmp_path / "preds.csv"
    result = cli("predict", "--task", "pathology", str(run), str(a / "test"), "--out", str(out))
    assert result.exit_code == 0, result.output
    preds = list(csv.DictReader(out.open()))
    assert len(preds) == 8
    for row in preds:
        assert abs(float(row["p_normal"]) + float(row["p_tumour"]) - 1) < 1e-5
        assert row["prediction"] in ("normal", "tumour")

    bad = tmp_path / "bad.png"
    bad.write_bytes(b"nope")
    result = cli("predict", str(run), str(bad), "--out", str(tmp_path / "x.csv"))
    assert isinstance(result.exception, DataError) and "bad.png" in str(result.exception)
    assert not (tmp_path / "x.csv").exists()


def test_hospital_check_cli(tmp_path):
    root, _ = bad_hospital(tmp_path)
    result = cli("hospital", "check", "--task", "pathology", "--data", str(root))
    assert result.exit_code == 0, result.output
    assert "normal 6" in result.output and "gray.png" in result.output
    result = cli("hospital", "check", "--task", "pathology", "--data", str(root), "--strict")
    assert result.exit_code == 2 and "refused with --strict" in result.output
    empty = tmp_path / "empty"
    (empty / "normal").mkdir(parents=True)
    result = cli("hospital", "check", "--task", "pathology", "--data", str(empty))
    assert isinstance(result.exception, DataError) and "no usable image" in str(result.exception)
    assert str(empty) in str(result.exception)


def test_too_small_virtual_hospitals_stop_the_run_with_a_clear_error(tmp_path):
    """24 Kather tiles over 4 hospitals leave each fewer than min-records (5) to train on:
    the sites refuse their sums and the run stops (exit 1), no run folder; a researcher
    may lower min-records for such data."""
    from fedcare.shared.errors import FederationError

    args = ["simulate", "--task", "pathology", "--dataset", "kather", "--rounds", "1", "--set",
            "model=resnet-tiny", "--quiet"]
    result = cli(*args, "--out", str(tmp_path / "refused"))
    assert isinstance(result.exception, FederationError), result.output
    assert result.exception.exit_code == 1 and "answered the preprocessing round" in str(result.exception)
    assert not any(tmp_path.iterdir())
    result = cli(*args, "--sites", "2", "--min-records", "2", "--out", str(tmp_path / "run"))
    assert result.exit_code == 0, result.output
    assert set(json.loads((tmp_path / "run" / "summary.json").read_text())["sites"]) == {"site0", "site1"}


def test_kather_is_multiclass_with_per_class_metrics():
    site = TASK.builtin_sites("kather", 0)[0]
    assert len(site.train) + len(site.test) == 24
    c = cfg(dataset="kather")
    model = TASK.build_model(c)
    prep = TASK.finalize_stats(TASK.local_stats(site.train, c), c)
    data = TASK.to_dataset(site.test, prep, c, train=False)
    batch = tuple(torch.stack(t) for t in zip(*[data[i] for i in range(len(data))]))
    with torch.no_grad():
        scores, targets = TASK.predict(model, batch)
    assert scores.shape == (len(site.test), 8)
    metrics = TASK.metrics(scores, targets)
    assert {"accuracy", "f1", "f1_tumor", "f1_adipose"} <= set(metrics)


def test_pixel_statistics_are_summed_in_chunks_exactly():
    images = np.random.default_rng(0).integers(0, 256, (37, 6, 5, 3)).astype(np.uint8)
    pixels = images.reshape(-1, 3).astype(np.float64) / 255.0
    sums = _pixel_sums(images, chunk=8)  # 37 images: four full chunks and a partial one
    assert np.allclose(sums["pixel_sum"], pixels.sum(axis=0))
    assert np.allclose(sums["pixel_sq_sum"], (pixels ** 2).sum(axis=0))
    assert sums["pixel_count"][0] == len(pixels)
    assert _pixel_sums(images[:0])["pixel_count"][0] == 0
