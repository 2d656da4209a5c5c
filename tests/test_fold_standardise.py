"""Standardisation fitted on each training fold (`standardize_fold`), never on all patients.

The sksurv breast cohort (`survjax.data.breast`) flags its numeric columns (76 genes, age,
size) in ``cohort.standardize`` and keeps raw values; the CV loop, tuning and predict mode
z-score them with the training fold's mean and standard deviation. Checked against a
numpy reference computed from sksurv's raw table, and shown not to depend on the held-out
patients.
"""

import copy
import dataclasses

import numpy as np
import pytest

from survjax.data.breast import load_breast_cancer_cohort
from survjax.data.formats import impute_fold, standardize_fold


def _split(n=198, n_test=40, seed=0):
  perm = np.random.default_rng(seed).permutation(n)
  return np.sort(perm[n_test:]), np.sort(perm[:n_test])


def _raw_numeric(cohort):
  """The flagged columns of each modality, float64, from sksurv's table (not the cohort)."""
  from sksurv.datasets import load_breast_cancer
  x, _ = load_breast_cancer()
  return {name: x[[c for c, f in zip(cohort.modalities[name].columns, mask) if f]]
          .to_numpy(np.float64) for name, mask in cohort.standardize.items()}


@pytest.fixture(scope="module")
def breast():
  return load_breast_cancer_cohort()


def test_breast_flags_numeric_columns_and_keeps_raw_values(breast):
  clin = breast.modalities["clinical"]
  assert breast.standardize["genes"].all() and breast.standardize["genes"].size == 76
  assert [c for c, f in zip(clin.columns, breast.standardize["clinical"]) if f] == [
      "age", "size"]
  raw = _raw_numeric(breast)
  np.testing.assert_array_equal(breast.modalities["genes"].values,
                                raw["genes"].astype(np.float32))
  assert not hasattr(load_breast_cancer_cohort(standardize=False), "standardize")


def test_training_fold_statistics(breast):
  """Training rows: mean 0, std 1 (1e-6); test rows: (x - train mean) / train std."""
  tr, te = _split()
  out = standardize_fold(breast, tr)
  raw = _raw_numeric(breast)
  for name, mask in breast.standardize.items():
    z = out.modalities[name].values[:, mask].astype(np.float64)
    np.testing.assert_allclose(z[tr].mean(0), 0, atol=1e-6, err_msg=name)
    np.testing.assert_allclose(z[tr].std(0), 1, atol=1e-6, err_msg=name)
    ref = (raw[name] - raw[name][tr].mean(0)) / raw[name][tr].std(0)
    np.testing.assert_allclose(z, ref, atol=1e-5, err_msg=name)
    assert abs(z[te].mean(0)).max() > 1e-3   # the test rows were not re-centred
    # one-hot columns untouched; the input cohort is not modified
    np.testing.assert_array_equal(out.modalities[name].values[:, ~mask],
                                  breast.modalities[name].values[:, ~mask])
  np.testing.assert_array_equal(breast.modalities["genes"].values,
                                raw["genes"].astype(np.float32))


def test_test_patients_do_not_leak_into_training_features(breast):
  tr, te = _split()
  changed = copy.copy(breast)
  changed.modalities = dict(breast.modalities)
  for name in ("genes", "clinical"):
    v = breast.modalities[name].values.copy()
    v[te[:5]] = v[te[:5]] * 50 + 1e3
    changed.modalities[name] = dataclasses.replace(breast.modalities[name], values=v)
  a, b = standardize_fold(breast, tr), standardize_fold(changed, tr)
  for name in ("genes", "clinical"):
    np.testing.assert_array_equal(a.modalities[name].values[tr],
                                  b.modalities[name].values[tr])
    assert not np.array_equal(a.modalities[name].values[te[:5]],
                              b.modalities[name].values[te[:5]])


def test_new_cohort_uses_the_training_statistics(breast):
  """Predict mode: a new cohort is z-scored with the training fold's statistics; a
  patient without the modality keeps zeros."""
  tr, _ = _split()
  new = load_breast_cancer_cohort(standardize=False).subset(np.arange(30))
  genes = new.modalities["genes"]
  avail = genes.available.copy()
  avail[3] = False
  values = genes.values.copy()
  values[3] = 0
  new.modalities["genes"] = dataclasses.replace(genes, available=avail, values=values)
  out = standardize_fold(new, tr, reference=breast)
  train_k = standardize_fold(breast, tr)
  keep = np.arange(30) != 3
  np.testing.assert_array_equal(out.modalities["genes"].values[keep],
                                train_k.modalities["genes"].values[:30][keep])
  np.testing.assert_array_equal(out.modalities["clinical"].values,
                                train_k.modalities["clinical"].values[:30])
  assert not out.modalities["genes"].values[3].any()


def test_imputed_cells_then_standardised(tmp_path):
  """`impute_fold` keeps the flags; the statistics include the filled cells."""
  import test_impute
  test_impute._write(tmp_path / "c.csv", np.random.default_rng(0))
  cohort = test_impute._load(tmp_path / "c.csv", "train_mean")
  clin = cohort.modalities["clinical"]
  age = list(clin.columns).index("age")
  cohort.standardize = {"clinical": np.arange(clin.dim) == age}
  tr = np.array([0, 1, 2, 3, 4, 5, 6, 9, 10])
  imputed = impute_fold(cohort, tr)
  assert imputed.standardize is cohort.standardize
  out = standardize_fold(imputed, tr)
  rows = tr[clin.available[tr]]
  a = imputed.modalities["clinical"].values[rows, age].astype(np.float64)
  z = out.modalities["clinical"].values[:, age]
  np.testing.assert_allclose(z[rows], (a - a.mean()) / a.std(), atol=1e-6)
  assert z[5] == 0 and not clin.available[5]   # unavailable row stays zero


def test_cross_validation_and_predict_standardise_per_fold(tmp_path, monkeypatch):
  """The CV loop trains fold k on the cohort standardised with fold k's training
  patients, and predict mode transforms the new cohort with the same statistics."""
  from configs.common import base_config
  from survjax import predict
  from survjax.data import load_cohort
  from survjax.evaluate import cv
  from survjax.models import get_method
  seen = {"cv": [], "predict": []}

  def spy(where):
    def f(c, tr, **kw):
      out = standardize_fold(c, tr, **kw)
      seen[where].append((np.asarray(tr).copy(), out))
      return out
    return f

  monkeypatch.setattr(cv, "standardize_fold", spy("cv"))
  monkeypatch.setattr(predict, "standardize_fold", spy("predict"))
  cfg = base_config("toy_method")
  with cfg.unlocked():
    cfg.model = {"modalities": ("clinical", "genes"), "epochs": (1, 1)}
  cfg.data.source = "sksurv_breast"
  cfg.cv.num_folds, cfg.cv.val_fraction = 2, 0.0
  cfg.cv.splits_dir = str(tmp_path / "splits")
  cfg.eval.scenarios, cfg.eval.latency, cfg.progress = ("full",), False, False
  cfg.train.batch_size = 32
  cfg.compilation_cache_dir = ""
  cohort = load_cohort(cfg.data)
  cv.run_cv(get_method(cfg), cohort, cfg, tmp_path / "run")
  folds, _ = cv.cohort_folds(cohort, cfg)
  assert len(seen["cv"]) == 2
  for (tr, out), (fold_tr, _) in zip(seen["cv"], folds):
    np.testing.assert_array_equal(tr, fold_tr)
    z = out.modalities["genes"].values[tr].astype(np.float64)
    np.testing.assert_allclose(z.mean(0), 0, atol=1e-6)
    np.testing.assert_allclose(z.std(0), 1, atol=1e-6)
  data = copy.deepcopy(cfg.data)
  data.name = "again"
  predict.predict_run(cfg, tmp_path / "run", data, bootstrap=0)
  # per fold: the training cohort, then the new one (here the same patients) with the
  # training cohort's statistics, so both come out identical to the CV loop's
  calls = seen["predict"]
  assert len(calls) == 4
  for k in range(2):
    cv_out = seen["cv"][k][1]
    for _, out in calls[2 * k: 2 * k + 2]:
      for name in ("genes", "clinical"):
        np.testing.assert_array_equal(out.modalities[name].values,
                                      cv_out.modalities[name].values)


def test_tuning_trains_on_the_fold_standardised_cohort(tmp_path, monkeypatch, breast):
  """--mode=tune fits the same per-fold transform as the CV loop before training."""
  from configs.common import base_config
  from survjax.evaluate import cv, tune
  from survjax.models import get_method
  from survjax.train.trainer import Trainer
  fitted = []
  fit = Trainer.fit

  def spy(self, model, cohort, *args, **kw):
    fitted.append(cohort)
    return fit(self, model, cohort, *args, **kw)

  monkeypatch.setattr(Trainer, "fit", spy)
  cfg = base_config("toy_method")
  with cfg.unlocked():
    cfg.model = {"modalities": ("clinical", "genes"), "epochs": (1, 1)}
    cfg.tune = {"grid": (("train.batch_size", (32,)),)}
  cfg.data.source = "sksurv_breast"
  cfg.cv.num_folds, cfg.cv.val_fraction = 2, 0.25
  cfg.cv.splits_dir = str(tmp_path / "splits")
  cfg.progress, cfg.compilation_cache_dir = False, ""
  folds, _ = cv.cohort_folds(breast, cfg)
  tune.run_tune(breast, cfg, tmp_path / "tune", folds=folds, run_folds=[1],
                make_method=get_method)
  expected = standardize_fold(breast, folds[1][0])
  assert len(fitted) == 1
  for name in ("genes", "clinical"):
    np.testing.assert_array_equal(fitted[0].modalities[name].values,
                                  expected.modalities[name].values)
  assert np.isnan(fitted[0].time[folds[1][1]]).all()   # test labels still blanked
