"""Reference rows: scikit-survival models on the cohort's tabular data, on the method's folds.

For every fold the method is evaluated on, each reference model is fitted on that fold's
training patients and predicts its held-out patients; the C-index comes from the same
code as the method's (`survjax.evaluate.metrics.concordance_index`), so a report row
``CoxPH (sksurv)`` and a method row differ only in the model.

Design matrix: every modality of kind ``tokens`` or ``vector`` (genomic tokens, clinical
variables, RNA-seq vectors), their ``values`` concatenated in the cohort's modality order;
bags and image patches are not used. Per fold, with statistics of the training patients
only (no test information leaks):

* a patient without a modality gets, for that modality's columns, the mean of the
  training patients that have it (mean imputation; no missingness indicator is added);
* then every column is standardised, ``(x - mean) / std`` with the mean and standard
  deviation of the (imputed) training rows; a constant column becomes 0.

This is scikit-learn's ``SimpleImputer(strategy="mean")`` then ``StandardScaler()``,
fitted on the training fold.

Models (scenario ``full``: every patient keeps whatever it has):

* ``coxph``: `sksurv.linear_model.CoxPHSurvivalAnalysis` with a ridge penalty
  ``alpha`` (default 1.0, i.e. ``alpha / 2 * ||beta||^2`` added to the negative partial
  log-likelihood of the fold; it keeps the fit unique with one-hot or collinear columns
  and finite on separable folds), Breslow ties; risk = the linear predictor. Its Newton
  step loops over patients in Python with ``p x p`` work each: about 4 s per fold
  for p ~ 300 columns on 60 patients, minutes for thousands of gene columns.
* ``rsf``: `sksurv.ensemble.RandomSurvivalForest` with 100 trees, ``min_samples_split=10``,
  ``min_samples_leaf=5``, ``max_features="sqrt"``, ``n_jobs=1``, ``random_state =
  1000 * seed + fold``; risk = its ``predict`` (the summed cumulative hazard).
"""

from __future__ import annotations

import dataclasses
import logging
import time
import warnings

import numpy as np

from survjax.errors import InputError
from survjax.evaluate.metrics import concordance_index

log = logging.getLogger("survjax")

TABULAR_KINDS = ("tokens", "vector")


@dataclasses.dataclass(frozen=True)
class ReferenceModel:
  """A reference model: its display name and how it is fitted."""

  key: str
  name: str


MODELS = {"coxph": ReferenceModel("coxph", "CoxPH (sksurv)"),
          "rsf": ReferenceModel("rsf", "RSF (sksurv)")}


def check_reference_models(names, cohort) -> tuple[str, ...]:
  """Validates ``config.eval.reference_models`` against the cohort, before anything runs.

  Raises:
    InputError: an unknown model name, or reference models asked for on a cohort with no
      tabular (tokens or vector) modality.
  """
  if isinstance(names, str):
    names = (names,)
  # "coxph,rsf" from the command line arrives as one string: accept it.
  names = tuple(n.strip() for name in (names or ()) for n in str(name).split(",") if n.strip())
  for n in names:
    if n not in MODELS:
      raise InputError(f"unknown reference model {n!r}, expected some of {sorted(MODELS)}",
                       path="config.eval.reference_models")
  if names and not tabular_modalities(cohort):
    raise InputError(f"reference models {list(names)} need a tabular (tokens or vector) "
                     f"modality, cohort {cohort.name!r} has "
                     f"{[f'{k} ({m.kind})' for k, m in cohort.modalities.items()]}",
                     path="config.eval.reference_models")
  return tuple(dict.fromkeys(names))


def tabular_modalities(cohort) -> list[str]:
  """Names of the cohort's tokens/vector modalities, in the cohort's order."""
  return [k for k, m in cohort.modalities.items() if m.kind in TABULAR_KINDS]


def design_matrices(cohort, train_idx, test_idx) -> tuple[np.ndarray, np.ndarray]:
  """Imputed, standardised float64 ``(X_train, X_test)`` (module docstring).

  The same as scikit-learn's ``SimpleImputer(strategy="mean")`` followed by
  ``StandardScaler()``, both fitted on the training rows, with the rows of patients
  without a modality as missing values.
  """
  train_idx, test_idx = np.asarray(train_idx), np.asarray(test_idx)
  parts_tr, parts_te = [], []
  for name in tabular_modalities(cohort):
    mod = cohort.modalities[name]
    values = np.asarray(mod.values, np.float64).reshape(len(cohort), -1)
    avail = mod.available
    seen = values[train_idx][avail[train_idx]]
    # Training mean of the patients that have the modality (0 if none has it).
    mean = seen.mean(axis=0) if len(seen) else np.zeros(values.shape[1])
    x_tr = np.where(avail[train_idx][:, None], values[train_idx], mean)
    x_te = np.where(avail[test_idx][:, None], values[test_idx], mean)
    center, std = x_tr.mean(axis=0), x_tr.std(axis=0)
    std = np.where(std > 0, std, 1.0)  # a constant column stays constant (0)
    parts_tr.append((x_tr - center) / std)
    parts_te.append((x_te - center) / std)
  return np.concatenate(parts_tr, axis=1), np.concatenate(parts_te, axis=1)


def make_model(key: str, *, seed: int, coxph_alpha: float = 1.0):
  """The (unfitted) sksurv estimator of reference model ``key``."""
  if key == "coxph":
    from sksurv.linear_model import CoxPHSurvivalAnalysis
    return CoxPHSurvivalAnalysis(alpha=coxph_alpha, ties="breslow", n_iter=100)
  if key == "rsf":
    from sksurv.ensemble import RandomSurvivalForest
    return RandomSurvivalForest(n_estimators=100, min_samples_split=10, min_samples_leaf=5,
                                max_features="sqrt", n_jobs=1, random_state=seed)
  raise InputError(f"unknown reference model {key!r}, expected some of {sorted(MODELS)}",
                   path="config.eval.reference_models")


def fit_predict(key: str, x_train, time_train, event_train, x_test, *, seed: int,
                coxph_alpha: float = 1.0) -> np.ndarray:
  """Fits reference model ``key`` and returns risks of the test rows (higher = worse)."""
  from sksurv.util import Surv
  model = make_model(key, seed=seed, coxph_alpha=coxph_alpha)
  y = Surv.from_arrays(event=np.asarray(event_train, bool),
                       time=np.asarray(time_train, np.float64))
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    model.fit(x_train, y)
    risk = np.asarray(model.predict(x_test), np.float64)
  for w in {str(w.message) for w in caught}:
    # e.g. a CoxPH that reaches n_iter: the fit is still used (the ridge keeps it finite).
    log.warning("reference model %s: %s", key, w.splitlines()[0])
  return risk


def reference_fold(cohort, train_idx, test_idx, models, *, seed: int, fold: int,
                   coxph_alpha: float = 1.0) -> dict:
  """``{model key: {"c_index", "fit_s"}}`` for one fold."""
  x_tr, x_te = design_matrices(cohort, train_idx, test_idx)
  out = {}
  for key in models:
    t0 = time.perf_counter()
    risk = fit_predict(key, x_tr, cohort.time[train_idx], cohort.event[train_idx], x_te,
                       seed=1000 * seed + fold, coxph_alpha=coxph_alpha)
    if not np.all(np.isfinite(risk)):
      raise FloatingPointError(f"fold {fold}: reference model {key} predicted non-finite risk")
    c = float(concordance_index(cohort.time[test_idx], cohort.event[test_idx], risk)[0])
    out[key] = {"c_index": c, "fit_s": round(time.perf_counter() - t0, 3)}
  return out


def reference_rows(fold_results, models) -> list[dict]:
  """Rows for ``results["reference_rows"]`` from the folds' ``"reference"`` entries.

  Each row: ``{"model": display name, "key", "scenario": "full", "c_index_mean",
  "c_index_std", "per_fold"}`` (rounded as the method's rows), over the same folds.
  """
  rows = []
  for key in models:
    per = [f["reference"][key]["c_index"] for f in fold_results
           if key in f.get("reference", {})]
    if len(per) != len(fold_results):
      continue
    v = np.asarray(per, float)
    rows.append({"model": MODELS[key].name, "key": key, "scenario": "full",
                 "c_index_mean": round(float(v.mean()), 4),
                 "c_index_std": round(float(v.std()), 4),
                 "per_fold": [round(x, 4) for x in per]})
  return rows
