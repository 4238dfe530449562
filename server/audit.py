"""Privacy audit of a finished run: a membership-inference attack on its global model.

The attack is the loss-threshold attack (Yeom et al. 2018): a record the model was
trained on tends to have a lower loss than one it never saw, so ``-loss`` is the
attacker's membership score. For each site it scores the site's training records
(members) and held-out test records (non-members) with the final global model and
reports the attack's ROC-AUC (0.5 = the attacker learns nothing) and its advantage
(max TPR - FPR over thresholds), next to the ε the site spent.

A second, stronger score calibrates each record's difficulty (Watson et al. 2022): a
reference model of the same kind is trained, without DP, on the *other* sites' training
records only (neither the site's members nor its non-members), and the score is the
reference loss minus the global model's loss, so a record that is simply easy no longer
looks like a member. It needs a task that can pool records (``Task.concat``).

DP bounds what any such attack can do against one record: under (ε, δ)-DP every
membership test has TPR <= e^ε * FPR + δ (Kairouz et al. 2015). The measured AUC is an
empirical lower bound on leakage, not a proof of privacy; an AUC well above 0.5 at a
small ε would point to a bug. Members and non-members come from the same site with the
run's own split (rebuilt from ``config.json``), so base rates are those of the site.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from sklearn.metrics import roc_auc_score, roc_curve
from torch.utils.data import DataLoader

from ..client.site import builtin_partition, load_site
from ..shared.config import SiteConfig
from ..shared.errors import ConfigError
from . import results
from .inference_cli import load_run


def per_example_loss(task, model: torch.nn.Module, dataset) -> np.ndarray:
    model.eval()
    out = []
    with torch.no_grad():
        for batch in DataLoader(dataset, batch_size=1):
            out.append(float(task.loss(model, batch)))
    return np.asarray(out, dtype=np.float64)


def attack(member_loss: np.ndarray, nonmember_loss: np.ndarray) -> dict[str, float]:
    """ROC-AUC and advantage of the loss-threshold attack."""
    if len(member_loss) == 0 or len(nonmember_loss) == 0:
        return {"mia_auc": math.nan, "mia_advantage": math.nan}
    labels = np.r_[np.ones(len(member_loss)), np.zeros(len(nonmember_loss))]
    scores = -np.r_[member_loss, nonmember_loss]
    fpr, tpr, _ = roc_curve(labels, scores)
    return {"mia_auc": float(roc_auc_score(labels, scores)), "mia_advantage": float(np.max(tpr - fpr))}


def reference_model(task, cfg, prep, sites, exclude: str) -> torch.nn.Module | None:
    """A model trained like the run's (same rounds × local epochs and learning-rate
    schedule), without DP, on the other sites."""
    from ..client import training

    others = [s.train for s in sites if s.name != exclude]
    if not others:
        return None
    try:
        pooled = task.concat(others)
    except NotImplementedError:
        return None
    data = task.to_dataset(pooled, prep, cfg, train=True)
    torch.manual_seed(cfg.seed + 1)
    model = task.build_model(cfg)
    for rnd in range(cfg.num_rounds):
        training.train(task, model, data, cfg, noise_multiplier=None, seed=cfg.seed * 7_919 + rnd,
                       lr=training.round_lr(cfg, rnd + 1))
    return model.eval()


def _sites(task, cfg, data: Sequence[Path]):
    if data:
        return [load_site(task, cfg, SiteConfig(data=str(p))) for p in data]
    if cfg.dataset not in task.datasets:
        raise ConfigError(f"unknown builtin dataset {cfg.dataset!r}")
    return list(builtin_partition(task.name, cfg.dataset, cfg.partition, cfg.num_sites, cfg.dirichlet_alpha,
                                  cfg.seed))


def audit(run_dir: Path, data: Sequence[Path] = ()) -> dict[str, Any]:
    """Attack every site; write ``audit.json`` and merge ``mia_auc`` into ``summary.json``."""
    run_dir = Path(run_dir)
    task, cfg, model, prep = load_run(run_dir)
    summary_path = run_dir / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    per_site = summary.get("sites", {})
    report: dict[str, Any] = {}
    sites = _sites(task, cfg, data)
    for site in sites:
        members = task.to_dataset(site.train, prep, cfg, train=False)
        others = task.to_dataset(site.test, prep, cfg, train=False)
        loss_in, loss_out = per_example_loss(task, model, members), per_example_loss(task, model, others)
        result = attack(loss_in, loss_out)
        ref = reference_model(task, cfg, prep, sites, site.name)
        if ref is not None:
            calibrated = attack(loss_in - per_example_loss(task, ref, members),
                                loss_out - per_example_loss(task, ref, others))
            result.update({f"{k}_calibrated": v for k, v in calibrated.items()})
        known = per_site.get(site.name, {})
        report[site.name] = {"epsilon": known.get("epsilon"), "delta": known.get("delta"),
                             "members": len(members), "non_members": len(others), **result}
    payload = {"attack": "loss-threshold membership inference, plain and difficulty-calibrated against a "
                         "reference model trained on the other sites (members: site train records; "
                         "non-members: site test records)",
               "sites": report,
               "mean_mia_auc": float(np.nanmean([r["mia_auc"] for r in report.values()])) if report else None,
               "mean_mia_auc_calibrated": float(np.nanmean([r.get("mia_auc_calibrated", math.nan)
                                                           for r in report.values()])) if report else None}
    results.write_json(run_dir / "audit.json", payload)
    if per_site:
        for name, r in report.items():
            if name in per_site:
                per_site[name]["mia_auc"] = r["mia_auc"]
                if "mia_auc_calibrated" in r:
                    per_site[name]["mia_auc_calibrated"] = r["mia_auc_calibrated"]
        summary["mean_mia_auc"] = payload["mean_mia_auc"]
        summary["mean_mia_auc_calibrated"] = payload["mean_mia_auc_calibrated"]
        results.write_json(summary_path, summary)  # tmp file + os.replace: atomic
    if (run_dir / "report.html").exists():
        from . import report as run_report

        run_report.write_report(run_dir)  # the report shows the attack AUC beside ε
    return payload
