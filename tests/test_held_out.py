"""The optional ``held_out`` method hook (`survjax.method`): the CV harness calls it once per
fold with that fold's test patients and aggregates its values into results.json."""

import dataclasses
import json

import numpy as np
import pytest
from flax import nnx

from configs.common import base_config
from survjax.data.synthetic import SyntheticSpec, make_synthetic_cohort
from survjax.evaluate.cv import cohort_folds, run_cv
from survjax.method import cohort_info
from toy_method import ToyMethod


@dataclasses.dataclass
class RecordingToy(ToyMethod):
  """The toy method with a ``held_out`` hook that records what it was given."""
  calls: list = dataclasses.field(default_factory=list)

  def held_out(self, model, cohort, test_idx, train_idx, key):
    self.calls.append((np.array(test_idx), np.array(train_idx),
                       np.asarray(model.head.kernel[...]).copy()))
    g = cohort.modalities["genomics"].values[test_idx]
    return {"genomics_sq/mean": float(np.mean(g ** 2)),
            "n_test": len(test_idx),
            # undefined on a fold (None): left out of the mean, kept as None per fold
            "odd/only": None if len(self.calls) == 2 else float(len(self.calls))}


def test_held_out_hook_gets_each_folds_test_patients_and_is_aggregated(tmp_path):
  cohort = make_synthetic_cohort(SyntheticSpec(n_patients=60, bag_min=8, bag_max=20,
                                               patch_dim=8, unlabelled=0.1))
  c = base_config("toy")
  c.cv.num_folds = 3
  c.cv.splits_dir = str(tmp_path / "splits")
  c.train.batch_size = 16
  c.eval.batch_size = 32
  c.eval.scenarios = ("full",)
  c.eval.latency = False
  c.progress = False
  method = RecordingToy(epochs=(2, 1))
  res = run_cv(method, cohort, c, tmp_path / "run")
  folds, _ = cohort_folds(cohort, c)
  assert len(method.calls) == 3
  for k, ((test_idx, train_idx, head), (tr, va)) in enumerate(zip(method.calls, folds)):
    # the harness builds fold k's model from seed * 1000 + k: the hook sees it trained
    init = np.asarray(method.build(cohort_info(cohort, method.modalities),
                                   nnx.Rngs(c.seed * 1000 + k)).head.kernel[...])
    np.testing.assert_array_equal(test_idx, va)        # that fold's test patients, in order
    np.testing.assert_array_equal(train_idx, tr)
    assert not set(test_idx) & set(train_idx)
    assert np.all(cohort.labelled[test_idx])           # never an unlabelled patient
    assert not np.allclose(head, init)                 # the fold's trained model
  # Per fold: the direct computation on the fold's test patients.
  g = cohort.modalities["genomics"].values
  direct = [float(np.mean(g[va] ** 2)) for _, va in folds]
  on_disk = json.loads((tmp_path / "run" / "results.json").read_text())
  assert on_disk["held_out"] == res["held_out"]
  h = on_disk["held_out"]
  np.testing.assert_allclose(h["genomics_sq/mean"]["per_fold"], direct, rtol=1e-5)
  assert h["genomics_sq/mean"]["mean"] == pytest.approx(np.mean(direct), rel=1e-5)
  assert h["genomics_sq/mean"]["std"] == pytest.approx(np.std(direct), rel=1e-4)
  assert h["n_test"]["per_fold"] == [len(va) for _, va in folds]
  assert h["odd/only"]["per_fold"] == [1.0, None, 3.0]
  assert h["odd/only"]["mean"] == pytest.approx(2.0)
  for k, (_, va) in enumerate(folds):
    fold = json.loads((tmp_path / "run" / f"fold_{k}" / "result.json").read_text())
    assert fold["held_out"]["genomics_sq/mean"] == pytest.approx(direct[k], rel=1e-6)
  report = (tmp_path / "run" / "report.md").read_text()
  assert "## Held-out statistics of the method" in report and "`genomics_sq/mean`" in report


def test_a_method_without_the_hook_reports_no_held_out(tmp_path):
  cohort = make_synthetic_cohort(SyntheticSpec(n_patients=40, bag_min=8, bag_max=20,
                                               patch_dim=8))
  c = base_config("toy")
  c.cv.num_folds = 2
  c.cv.splits_dir = str(tmp_path / "splits")
  c.eval.scenarios = ("full",)
  c.eval.latency = False
  c.progress = False
  res = run_cv(ToyMethod(epochs=(1, 1)), cohort, c, tmp_path / "run")
  assert "held_out" not in res
  assert "Held-out statistics" not in (tmp_path / "run" / "report.md").read_text()


def test_eval_require_evaluates_the_test_patients_that_have_a_modality(tmp_path):
  # impuTMAE's protocol: every patient with RNA, the others naturally missing. Here with
  # genomics: test patients without it drop out of every scenario, training is unchanged.
  import csv
  from survjax.evaluate.metrics import concordance_index
  cohort = make_synthetic_cohort(SyntheticSpec(n_patients=80, bag_min=8, bag_max=20,
                                               patch_dim=8, missing_genomics=0.3,
                                               radiology=True, radiology_dim=8,
                                               missing_radiology=0.3))
  mods = ("pathology", "genomics", "radiology")
  c = base_config("toy")
  c.cv.num_folds = 2
  c.cv.splits_dir = str(tmp_path / "splits")
  c.eval.scenarios = ("full", "missing_pathology")
  c.eval.latency = False
  c.eval.require = ("genomics",)
  c.data.buckets = (16, 64)
  c.progress = False
  run_cv(RecordingToy(modalities=mods, epochs=(2, 1)), cohort, c, tmp_path / "run")
  folds, _ = cohort_folds(cohort, c)
  has = cohort.modalities["genomics"].available
  for k, (_, va) in enumerate(folds):
    keep = va[has[va]]
    assert 0 < len(keep) < len(va)
    fold = json.loads((tmp_path / "run" / f"fold_{k}" / "result.json").read_text())
    assert fold["n_test"] == len(keep)
    with open(tmp_path / "run" / f"fold_{k}" / "risks.csv") as f:
      rows = list(csv.DictReader(f))
    assert [r["case_id"] for r in rows] == list(cohort.case_ids[keep])
    risk = np.array([float(r["full"]) for r in rows])
    c_direct = concordance_index(cohort.time[keep], cohort.event[keep], risk)[0]
    assert fold["scenarios"]["full"]["c_index"] == pytest.approx(c_direct, abs=1e-9)
    # natural missingness of radiology among them counts as withheld in the oracle
    lacking = ~cohort.modalities["radiology"].available[keep]
    assert lacking.any()
    oracle = np.where(lacking, cohort.true_risk["genomics+pathology"][keep],
                      cohort.true_risk["genomics+pathology+radiology"][keep])
    assert fold["scenarios"]["full"]["oracle_c_index"] == pytest.approx(
        concordance_index(cohort.time[keep], cohort.event[keep], oracle)[0], abs=1e-9)
  assert "that have genomics" in (tmp_path / "run" / "report.md").read_text()
  c.eval.require = ("nothing",)
  from survjax.errors import InputError
  with pytest.raises(InputError, match="eval.require names modality 'nothing'"):
    run_cv(RecordingToy(modalities=mods, epochs=(1, 1)), cohort, c, tmp_path / "run2")


def test_a_run_recorded_before_a_synthetic_knob_existed_resumes_at_its_default(tmp_path):
  # Generator knobs are opt-in: a run directory made before one existed made the cohort
  # the knob's default makes now, so it resumes; another value is refused, naming it.
  from survjax import rundir
  from survjax.errors import InputError
  c = base_config("toy")
  fp = {"cohort_fingerprint": "a", "splits_fingerprint": "b"}
  rundir.check_or_record(tmp_path, c, fp)
  (tmp_path / "results.json").write_text("{}")   # the run finished
  recorded = json.loads((tmp_path / "run.json").read_text())
  del recorded["training_config"]["data.synthetic.wsi_tiles"]
  del recorded["training_config"]["data.synthetic.tile_noise"]
  (tmp_path / "run.json").write_text(json.dumps(recorded))
  rundir.check_or_record(tmp_path, c, fp)   # defaults: accepted
  c.data.synthetic.wsi_tiles = True
  with pytest.raises(InputError, match="data.synthetic.wsi_tiles <absent> -> True"):
    rundir.check_or_record(tmp_path, c, fp)
  c.data.synthetic.wsi_tiles = False
  c.model = {"lr": 1.0}   # any other key absent from the record is still a difference
  with pytest.raises(InputError, match="model.lr <absent> -> 1.0"):
    rundir.check_or_record(tmp_path, c, fp)


def test_a_run_directory_with_nothing_trained_takes_the_corrected_config(tmp_path):
  """A start that stopped before its first checkpoint (bad input found mid-run) left
  run.json and nothing trained: the corrected command starts there. Once a checkpoint
  step or a fold result exists, another configuration is refused."""
  from survjax import rundir
  from survjax.errors import InputError
  c = base_config("toy")
  fp = {"cohort_fingerprint": "a", "splits_fingerprint": "b"}
  rundir.check_or_record(tmp_path, c, fp)
  (tmp_path / "fold_0" / "checkpoints" / "3.orbax-checkpoint-tmp").mkdir(parents=True)
  c.train.batch_size = 7
  rundir.check_or_record(tmp_path, c, fp)   # nothing trained: recorded afresh
  recorded = json.loads((tmp_path / "run.json").read_text())
  assert recorded["training_config"]["train.batch_size"] == 7
  for work in ("fold_0/checkpoints/3", "fold_1/result.json"):
    (tmp_path / work).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / work).mkdir() if work.endswith("/3") else (tmp_path / work).write_text("{}")
    c.train.batch_size = 9
    with pytest.raises(InputError, match="train.batch_size 7 -> 9"):
      rundir.check_or_record(tmp_path, c, fp)
    (tmp_path / work).rmdir() if work.endswith("/3") else (tmp_path / work).unlink()
