"""Pathology targets of issue 5: PCam accuracy with and without DP, DP-SGD step cost.

Four hospitals with their own stain shift, federated with the real ServerApp and
ClientApp in one process. By default they are the builtin ``pcam`` dataset (the shipped
subset, 4,800 train / 1,200 test patches); with ``--data-root`` a PCam folder (the
issue's full subset, ``../shared/data/pathology/pcam_subset``: 19,171 train / 2,947 test
patches once byte-identical copies are dropped; ``valid/`` unused) is dealt into the
same four hospitals the same way (``Pathology.pcam_hospitals``: the subset's own
train/test split, an even label-stratified deal, each hospital's fixed stain), written
as four hospital folders and read through ``--data`` as real hospitals are:

* ``pcam_acc_nodp=``, ``pcam_auc_nodp=``: without DP (ε = ∞);
* ``pcam_acc_dp8=``, ``pcam_auc_dp8=``: DP-SGD at ε = 8 per hospital (δ = 1e-5);
  accuracy and ROC-AUC are the global ones over the four hospitals' test patches (the
  subset's test set), from ``rounds.csv``'s last round.
* ``dp_step_ratio_pathology=``: DP-SGD step time ÷ plain step time of the default model
  on one fixed batch (forward, backward, optimiser step; Opacus per-sample gradients,
  clipping and noise in the DP one), interleaved and the best of several repeats each,
  so both see the same machine load; ``pathology_img_per_s_{nodp,dp}=`` from the same
  timings, and ``dp_round_ratio_pathology=`` for a whole local round through fedcare's
  training loop (Poisson sampling, augmentation included).

    OMP_NUM_THREADS=2 python bench/pathology.py [--rounds 10] [--skip-accuracy]
        [--data-root ../shared/data/pathology/pcam_subset [--hospitals DIR]]
"""

from __future__ import annotations

import sys
from pathlib import Path

import argparse
import csv
import math
import tempfile
import time
import warnings

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script or with -m
from bench.runs import add_set_option, set_overrides, simulated
from fedcare.client import training
from fedcare.client.memory import keep_freed_memory
from fedcare.shared.config import RunConfig
from fedcare.shared.registry import get_task

warnings.filterwarnings("ignore")


def federated(epsilon: float, rounds: int, seed: int, overrides: dict,
              hospitals: list[Path] | None = None) -> dict[str, float]:
    cfg = RunConfig.from_mapping({"task": "pathology", "num-rounds": rounds, "seed": seed, **overrides})
    with simulated(cfg, epsilon, data=hospitals or ()) as out:
        last = list(csv.DictReader((out / "rounds.csv").open()))[-1]
    return {k: float(v) for k, v in last.items() if v not in ("", None) and _is_float(v)}


def _is_float(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def write_hospitals(root: Path, out: Path, seed: int) -> tuple[list[Path], dict[str, int]]:
    """The full PCam subset folder dealt into the four stain-shifted builtin hospitals
    (``Pathology.pcam_hospitals``), each written as a hospital's own folder of lossless
    PNGs (train/<class>/, test/<class>/), so the federation reads them as hospitals do.
    Reused when ``out`` already holds them. Also returns the PNGs per split."""
    task = get_task("pathology")
    folders = [out / f"hospital{i + 1}" for i in range(4)]
    if not (out / "done").exists():
        records = task.read_file(root, "pcam", strict=True)
        for site, folder in zip(task.pcam_hospitals(records, seed, shifted=True), folders):
            for split, part in (("train", site.train), ("test", site.test)):
                for image, label, path in zip(part.data.images, part.labels, part.data.paths):
                    target = folder / split / str(int(label)) / (Path(path).stem + ".png")
                    target.parent.mkdir(parents=True, exist_ok=True)
                    Image.fromarray(image).save(target)
        (out / "done").write_text(f"{root} seed {seed}\n")
    # counted on disk: a patch whose name repeats is one file
    return folders, {split: sum(len(list((h / split).rglob("*.png"))) for h in folders)
                     for split in ("train", "test")}


def bench_config(overrides: dict) -> RunConfig:
    task = get_task("pathology")
    return RunConfig.from_mapping({"task": "pathology", **overrides}).resolved(task.defaults)


def step_times(batch_size: int, repeats: int, overrides: dict) -> tuple[float, float]:
    """Best (plain, DP) seconds per optimiser step of the default model (or the one
    ``--set model=...`` names) on one batch."""
    from opacus.grad_sample import GradSampleModule
    from opacus.optimizers import DPOptimizer

    task = get_task("pathology")
    cfg = bench_config(overrides)
    keep_freed_memory()  # as training.train does
    x = torch.randn(batch_size, 3, 88, 88)
    y = torch.randint(0, 2, (batch_size,))

    def build(dp: bool):
        torch.manual_seed(0)
        model = task.build_model(cfg)
        opt = training.make_optimizer(model, cfg)
        if dp:
            model = GradSampleModule(model)
            opt = DPOptimizer(opt, noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=batch_size)
        return model, opt

    def step(model, opt) -> float:
        start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with training.per_sample_only(model, isinstance(opt, DPOptimizer)):  # as the training loop does
            task.loss(model, (x, y)).backward()
        opt.step()
        return time.perf_counter() - start

    plain, dp = build(False), build(True)
    step(*plain), step(*dp)  # warm-up
    t_plain, t_dp = math.inf, math.inf
    for _ in range(repeats):
        t_plain = min(t_plain, step(*plain))
        t_dp = min(t_dp, step(*dp))
    return t_plain, t_dp


def round_times(n_images: int, overrides: dict) -> tuple[float, float]:
    """Seconds for one local round of ``n_images`` patches, plain and DP, same data."""
    task = get_task("pathology")
    cfg = bench_config(overrides)
    site = task.builtin_sites("pcam-noshift", 0)[0]
    records = task.take(site.train, range(n_images))
    prep = task.finalize_stats(task.local_stats(records, cfg), cfg)
    data = task.to_dataset(records, prep, cfg, train=True)
    times = {}
    for name, sigma in (("plain", None), ("dp", 1.0), ("plain2", None), ("dp2", 1.0)):
        torch.manual_seed(0)
        model = task.build_model(cfg)
        start = time.perf_counter()
        training.train(task, model, data, cfg, noise_multiplier=sigma, seed=0)
        times[name] = time.perf_counter() - start
    return min(times["plain"], times["plain2"]), min(times["dp"], times["dp2"])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=8)
    parser.add_argument("--skip-accuracy", action="store_true")
    parser.add_argument("--skip-timing", action="store_true")
    parser.add_argument("--only", choices=("nodp", "dp8"), help="run one of the two federations")
    add_set_option(parser)
    parser.add_argument("--data-root", type=Path, help="a PCam folder (train/, test/) dealt into the four "
                        "stain-shifted hospitals instead of the shipped subset")
    parser.add_argument("--hospitals", type=Path, help="where those hospitals' folders are written (reused)")
    args = parser.parse_args()
    overrides = set_overrides(args)

    print(f"torch_threads={torch.get_num_threads()}", flush=True)
    if not args.skip_timing:
        t_plain, t_dp = step_times(args.batch_size, args.repeats, overrides)
        print(f"pathology_step_s_nodp={t_plain:.4f}")
        print(f"pathology_step_s_dp={t_dp:.4f}")
        print(f"pathology_img_per_s_nodp={args.batch_size / t_plain:.1f}")
        print(f"pathology_img_per_s_dp={args.batch_size / t_dp:.1f}")
        print(f"dp_step_ratio_pathology={t_dp / t_plain:.3f}", flush=True)
        r_plain, r_dp = round_times(640, overrides)
        print(f"dp_round_ratio_pathology={r_dp / r_plain:.3f}", flush=True)

    if not args.skip_accuracy:
        hospitals = None
        if args.data_root:
            work = args.hospitals or Path(tempfile.mkdtemp(prefix="pcam-hospitals-"))
            hospitals, patches = write_hospitals(args.data_root, work, args.seed)
            print(f"pcam_train_patches={patches['train']}")
            print(f"pcam_test_patches={patches['test']}", flush=True)
        for tag, eps in (("nodp", math.inf), ("dp8", 8.0)):
            if args.only and tag != args.only:
                continue
            start = time.perf_counter()
            res = federated(eps, args.rounds, args.seed, overrides, hospitals)
            print(f"pcam_acc_{tag}={res.get('accuracy', math.nan):.4f}")
            print(f"pcam_auc_{tag}={res.get('roc_auc', math.nan):.4f}")
            print(f"pcam_rounds_{tag}={args.rounds}")
            print(f"pcam_wall_s_{tag}={time.perf_counter() - start:.0f}", flush=True)


if __name__ == "__main__":
    main()
