"""Reference rows (sksurv CoxPH / RSF on the tabular modalities) against direct sksurv fits."""

import json

import numpy as np
import pytest
from sklearn.impute import SimpleImputer
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sksurv.ensemble import RandomSurvivalForest
from sksurv.linear_model import CoxPHSurvivalAnalysis
from sksurv.metrics import concordance_index_censored
from sksurv.util import Surv

from configs.common import base_config
from survjax.data.splits import load_or_make_folds
from survjax.data.synthetic import SyntheticSpec, make_synthetic_cohort
from survjax.errors import InputError
from survjax.evaluate import reference
from survjax.evaluate.cv import run_cv
from survjax.evaluate.report import render_report
from toy_method import ToyMethod


@pytest.fixture(scope="module")
def cohort():
  """Bags (ignored), genomic tokens missing for ~25%, and two RNA/DNAm vectors.

  Genomics is cut to 4 columns of each of its six families (24 columns): sksurv's CoxPH
  Newton step loops over patients in Python with p x p work each, seconds at p ~ 300.
  """
  c = make_synthetic_cohort(SyntheticSpec(
      n_patients=90, patch_dim=8, bag_min=10, bag_max=30, rna_dnam=True, rna_dim=6,
      dnam_dim=5, missing_genomics=0.25, seed=3))
  gen = c.modalities["genomics"]
  keep = [i for _, idx in gen.groups for i in idx[:4]]
  gen.values = gen.values[:, keep]
  gen.groups = tuple((name, tuple(range(4 * j, 4 * j + 4)))
                     for j, (name, _) in enumerate(gen.groups))
  gen.columns = tuple(gen.columns[i] for i in keep) if gen.columns else ()
  return c


def _sklearn_design(cohort, tr, va):
  """The documented preprocessing, written with sklearn: NaN where a modality is missing,
  SimpleImputer(mean) then StandardScaler fitted on the training rows."""
  blocks = []
  for name, mod in cohort.modalities.items():
    if mod.kind in ("tokens", "vector"):
      v = np.asarray(mod.values, np.float64).copy()
      v[~mod.available] = np.nan
      blocks.append(v)
  x = np.concatenate(blocks, axis=1)
  prep = make_pipeline(SimpleImputer(strategy="mean"), StandardScaler()).fit(x[tr])
  return prep.transform(x[tr]), prep.transform(x[va])


def _folds(cohort, tmp_path):
  return load_or_make_folds(cohort.case_ids, cohort.time, cohort.event, num_folds=3, seed=0,
                            splits_dir=tmp_path / "splits", dataset=cohort.name)


def test_design_matrix_is_train_fold_impute_then_standardise(cohort, tmp_path):
  assert reference.tabular_modalities(cohort) == ["genomics", "rna", "dnam"]
  assert 0 < (~cohort.modalities["genomics"].available).sum() < len(cohort)
  tr, va = _folds(cohort, tmp_path)[1]
  x_tr, x_va = reference.design_matrices(cohort, tr, va)
  want_tr, want_va = _sklearn_design(cohort, tr, va)
  assert x_tr.shape == (len(tr), cohort.modalities["genomics"].dim + 6 + 5)
  np.testing.assert_allclose(x_tr, want_tr, rtol=0, atol=1e-12)
  np.testing.assert_allclose(x_va, want_va, rtol=0, atol=1e-12)
  np.testing.assert_allclose(x_tr.mean(0), 0, atol=1e-12)
  # A test patient without genomics sits at the training mean: 0 after standardising.
  gen = cohort.modalities["genomics"]
  miss = ~gen.available[va]
  assert miss.any()
  np.testing.assert_allclose(x_va[miss, :gen.dim], 0, atol=1e-12)


def test_reference_fold_matches_direct_sksurv_fit(cohort, tmp_path):
  k = 0
  tr, va = _folds(cohort, tmp_path)[k]
  got = reference.reference_fold(cohort, tr, va, ("coxph", "rsf"), seed=2, fold=k,
                                 coxph_alpha=1.0)
  x_tr, x_va = _sklearn_design(cohort, tr, va)
  y = Surv.from_arrays(event=cohort.event[tr], time=cohort.time[tr])
  direct = {
      "coxph": CoxPHSurvivalAnalysis(alpha=1.0, ties="breslow"),
      "rsf": RandomSurvivalForest(n_estimators=100, min_samples_split=10, min_samples_leaf=5,
                                  max_features="sqrt", n_jobs=1, random_state=1000 * 2 + k),
  }
  for name, model in direct.items():
    risk = model.fit(x_tr, y).predict(x_va)
    want = concordance_index_censored(cohort.event[va], cohort.time[va], risk)[0]
    assert got[name]["c_index"] == pytest.approx(want, abs=1e-12), name
  assert 0.55 < got["coxph"]["c_index"] < 1.0  # genomics carry a third of the risk


def _config(tmp_path, models):
  c = base_config("toy")
  c.cv.num_folds = 3
  c.cv.splits_dir = str(tmp_path / "splits")
  c.train.batch_size = 16
  c.train.max_instances = 16
  c.eval.batch_size = 32
  c.eval.latency = False
  c.eval.reference_models = models
  c.progress = False
  return c


def test_run_cv_reference_rows_on_the_method_folds_and_report(cohort, tmp_path):
  work = tmp_path / "run"
  method = ToyMethod(epochs=(2, 1))
  first = run_cv(method, cohort, _config(tmp_path, ()), work)
  assert "reference_rows" not in first
  # Asked for afterwards: the folds are reused (no retraining) and the rows are added.
  res = run_cv(method, cohort, _config(tmp_path, ("coxph", "rsf")), work)
  assert res["scenarios"] == first["scenarios"]
  assert res["timing"]["train_s_total"] == first["timing"]["train_s_total"]  # reused folds
  rows = {r["key"]: r for r in res["reference_rows"]}
  assert [r["model"] for r in res["reference_rows"]] == ["CoxPH (sksurv)", "RSF (sksurv)"]
  folds = _folds(cohort, tmp_path)  # reads the split files the run wrote
  for key, row in rows.items():
    want = [reference.reference_fold(cohort, tr, va, (key,), seed=0, fold=k)[key]["c_index"]
            for k, (tr, va) in enumerate(folds)]
    assert row["per_fold"] == [round(w, 4) for w in want]
    assert row["scenario"] == "full" and len(row["per_fold"]) == res["folds"] == 3
    assert row["c_index_mean"] == round(float(np.mean(want)), 4)
    assert row["c_index_std"] == round(float(np.std(want)), 4)
    for k in range(3):
      fold = json.loads((work / f"fold_{k}" / "result.json").read_text())
      assert fold["reference"][key]["c_index"] == want[k]
  on_disk = json.loads((work / "results.json").read_text())
  assert on_disk["reference_rows"] == res["reference_rows"]
  report = (work / "report.md").read_text()
  assert "## Reference models on the same folds" in report
  cox = rows["coxph"]
  assert (f"| CoxPH (sksurv) | `full` | {cox['c_index_mean']:.3f} ± "
          f"{cox['c_index_std']:.3f} |") in report
  assert "| RSF (sksurv) | `full` |" in report
  assert render_report(on_disk).count("(sksurv) | `full`") == 2


def test_bad_reference_config_fails_before_writing(cohort, tmp_path):
  with pytest.raises(InputError, match="unknown reference model 'cox'"):
    run_cv(ToyMethod(), cohort, _config(tmp_path, ("cox",)), tmp_path / "run")
  bags_only = cohort.subset(np.arange(len(cohort)))
  bags_only.modalities = {"pathology": cohort.modalities["pathology"]}
  with pytest.raises(InputError, match="need a tabular"):
    run_cv(ToyMethod(modalities=("pathology",)), bags_only, _config(tmp_path, ("rsf",)),
           tmp_path / "run")
  assert not (tmp_path / "run").exists() and not (tmp_path / "splits").exists()
