"""data.files.impute: partly empty gene / tabular rows, filled from each training fold only.

A tabular-only clinical CSV (no slide_id column, no features) with a clinical modality and
RNA columns, some rows partly empty and one clinical row entirely empty. The imputed values
are checked against the training fold's mean / median computed by hand from the CSV
text, and the held-out fold's values are shown not to matter.
"""

import csv
import json

import numpy as np
import pytest

from survjax.data.formats import imputation_summary, impute_fold, load_file_cohort
from survjax.errors import InputError

N = 12


def _write(path, rng, test_rows=(), test_value=None, n=N):
  """Rows: case_id, survival_months, censorship, age, grade, A_rnaseq, B_rnaseq."""
  rows = []
  for i in range(n):
    age = f"{40 + 3 * i + rng.integers(0, 3)}"
    grade = f"{1 + i % 3}"
    a, b = f"{rng.normal():.4f}", f"{rng.normal():.4f}"
    if i in test_rows and test_value is not None:
      age, a = str(test_value), str(test_value)
    if i in (2, 7):
      age = ""            # partly empty clinical row
    if i in (3, 8):
      a = ""              # partly empty gene row
    if i == 5:
      age, grade = "", ""  # clinical entirely empty: unavailable, not imputed
    rows.append([f"P{i:02d}", f"{5 + 2 * i}", str(i % 2), age, grade, a, b])
  with open(path, "w", newline="") as f:
    w = csv.writer(f, lineterminator="\n")
    w.writerow(["case_id", "survival_months", "censorship", "age", "grade", "A_rnaseq",
                "B_rnaseq"])
    w.writerows(rows)
  return rows


def _load(path, impute):
  return load_file_cohort(path, name="gaps", tabular={"clinical": ["age", "grade"]},
                          impute=impute)


def test_error_policy_is_todays_behaviour(tmp_path):
  _write(tmp_path / "c.csv", np.random.default_rng(0))
  with pytest.raises(InputError, match="is empty, expected a number"):
    _load(tmp_path / "c.csv", "error")
  with pytest.raises(InputError, match="expected one of"):
    _load(tmp_path / "c.csv", "train_mode")


@pytest.mark.parametrize("policy", ["train_mean", "train_median"])
def test_imputed_values_are_the_training_folds(tmp_path, policy):
  rows = _write(tmp_path / "c.csv", np.random.default_rng(0))
  cohort = _load(tmp_path / "c.csv", policy)
  assert "slide_id" not in open(tmp_path / "c.csv").readline()   # tabular only
  assert set(cohort.modalities) == {"genomics", "clinical"}
  clin, gen = cohort.modalities["clinical"], cohort.modalities["genomics"]
  assert not clin.available[5] and clin.available.sum() == N - 1
  line = imputation_summary(cohort)
  assert "genomics 2" in line and "clinical 2" in line and policy in line

  train = np.array([0, 1, 2, 3, 4, 5, 6, 9, 10])      # 7 and 8 are held out
  stat = np.mean if policy == "train_mean" else np.median
  ages = [float(rows[i][3]) for i in train if rows[i][3]]
  a_vals = [float(rows[i][5]) for i in train if rows[i][5]]
  out = impute_fold(cohort, train)
  c_age = list(clin.columns).index("age")
  c_a = list(gen.columns).index("A_rnaseq")
  for i in (2, 7):      # training and held-out patients alike get the training value
    assert out.modalities["clinical"].values[i, c_age] == pytest.approx(stat(ages), rel=1e-6)
  for i in (3, 8):
    assert out.modalities["genomics"].values[i, c_a] == pytest.approx(stat(a_vals), rel=1e-5)
  # Observed cells untouched; the empty row stays unavailable with zeros.
  np.testing.assert_array_equal(out.modalities["genomics"].values[0], gen.values[0])
  assert not out.modalities["clinical"].available[5]
  assert (out.modalities["clinical"].values[5] == 0).all()
  # The original cohort is not modified (each fold imputes afresh).
  assert clin.values[2, c_age] == 0.0

  # Held-out values have no influence: change them wildly, same imputation.
  rows2 = _write(tmp_path / "d.csv", np.random.default_rng(0), test_rows=(11,),
                 test_value=1e4)
  assert rows2[11][3] == "10000.0"
  out2 = impute_fold(_load(tmp_path / "d.csv", policy), train)
  for name in ("clinical", "genomics"):
    np.testing.assert_array_equal(out2.modalities[name].values[:11],
                                  out.modalities[name].values[:11])


def test_slide_id_needed_only_with_features(tmp_path):
  _write(tmp_path / "c.csv", np.random.default_rng(0))
  (tmp_path / "feats").mkdir()
  with pytest.raises(InputError, match="missing column 'slide_id'"):
    load_file_cohort(tmp_path / "c.csv", name="x", features_dir=tmp_path / "feats",
                     impute="train_mean")


def test_new_cohort_uses_the_training_categories(tmp_path):
  """Predict mode: one-hot columns over the training cohort's categories, same order."""
  head = "case_id,survival_months,event,stage\n"
  (tmp_path / "train.csv").write_text(head + "A,5,1,II\nB,6,0,I\nC,7,1,III\nD,8,0,II\n")
  train = load_file_cohort(tmp_path / "train.csv", name="t", tabular={"clinical": ["stage"]})
  cols = train.modalities["clinical"].columns
  assert cols == ("stage=I", "stage=II", "stage=III")
  (tmp_path / "new.csv").write_text(head + "E,5,1,III\nF,6,0,III\n")   # one category only
  alone = load_file_cohort(tmp_path / "new.csv", name="n", tabular={"clinical": ["stage"]})
  assert alone.modalities["clinical"].columns == ("stage=III",)        # would not match
  new = load_file_cohort(tmp_path / "new.csv", name="n", tabular={"clinical": ["stage"]},
                         tabular_columns={"clinical": cols})
  assert new.modalities["clinical"].columns == cols
  np.testing.assert_array_equal(new.modalities["clinical"].values, [[0, 0, 1], [0, 0, 1]])
  (tmp_path / "bad.csv").write_text(head + "G,5,1,IV\n")
  with pytest.raises(InputError, match="'IV', a category the training cohort never had"):
    load_file_cohort(tmp_path / "bad.csv", name="b", tabular={"clinical": ["stage"]},
                     tabular_columns={"clinical": cols})


def test_cross_validation_imputes_each_fold_from_its_training_patients(tmp_path, monkeypatch):
  """The CV harness calls `impute_fold` per fold with that fold's training patients."""
  from configs.common import base_config
  from survjax.evaluate import cv
  from toy_method import ToyMethod
  rows = _write(tmp_path / "c.csv", np.random.default_rng(1))
  cohort = _load(tmp_path / "c.csv", "train_median")
  calls = []

  def spy(c, tr, **kw):
    out = impute_fold(c, tr, **kw)
    calls.append((np.asarray(tr).copy(), out))
    return out

  monkeypatch.setattr(cv, "impute_fold", spy)
  cfg = base_config("toy")
  cfg.cv.num_folds, cfg.cv.val_fraction = 3, 0.0
  cfg.cv.splits_dir = str(tmp_path / "splits")
  cfg.eval.scenarios, cfg.eval.latency, cfg.progress = ("full",), False, False
  cfg.train.batch_size = 8
  cfg.compilation_cache_dir = ""
  cv.run_cv(ToyMethod(modalities=("genomics", "clinical"), epochs=(2, 1)), cohort, cfg,
            tmp_path / "run")
  assert len(calls) == 3
  c_age = list(cohort.modalities["clinical"].columns).index("age")
  for k, (tr, out) in enumerate(calls):
    ages = [float(rows[i][3]) for i in tr if rows[i][3]]
    assert out.modalities["clinical"].values[2, c_age] == pytest.approx(np.median(ages))
    info = json.loads((tmp_path / "run" / f"fold_{k}" / "predict.json").read_text())
    assert info["time_model"] == "cox" and len(info["breslow"]["times"]) > 0
    assert len(info["calibration"]["oof_survival"]) == len(info["oof_case_ids"])


def test_predict_with_a_cox_method_and_gaps(tmp_path):
  """A tabular-only Cox run predicts a gappy cohort: Breslow survival curves, the ensemble
  curve the mean of the fold curves (recomputed from fold_<k>/predict.json), metrics."""
  import copy
  from configs.common import base_config
  from survjax.data import load_cohort
  from survjax.evaluate.cv import run_cv
  from survjax.models import get_method
  from survjax.predict import predict_run
  _write(tmp_path / "train.csv", np.random.default_rng(1), n=40)
  _write(tmp_path / "new.csv", np.random.default_rng(2), n=20)
  cfg = base_config("toy_method")
  with cfg.unlocked():
    cfg.model = {"modalities": ("genomics", "clinical"), "epochs": (2, 1)}
  cfg.data.source = "files"
  cfg.data.files.clinical_csv = str(tmp_path / "train.csv")
  cfg.data.files.tabular = {"clinical": ["age", "grade"]}
  cfg.data.files.impute = "train_mean"
  cfg.cv.num_folds, cfg.cv.val_fraction = 3, 0.0
  cfg.cv.splits_dir = str(tmp_path / "splits")
  cfg.eval.scenarios, cfg.eval.latency, cfg.progress = ("full",), False, False
  cfg.train.batch_size = 8
  cfg.compilation_cache_dir = ""
  run_cv(get_method(cfg), load_cohort(cfg.data), cfg, tmp_path / "run")
  data = copy.deepcopy(cfg.data)
  data.files.clinical_csv = str(tmp_path / "new.csv")
  data.name = "new"
  res = predict_run(cfg, tmp_path / "run", data, bootstrap=20)
  grid = np.asarray(res["survival_times"])
  assert res["time_model"] == "cox" and grid.size > 0 and len(res["patients"]) == 20
  infos = [json.loads((tmp_path / "run" / f"fold_{k}" / "predict.json").read_text())
           for k in range(3)]
  for p in res["patients"]:
    fold_s = []
    for k, info in enumerate(infos):
      b = info["breslow"]
      j = np.searchsorted(b["times"], grid, side="right") - 1
      h0 = np.where(j >= 0, np.asarray(b["cumhaz"])[np.clip(j, 0, None)], 0.0)
      fold_s.append(np.exp(-h0 * np.exp(p["risk"][str(k)])))
    np.testing.assert_allclose(p["survival"], np.mean(fold_s, axis=0), rtol=1e-9)
  m = res["external_validation"]["metrics"]
  assert 0 <= m["c_index"] <= 1 and ("ibs" in m or "ibs_unavailable" in m)
  assert (tmp_path / "run" / "predictions" / "new" / "predictions.csv").is_file()
