"""Treatment recommendation: which treatment is most likely to work for this patient.

Datasets:

* ``actg175`` (default): the ACTG 175 randomised HIV trial, four regimens, baseline
  covariates only (``_actg``). Outcome: an event (CD4 decline >= 50 %, AIDS or death)
  during follow-up; lower is better. One pooled trial, dealt into hospitals IID or by
  Dirichlet on ``strat`` (antiretroviral history), train/test within each hospital.
* ``longitudinal``: treatment histories (patient, treatment, response[, time]) where a
  patient tried several of 15 regimens (``_cohort``): a seeded generator with known
  latent factors as the builtin, four natural hospitals; a hospital's own CSV in the same
  schema. Outcome: response in [0, 1]; higher is better. The latest half of each history
  is held out and ranked.

Models (run-config ``model``), all scoring one (patient, treatment) pair as a logit:

* ``content``: patient covariates (an MLP) and treatment components (multi-hot) meet
  in a dot product, plus a patient risk term and a treatment bias. On ACTG the covariate
  tower is linear: the risk term uses the trial's known predictors (``ACTG_RISK``, CD4,
  CD8 and prior therapy on a log scale), the patient vector only the declared effect
  modifier (antiretroviral history, ``strat``), so a regimen's effect may differ only by
  history, and starts out not differing at all. ~400 patients per hospital at ε = 3
  cannot pay for a hidden layer, 17 x 4 free interactions or weights on covariates that
  carry little signal (measured: README).
* ``collaborative``: a patient embedding and a treatment embedding (with bias). The
  patient embeddings (``patients.*``) are local: they stay in the hospital's
  ``Context.state`` between rounds and never leave it (``Task.local_prefixes``). Only
  the treatment side is federated. A patient's embedding is used only for patients with
  a treatment history (``longitudinal``); on ACTG each patient has one randomised
  treatment, so new (test) patients have none and the collaborative part reduces to
  the treatment side.
* ``hybrid`` (default): both; patient vector = covariate tower + embedding, treatment
  vector = component tower + embedding.

All parameters, local ones included, are trained by the same DP-SGD step (the local
embeddings are therefore post-processing of the private gradients too). The unit of
privacy is a record: one patient on ACTG, one (patient, treatment) response on
``longitudinal``.

Evaluation: outcome prediction (ROC-AUC, accuracy, precision, recall, F1 of the
received treatment's predicted outcome, responses thresholded at 0.5), ranking of
held-out responses (NDCG@k, hit rate@k) and, on randomised data, the inverse-probability
weighted value of recommending the best predicted treatment to everyone (``_policy``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import TensorDataset

from .. import tabular
from ..errors import ConfigError, DataError
from ..metrics import binary_metrics
from ..registry import register
from ..splits import split_site
from . import _actg, _cohort, _policy
from .base import CheckReport, Records, Site, Task, row_digests

EMBEDDING_DIM = 8
HIDDEN = 32
#: ACTG towers: ~400 patients per hospital at ε = 3 carry too little signal for a hidden
#: layer (DP noise grows with the parameter count); see the README for the measurements.
ACTG_HIDDEN = 0
#: Effect modifiers of the ACTG content tower: antiretroviral history, the trial's
#: stratification factor and its pre-specified subgroup (Hammer et al. 1996).
ACTG_MODIFIERS = ("strat",)
#: Covariates of the ACTG risk term: the trial's known predictors of the event (baseline
#: CD4 and CD8, prior therapy, symptoms, Karnofsky score, age); every extra weight is
#: DP noise on every prediction. Counts and days enter on a log scale (``_actg.SCHEMA``).
ACTG_RISK = ("age", "karnof", "symptom", "str2", "z30", "preanti", "cd40", "cd80")
LOCAL_PREFIX = "patients."
#: Predicted gain over the arm best on average needed to recommend another
#: (``_policy.margin_policy``); 0 = plain argmax. 0.02 moved the DP ε = 3 policy value
#: by +0.008 on seeds 10-19 and -0.004 on seeds 20-29 (same trained models): no evidence.
POLICY_MARGIN = 0.0


@dataclass(frozen=True)
class Spec:
    """What differs between the datasets: features, treatments and outcome direction."""

    name: str
    schema: tabular.Schema
    treatments: tuple[str, ...]
    components: np.ndarray
    #: +1 when a higher outcome is better (response), -1 when lower is (event).
    better: int
    outcome: str
    #: Patient embedding slots per hospital (a shape fixed by the dataset, not by a site).
    slots: int
    #: Whether patients have histories, so that their own embedding means something.
    histories: bool
    #: Hidden width of the covariate tower; 0 = linear (see ``Recommender``).
    hidden: int = HIDDEN
    #: Covariates that may modify a treatment's effect (the content tower's patient vector
    #: sees only these; its risk term sees ``risk``). Empty = all. Linear tower only.
    modifiers: tuple[str, ...] = ()
    #: Covariates of the risk term (empty = all). Linear tower only.
    risk: tuple[str, ...] = ()

    def _index(self, chosen: tuple[str, ...]) -> Optional[list[int]]:
        if not chosen:
            return None
        names = self.schema.encoded_names()
        return [i for i, n in enumerate(names) if n.split("=", 1)[0] in chosen]

    def modifier_index(self) -> Optional[list[int]]:
        """Encoded-column indices of ``modifiers`` (None = every column)."""
        return self._index(self.modifiers)

    def risk_index(self) -> Optional[list[int]]:
        return self._index(self.risk)


SPECS = {
    # ACTG patients have no history (one randomised treatment each): one placeholder slot.
    "actg175": Spec("actg175", _actg.SCHEMA, _actg.ARMS, _actg.component_matrix(), -1, "event", 1, False,
                    hidden=ACTG_HIDDEN, modifiers=ACTG_MODIFIERS, risk=ACTG_RISK),
    "longitudinal": Spec(
        "longitudinal",
        tabular.Schema(name="longitudinal", columns=tuple(tabular.Column(c) for c in _cohort.COVARIATES),
                       label="response", label_values=()),
        _cohort.TREATMENTS, _cohort.component_matrix(), +1, "response", 2048, True),
}


def spec_for(dataset: str) -> Spec:
    try:
        spec = SPECS[dataset]
    except KeyError:
        raise ConfigError(f"recommendation: unknown dataset '{dataset}' ({', '.join(SPECS)})") from None
    if dataset == "actg175":
        _actg.assert_baseline(spec.schema.feature_names)
    return spec


@dataclass(frozen=True)
class Cases:
    """One row per (patient, treatment received, outcome), aligned arrays."""

    x: np.ndarray  # float64 [n, features], NaN = missing
    patient: np.ndarray  # object: the hospital's patient identifier
    slot: np.ndarray  # int64: the patient's embedding row at this hospital
    treatment: np.ndarray  # int64
    outcome: np.ndarray  # float64
    propensity: np.ndarray  # float64: known assignment probability (0 when not randomised)
    time: np.ndarray  # float64

    def take(self, index: np.ndarray) -> "Cases":
        return Cases(*(getattr(self, f)[index] for f in self.__dataclass_fields__))

    @staticmethod
    def concat(parts: Sequence["Cases"]) -> "Cases":
        return Cases(*(np.concatenate([getattr(p, f) for p in parts]) for f in Cases.__dataclass_fields__))


def _slots(patient: np.ndarray, spec: Spec, source: str) -> np.ndarray:
    if not spec.histories:
        return np.zeros(len(patient), dtype=np.int64)
    uniq, inverse = np.unique(patient.astype(str), return_inverse=True)
    if len(uniq) > spec.slots:
        raise DataError(f"{len(uniq)} patients: a hospital may hold at most {spec.slots} for dataset "
                        f"'{spec.name}'", path=source)
    return inverse.astype(np.int64)


def _actg_records(frame: pd.DataFrame, source: str) -> tuple[Records, dict[str, int]]:
    ids, x, arm, event, cleaning = _actg.parse(frame, source)
    spec = SPECS["actg175"]
    if len(set(ids)) != len(ids):
        dup = int(np.flatnonzero(pd.Series(ids).duplicated().to_numpy())[0])
        raise DataError("patient appears twice (one randomised treatment per patient)", path=source,
                        row=dup + 2, column=_actg.ID_COLUMN)
    cases = Cases(x=x, patient=ids, slot=_slots(ids, spec, source), treatment=arm, outcome=event,
                  propensity=_actg.PROPENSITY[arm], time=np.zeros(len(ids)))
    strat = x[:, spec.schema.feature_names.index("strat")]
    return Records(data=cases, labels=np.nan_to_num(strat).astype(np.int64), source=source), cleaning


def _history_records(history: _cohort.History, source: str) -> Records:
    spec = SPECS["longitudinal"]
    cases = Cases(x=history.x, patient=history.patient, slot=_slots(history.patient, spec, source),
                  treatment=history.treatment, outcome=history.response,
                  propensity=np.zeros(len(history.response)), time=history.time)
    return Records(data=cases, labels=(history.response >= 0.5).astype(np.int64),
                   groups=None, source=source, test_mask=_cohort.holdout_mask(history.patient, history.time))


class Recommender(nn.Module):
    """Scores (patient, treatment) pairs as a logit; see the module docstring for kinds."""

    # Constants, so that TorchScript compiles only the branches this kind has.
    __constants__ = ["content", "collaborative"]

    def __init__(self, kind: str, in_dim: int, components: np.ndarray, slots: int, *,
                 dim: int = EMBEDDING_DIM, hidden: int = HIDDEN, dropout: float = 0.0,
                 modifiers: Optional[Sequence[int]] = None, risk: Optional[Sequence[int]] = None) -> None:
        super().__init__()
        self.kind = kind
        self.content = kind in ("content", "hybrid")
        self.collaborative = kind in ("collaborative", "hybrid")
        self.dim = dim
        k, c = components.shape
        self.register_buffer("component_table", torch.tensor(components, dtype=torch.float32), persistent=False)
        if self.content:
            linear = hidden <= 0  # risk and patient vector linear in the covariates
            if linear:
                self.trunk = nn.Sequential(nn.Dropout(dropout))
                hidden = in_dim
            else:
                self.trunk = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Dropout(dropout))

            def select(buffer: str, index: Optional[Sequence[int]], what: str) -> int:
                """Register which trunk outputs feed a head; their number."""
                if index is not None and not linear:
                    raise ValueError(f"{what} select covariates: they need the linear tower")
                chosen = list(range(hidden)) if index is None else list(index)
                self.register_buffer(buffer, torch.tensor(chosen, dtype=torch.long), persistent=False)
                return len(chosen)

            self.patient_proj = nn.Linear(select("modifier_index", modifiers, "effect modifiers"), dim)
            self.risk = nn.Linear(select("risk_index", risk, "risk covariates"), 1)
            self.treatment_proj = nn.Linear(c, dim + 1)  # a vector and a bias from the components
            if modifiers is not None:
                # Start from "no effect modification": a random initial bilinear term would
                # be random per-patient treatment preferences that noisy DP steps never undo.
                with torch.no_grad():
                    self.treatment_proj.weight[:-1].zero_()
                    self.treatment_proj.bias[:-1].zero_()
        if self.collaborative:
            self.treatments = nn.Embedding(k, dim + 1)
            self.patients = nn.Embedding(slots, dim)  # local: LOCAL_PREFIX
            nn.init.normal_(self.treatments.weight, std=0.1)
            nn.init.normal_(self.patients.weight, std=0.1)

    def forward(self, x: torch.Tensor, slot: torch.Tensor, treatment: torch.Tensor, known: torch.Tensor,
                patient_vector: Optional[torch.Tensor] = None) -> torch.Tensor:
        score = torch.zeros(treatment.shape[0], device=treatment.device)
        p = torch.zeros(treatment.shape[0], self.dim, device=treatment.device)
        t = torch.zeros(treatment.shape[0], self.dim, device=treatment.device)
        if self.content:
            h = self.trunk(x)
            p = p + self.patient_proj(h.index_select(1, self.modifier_index))
            score = score + self.risk(h.index_select(1, self.risk_index)).squeeze(-1)
            tf = self.treatment_proj(self.component_table[treatment])
            t = t + tf[:, :-1]
            score = score + tf[:, -1]
        if self.collaborative:
            te = self.treatments(treatment)
            t = t + te[:, :-1]
            score = score + te[:, -1]
            pe = self.patients(slot) if patient_vector is None else patient_vector
            p = p + known.unsqueeze(-1) * pe
        return score + (p * t).sum(-1)

    @torch.jit.export
    def all_treatments(self, x: torch.Tensor, slot: torch.Tensor, known: torch.Tensor,
                       patient_vector: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Logits [B, K]: every treatment for every patient of the batch."""
        b, k = x.shape[0], self.component_table.shape[0]
        t = torch.arange(k, device=x.device).repeat(b)
        pv: Optional[torch.Tensor] = None
        if patient_vector is not None:
            pv = patient_vector.repeat_interleave(k, 0)
        out = self.forward(x.repeat_interleave(k, 0), slot.repeat_interleave(k, 0), t,
                           known.repeat_interleave(k, 0), pv)
        return out.view(b, k)


def schema_for(dataset: str) -> tabular.Schema:
    """The declared covariates of a dataset (model cards list them)."""
    return spec_for(dataset).schema


@register
class Recommendation(Task):
    name = "recommendation"
    datasets = ("actg175", "longitudinal")
    models = ("hybrid", "content", "collaborative")
    defaults = {
        "dataset": "actg175",
        "model": "hybrid",
        "local_epochs": 1,
        "batch_size": 64,
        "lr": 0.01,
        "optimizer": "adam",
        "weight_decay": 0.0,
        "dropout": 0.0,
    }
    main_metric = "roc_auc"
    local_prefixes = (LOCAL_PREFIX,)
    test_fraction = 0.25

    # ---- data -------------------------------------------------------------------
    def builtin_sites(self, dataset: str, seed: int) -> list[Site]:
        spec_for(dataset)
        if dataset == "actg175":
            records, _ = _actg_records(_actg.load_builtin(), str(_actg.DATA_FILE))
            return [split_site(self, "actg175", records, self.test_fraction, seed)]
        frame, _ = _cohort.generate(seed=0)
        sites = []
        for name, _share in _cohort.SITES:
            part = frame[frame["site"] == name].drop(columns="site").reset_index(drop=True)
            records = _history_records(_cohort.from_frame(part, f"longitudinal:{name}"), f"longitudinal:{name}")
            sites.append(split_site(self, name, records, self.test_fraction, seed))
        return sites

    def read_file(self, path: Path, dataset: str, *, strict: bool = False) -> Records:
        spec_for(dataset)
        if dataset == "actg175":
            records, _ = _actg_records(_actg.read_csv(Path(path)), str(path))
            return records
        return _history_records(_cohort.read_csv(Path(path)), str(path))

    def check_file(self, path: Path, dataset: str) -> CheckReport:
        spec = spec_for(dataset)
        report = CheckReport(path=str(path))
        if dataset == "actg175":
            frame = _actg.read_csv(Path(path))
            records, cleaning = _actg_records(frame, str(path))
            report.columns = tabular.describe(spec.schema, frame)
            cases: Cases = records.data
            report.label_counts = {"event": int((cases.outcome == 1).sum()),
                                   "no event": int((cases.outcome == 0).sum())}
            for key, count in cleaning.items():
                report.notes.append(f"{count} implausible value(s) in '{key.split(':', 1)[1]}' treated as missing")
            post = _actg.ignored_post_randomisation(frame.columns)
            if post:
                report.notes.append("post-randomisation column(s) present and never used as features: "
                                    + ", ".join(post))
            arms = np.bincount(cases.treatment, minlength=len(spec.treatments))
            report.notes.append("patients per arm: " + ", ".join(f"{a} {n}" for a, n in zip(spec.treatments, arms)))
        else:
            history = _cohort.read_csv(Path(path))
            records = _history_records(history, str(path))
            cases = records.data
            patients = len(np.unique(cases.patient.astype(str)))
            report.label_counts = {"response >= 0.5": int((cases.outcome >= 0.5).sum()),
                                   "response < 0.5": int((cases.outcome < 0.5).sum())}
            report.notes.append(f"{patients} patient(s), {len(np.unique(cases.treatment))} of "
                                f"{len(spec.treatments)} treatment(s) present")
            held = int(records.test_mask.sum())
            report.notes.append(f"{held} later response(s) held out for ranking evaluation")
            if held == 0:
                report.problems.append("no patient has 4 or more responses: nothing to rank")
        report.rows = len(records)
        if len(records) < 10:
            report.problems.append(f"only {len(records)} record(s): too few to train with DP")
        return report

    def input_schema(self, dataset: str) -> dict[str, Any]:
        spec = spec_for(dataset)
        return {"dataset": dataset, **spec.schema.describe()}

    def fingerprints(self, records: Records) -> np.ndarray:
        """Everything a row records; not ``slot``, the embedding row its patient's place
        in the file gave it."""
        c: Cases = records.data
        return row_digests(c.patient, c.x, c.treatment, c.outcome, c.propensity, c.time)

    def take(self, records: Records, index: np.ndarray) -> Records:
        index = np.asarray(index, dtype=int)
        return Records(data=records.data.take(index), labels=records.labels[index],
                       groups=None if records.groups is None else records.groups[index], source=records.source)

    def split(self, records: Records, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """Randomised data: stratified on antiretroviral history *and* the outcome.

        A quarter of ACTG is ~535 patients, ~130 events: stratifying on the outcome keeps
        the test event rate equal to the training one, so seeds differ less by chance.
        """
        cases: Cases = records.data
        if not (cases.propensity > 0).all():
            return super().split(records, test_fraction, seed)
        both = records.labels * 2 + np.nan_to_num(cases.outcome).astype(np.int64)
        return super().split(Records(data=cases, labels=both), test_fraction, seed)

    def concat(self, parts: Sequence[Records]) -> Records:
        if any(p.data.propensity.size and (p.data.propensity == 0).all() for p in parts):
            raise ConfigError("recommendation/longitudinal: hospitals are natural (a patient's history stays "
                              "in one hospital); use partition=natural")
        return Records(data=Cases.concat([p.data for p in parts]),
                       labels=np.concatenate([p.labels for p in parts]), source="pooled")

    # ---- federated preprocessing -------------------------------------------------
    def local_stats(self, train: Records, cfg: Any) -> dict[str, np.ndarray]:
        cases: Cases = train.data
        _, first = np.unique(cases.patient.astype(str), return_index=True)  # one row per patient
        spec = spec_for(cfg.dataset)
        return tabular.stats(spec.schema, cases.x[np.sort(first)])

    def finalize_stats(self, totals: dict[str, np.ndarray], cfg: Any) -> dict[str, np.ndarray]:
        return tabular.finalize(totals)

    def to_dataset(self, records: Records, prep: dict[str, np.ndarray], cfg: Any, *, train: bool) -> TensorDataset:
        spec = spec_for(cfg.dataset)
        cases: Cases = records.data
        return TensorDataset(*_tensors(spec, cases, prep))

    # ---- model ------------------------------------------------------------------
    def build_model(self, cfg: Any) -> nn.Module:
        spec = spec_for(cfg.dataset)
        if cfg.model not in self.models:
            raise ConfigError(f"recommendation: unknown model '{cfg.model}' ({', '.join(self.models)})")
        return Recommender(cfg.model, spec.schema.input_dim(), spec.components, spec.slots,
                           hidden=spec.hidden, dropout=max(float(cfg.dropout), 0.0),
                           modifiers=spec.modifier_index(), risk=spec.risk_index())

    def loss(self, model: nn.Module, batch: Sequence[torch.Tensor]) -> torch.Tensor:
        x, slot, treatment, known, outcome = batch[:5]
        return nn.functional.binary_cross_entropy_with_logits(model(x, slot, treatment, known), outcome)

    def predict(self, model: nn.Module, batch: Sequence[torch.Tensor]) -> tuple[np.ndarray, np.ndarray]:
        """Scores: predicted outcome of *every* treatment [B, K]; targets: the facts per row.

        Target columns: outcome, treatment received, patient slot, its known assignment
        probability (0 if not randomised), and the outcome's direction (+1/-1).
        """
        x, slot, treatment, known, outcome, propensity, better = batch
        scores = torch.sigmoid(_all_treatments(model, x, slot, known))
        targets = torch.stack([outcome, treatment.float(), slot.float(), propensity, better], dim=1)
        return scores.detach().cpu().numpy(), targets.detach().cpu().numpy()

    def metrics(self, scores: np.ndarray, targets: np.ndarray) -> dict[str, float]:
        outcome, treatment, slot, propensity, better = targets.T
        treatment = treatment.astype(int)
        received = scores[np.arange(len(scores)), treatment]
        binary = bool(np.isin(outcome, (0.0, 1.0)).all())
        out = binary_metrics(received, outcome if binary else (outcome >= 0.5).astype(int))
        out["rmse"] = float(np.sqrt(np.mean((received - outcome) ** 2)))
        sign = float(better[0]) if len(better) else 1.0
        benefit = scores if sign > 0 else 1.0 - scores
        good = outcome if sign > 0 else 1.0 - outcome
        if len(propensity) and (propensity > 0).all():
            k = scores.shape[1]
            p = np.full(k, 1.0 / k)
            for a in range(k):
                seen = propensity[treatment == a]
                if len(seen):
                    p[a] = seen[0]
            out.update(_policy.site_metrics(treatment, _policy.margin_policy(benefit, POLICY_MARGIN), good, p))
        else:
            out.update(_policy.ranking_metrics(slot.astype(int), benefit[np.arange(len(scores)), treatment], good))
        return out

    # ---- run-level summary -----------------------------------------------------------
    def summarize(self, sites: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
        """Pooled policy value (IPW, stratified bootstrap) and pooled ranking metrics."""
        out: dict[str, Any] = {}
        out.update(_policy.pooled_summary(sites))
        out.update(_policy.pooled_ranking(sites))
        return out

    # ---- applying a trained model --------------------------------------------------
    def infer(self, model: nn.Module, prep: dict[str, np.ndarray], cfg: Any, inputs: Sequence[str]) -> pd.DataFrame:
        """Predicted outcome of every treatment, one row per patient of each input file."""
        frames = []
        for path in inputs:
            table = self.score_patients(model, prep, cfg, Path(path))
            frames.append(table.assign(file=str(path)))
        return pd.concat(frames, ignore_index=True)

    def score_patients(self, model: nn.Module, prep: dict[str, np.ndarray], cfg: Any, path: Path,
                       *, fold_in_steps: int = 300) -> pd.DataFrame:
        """Per patient: predicted outcome for every treatment (wide) and what they tried.

        ACTG: a CSV of baseline covariates (``pidnum``, ``arms``, ``cens`` optional).
        Longitudinal: a history CSV; for models with patient embeddings, each patient's
        embedding is fitted to their history with the treatment side frozen ("fold-in"),
        here at the hospital, as training would have.
        """
        spec = spec_for(cfg.dataset)
        if spec.name == "actg175":
            frame = _actg.read_csv(path, require_outcome=False)
            ids, x, arm, _, _ = _actg.parse(frame, str(path), require_outcome=False)
            tried = [[int(a)] if a >= 0 else [] for a in arm]
            x_enc = torch.from_numpy(tabular.encode(spec.schema, x, prep))
            known = torch.zeros(len(ids))
            with torch.no_grad():
                scores = torch.sigmoid(_all_treatments(model, x_enc, torch.zeros(len(ids), dtype=torch.long),
                                                       known)).numpy()
        else:
            history = _cohort.read_csv(path)
            ids, first, inverse = np.unique(history.patient.astype(str), return_index=True, return_inverse=True)
            x_enc = torch.from_numpy(tabular.encode(spec.schema, history.x[first], prep))
            tried = [sorted(set(history.treatment[inverse == i].tolist())) for i in range(len(ids))]
            vectors = None
            if getattr(model, "collaborative", False):
                vectors = fold_in(model, torch.tensor(tabular.encode(spec.schema, history.x, prep)),
                                  torch.tensor(inverse, dtype=torch.long), torch.tensor(history.treatment),
                                  torch.tensor(history.response, dtype=torch.float32), len(ids),
                                  steps=fold_in_steps)
            with torch.no_grad():
                scores = torch.sigmoid(model.all_treatments(
                    x_enc, torch.zeros(len(ids), dtype=torch.long), torch.ones(len(ids)), vectors)).numpy()
        wide = pd.DataFrame(scores, columns=[f"{spec.outcome}:{t}" for t in spec.treatments])
        wide.insert(0, "patient", ids)
        wide["tried"] = ["|".join(spec.treatments[t] for t in ts) for ts in tried]
        return wide

    def recommend(self, model: nn.Module, prep: dict[str, np.ndarray], cfg: Any, path: Path, k: int,
                  *, include_tried: bool = False) -> pd.DataFrame:
        """Top-k treatments per patient with their predicted outcome (long format).

        On ACTG rank 1 is ``_policy.margin_policy`` over the file's patients (the arm best
        on average for them unless another is predicted better by ``POLICY_MARGIN``),
        the rest follow by predicted benefit.
        """
        spec = spec_for(cfg.dataset)
        if k < 1:
            raise ConfigError("--k must be >= 1")
        wide = self.score_patients(model, prep, cfg, Path(path))
        scores = wide[[f"{spec.outcome}:{t}" for t in spec.treatments]].to_numpy()
        benefit = scores if spec.better > 0 else 1.0 - scores
        # Randomised data: rank 1 is the policy whose value the run reported.
        first = _policy.margin_policy(benefit, POLICY_MARGIN) if spec.name == "actg175" else None
        rows = []
        for i, patient in enumerate(wide["patient"]):
            tried = set(wide["tried"].iloc[i].split("|")) - {""}
            order = [t for t in np.argsort(-benefit[i], kind="stable")
                     if include_tried or spec.name == "actg175" or spec.treatments[t] not in tried]
            if first is not None:
                order = [int(first[i])] + [t for t in order if t != first[i]]
            for rank, t in enumerate(order[:k], start=1):
                rows.append({"patient": patient, "rank": rank, "treatment": spec.treatments[t],
                             f"predicted_{spec.outcome}": float(scores[i, t]),
                             "predicted_benefit": float(benefit[i, t])})
        return pd.DataFrame(rows, columns=["patient", "rank", "treatment", f"predicted_{spec.outcome}",
                                           "predicted_benefit"])


def _tensors(spec: Spec, cases: Cases, prep: dict[str, np.ndarray]) -> list[torch.Tensor]:
    x = tabular.encode(spec.schema, cases.x, prep)
    n = len(cases.outcome)
    return [
        torch.from_numpy(x),
        torch.from_numpy(cases.slot.astype(np.int64)),
        torch.from_numpy(cases.treatment.astype(np.int64)),
        torch.full((n,), 1.0 if spec.histories else 0.0),
        torch.from_numpy(np.nan_to_num(cases.outcome).astype(np.float32)),
        torch.from_numpy(cases.propensity.astype(np.float32)),
        torch.full((n,), float(spec.better)),
    ]


def _all_treatments(model: nn.Module, x: torch.Tensor, slot: torch.Tensor, known: torch.Tensor) -> torch.Tensor:
    inner = getattr(model, "_module", model)  # Opacus' GradSampleModule wraps the model
    return inner.all_treatments(x, slot, known)


def fold_in(model: nn.Module, x: torch.Tensor, row_patient: torch.Tensor, treatment: torch.Tensor,
            response: torch.Tensor, n_patients: int, *, steps: int = 300, l2: float = 1e-2) -> torch.Tensor:
    """Patient vectors fitted to their own histories, every shared parameter frozen."""
    vectors = torch.zeros(n_patients, model.dim, requires_grad=True)
    optimizer = torch.optim.Adam([vectors], lr=0.05)
    was_training = model.training
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        ones = torch.ones(len(treatment))
        for _ in range(steps):
            optimizer.zero_grad()
            logits = model(x, torch.zeros_like(row_patient), treatment, ones, vectors[row_patient])
            loss = nn.functional.binary_cross_entropy_with_logits(logits, response) + l2 * (vectors ** 2).mean()
            loss.backward()
            optimizer.step()
    finally:
        for p in model.parameters():
            p.requires_grad_(True)
        model.train(was_training)
    return vectors.detach()
