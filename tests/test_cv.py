"""Evaluation harness and CLI: the results.json contract, resume after a real kill, errors."""

import json
import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from configs.common import base_config
from survjax.data.synthetic import SyntheticSpec, make_synthetic_cohort
from survjax.evaluate.cv import run_cv
from toy_method import ToyMethod

REPO = Path(__file__).resolve().parents[1]


def _config(tmp_path):
  c = base_config("toy")
  c.cv.num_folds = 3
  c.cv.splits_dir = str(tmp_path / "splits")
  c.train.batch_size = 16
  c.train.max_instances = 32
  c.eval.batch_size = 32
  c.eval.scenarios = ("auto", "missing_50pct_mixed")
  c.progress = False
  return c


def test_cross_validation_writes_the_contract(tmp_path):
  cohort = make_synthetic_cohort(SyntheticSpec(n_patients=90, bag_min=20, bag_max=60,
                                               patch_dim=8))
  res = run_cv(ToyMethod(epochs=(6, 2)), cohort, _config(tmp_path), tmp_path / "run")
  on_disk = json.loads((tmp_path / "run" / "results.json").read_text())
  assert on_disk["scenarios"] == res["scenarios"]
  assert on_disk["method"] == "toy" and on_disk["n_patients"] == 90 and on_disk["folds"] == 3
  for name in ("full", "missing_pathology", "missing_genomics", "missing_50pct_mixed"):
    s = on_disk["scenarios"][name]
    assert len(s["per_fold"]) == 3
    assert s["c_index_mean"] == pytest.approx(np.mean(s["per_fold"]), abs=1e-4)
    assert s["c_index_std"] == pytest.approx(np.std(s["per_fold"]), abs=1e-4)
    assert 0.5 < s["oracle_c_index"] < 1.0
    if "pct" not in name:
      assert (tmp_path / "run" / f"km_{name}.png").stat().st_size > 1000
  assert on_disk["scenarios"]["full"]["c_index_mean"] > 0.6  # the toy learns something
  assert "timing" in on_disk and "config" in on_disk
  env = on_disk["environment"]   # what a bit-for-bit rerun needs to match
  assert env["packages"]["jax"] == jax.__version__ and env["packages"]["numpy"] == np.__version__
  assert env["python"] == platform.python_version() and env["cpu_model"]
  for k in range(3):
    assert json.loads((tmp_path / "run" / f"fold_{k}" / "result.json").read_text())[
        "environment"] == env
  report = (tmp_path / "run" / "report.md").read_text()
  assert "| `full` |" in report and "km_full.png" in report
  risks = (tmp_path / "run" / "fold_0" / "risks.csv").read_text().splitlines()
  assert risks[0].startswith("case_id,time,event,full,")
  assert len(risks) - 1 == json.loads((tmp_path / "run" / "fold_0" / "result.json").read_text())["n_test"]
  # Three folds, one bucket each: one trace per stage; prediction once per pattern x bucket.
  t = on_disk["timing"]["train_traces"]
  assert t["step:a"] == 1 and t["step:b"] == 1
  assert on_disk["timing"]["predict_traces"] <= 3 * 2 + 3


def test_folds_run_in_different_environments_are_listed_per_fold():
  from survjax.environment import environment
  from survjax.evaluate.report import _environment
  a = environment()
  b = dict(a, packages=dict(a["packages"], numpy="0.0"))
  assert _environment([{"environment": a}, {"environment": dict(a)}]) == a
  assert _environment([{"environment": a}, {"environment": b}]) == {"per_fold": [a, b]}
  assert _environment([{}, {"environment": a}]) == {"per_fold": [None, a]}


def _cli(args, cwd, **kw):
  env = dict(os.environ, PYTHONUNBUFFERED="1", JAX_PLATFORMS="cpu")
  return subprocess.Popen([sys.executable, "-m", "survjax.main", *args], cwd=cwd, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def test_unknown_config_key_is_one_line_and_status_2(tmp_path):
  p = _cli([f"--config={REPO}/configs/snn.py:smoke", "--config.train.epochz=3",
            f"--workdir={tmp_path}/w"], cwd=REPO)
  out, err = p.communicate(timeout=120)
  assert p.returncode == 2
  assert len(err.strip().splitlines()) == 1 and "epochz" in err
  assert not (tmp_path / "w").exists()


def _smoke_args(workdir, splits):
  return [f"--config={REPO}/configs/snn.py:smoke", f"--workdir={workdir}",
          f"--config.cv.splits_dir={splits}", "--config.progress=False",
          "--config.model.epochs=6", "--config.eval.latency=False"]


def _comparable(path):
  r = json.loads(Path(path).read_text())
  r.pop("timing"); r.pop("finished")
  r["config"].pop("progress", None)
  return r


@pytest.fixture(scope="module")
def uninterrupted_run(tmp_path_factory):
  """The smoke run done in one go: the reference for the interrupted runs."""
  root = tmp_path_factory.mktemp("ref")
  ref = _cli(_smoke_args(root / "ref", root / "splits"), cwd=REPO)
  out, err = ref.communicate(timeout=600)
  assert ref.returncode == 0, err
  return root


def _assert_nothing_half_written(run):
  """After a kill: no results/report, no temporary files; what is there is complete."""
  assert not (run / "results.json").exists() and not (run / "report.md").exists()
  tmp = [p for p in run.rglob("*.tmp")]
  assert not tmp, tmp
  for result in run.glob("fold_*/result.json"):
    fold = json.loads(result.read_text())
    risks = (result.parent / "risks.csv").read_text().splitlines()
    assert len(risks) == fold["n_test"] + 1


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_killed_run_resumes_to_identical_results(tmp_path, uninterrupted_run, sig):
  splits = uninterrupted_run / "splits"
  run = tmp_path / "run"
  p = _cli(_smoke_args(run, splits), cwd=REPO)
  deadline = time.time() + 300
  # Kill once fold 1 has a checkpoint: fold 0 done, fold 1 midway. SIGKILL allows no
  # clean-up at all; SIGTERM unwinds as an exception (status 143).
  while time.time() < deadline and not list((run / "fold_1" / "checkpoints").glob("[0-9]*")):
    time.sleep(0.05)
  p.send_signal(sig)
  out, err = p.communicate(timeout=120)
  assert p.returncode == (-signal.SIGKILL if sig == signal.SIGKILL else 128 + signal.SIGTERM), err
  if sig == signal.SIGTERM:
    _assert_nothing_half_written(run)
  assert not (run / "results.json").exists()
  assert (run / "fold_0" / "result.json").exists()
  again = _cli(_smoke_args(run, splits), cwd=REPO)
  out, err = again.communicate(timeout=600)
  assert again.returncode == 0, err
  ref = uninterrupted_run / "ref"
  assert _comparable(run / "results.json") == _comparable(ref / "results.json")
  for k in range(3):
    assert (run / f"fold_{k}" / "risks.csv").read_text() == \
        (ref / f"fold_{k}" / "risks.csv").read_text()


def test_a_new_method_is_one_module_and_one_config(tmp_path):
  """tests/toy_method.py (with make) + tests/toy_config.py: cross-validated from the CLI."""
  env = dict(os.environ, PYTHONPATH=f"{REPO / 'tests'}{os.pathsep}{REPO}", JAX_PLATFORMS="cpu")
  p = subprocess.run([sys.executable, "-m", "survjax.main", f"--config={REPO}/tests/toy_config.py",
                      f"--workdir={tmp_path}/run", f"--config.cv.splits_dir={tmp_path}/splits",
                      "--config.eval.latency=False"],
                     cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
  assert p.returncode == 0, p.stderr
  res = json.loads((tmp_path / "run" / "results.json").read_text())
  assert res["method"] == "toy" and res["folds"] == 3
  assert set(res["scenarios"]) == {"full", "missing_pathology", "missing_genomics",
                                   "missing_30pct_genomics"}
  assert res["scenarios"]["full"]["c_index_mean"] > 0.6
  assert len(res["cohort_fingerprint"]) == len(res["splits_fingerprint"]) == 12


def test_unknown_method_is_one_line_listing_the_available_ones(tmp_path):
  p = _cli([f"--config={REPO}/configs/snn.py:smoke", "--config.method=nosuchmethod",
            f"--workdir={tmp_path}/w"], cwd=REPO)
  out, err = p.communicate(timeout=120)
  assert p.returncode == 2
  assert len(err.strip().splitlines()) == 1
  assert "nosuchmethod" in err and "must" in err and "abmil" in err
  assert not (tmp_path / "w").exists()


def test_unlabelled_patients_train_self_supervised_stages_only(tmp_path):
  """Patients without a label are in no fold and no metric; a stage with labels=False
  trains on them too, a survival stage does not."""
  from survjax.method import Stage
  from survjax.train.sharding import make_mesh
  from survjax.train.trainer import Trainer
  from survjax.evaluate.cv import cohort_folds

  cohort = make_synthetic_cohort(SyntheticSpec(n_patients=90, bag_min=20, bag_max=60,
                                               patch_dim=8, unlabelled=0.3))
  unlabelled = np.flatnonzero(~cohort.labelled)
  assert 15 < len(unlabelled) < 40 and not cohort.event[unlabelled].any()
  c = _config(tmp_path)
  folds, fp = cohort_folds(cohort, c)
  held_out = np.concatenate([va for _, va in folds])
  assert sorted(held_out) == sorted(np.flatnonzero(cohort.labelled))
  assert not set(unlabelled) & set(np.concatenate([tr for tr, _ in folds]))
  method = ToyMethod()
  trainer = Trainer(method, mesh=make_mesh(1), batch_size=16, max_instances=32)
  tr = folds[0][0]
  ssl = Stage("ssl", None, None, epochs=1, labels=False)
  surv = Stage("surv", None, None, epochs=1)
  assert sorted(trainer.stage_patients(ssl, cohort, tr)) == sorted(set(tr) | set(unlabelled))
  assert list(trainer.stage_patients(surv, cohort, tr)) == list(tr)
  res = run_cv(method, cohort, c, tmp_path / "run")
  assert res["n_patients"] == 90
  risks = (tmp_path / "run" / "fold_0" / "risks.csv").read_text().splitlines()[1:]
  assert not {r.split(",")[0] for r in risks} & set(cohort.case_ids[unlabelled])


def test_stage_bag_cap_overrides_the_runs(tmp_path):
  """Stage.max_instances: None = the run's cap, 0 = whole bags, n = n instances."""
  import dataclasses
  from survjax.method import Stage
  from survjax.train.sharding import make_mesh
  from survjax.train.trainer import Trainer

  trainer = Trainer(ToyMethod(), mesh=make_mesh(1), batch_size=4, max_instances=32)
  s = Stage("x", None, None, epochs=1)
  assert trainer._batch_spec(s).max_instances == 32
  assert trainer._batch_spec(dataclasses.replace(s, max_instances=0)).max_instances is None
  assert trainer._batch_spec(dataclasses.replace(s, max_instances=8)).max_instances == 8
  # And the batches the stage trains on have that shape.
  seen = []

  class Recording(ToyMethod):
    def stages(self):
      out = super().stages()
      loss = out[0].loss_fn

      def spy(model, batch, key):
        seen.append(batch["modalities"]["pathology"]["x"].shape[1])
        return loss(model, batch, key)
      return [dataclasses.replace(out[0], loss_fn=spy, max_instances=0),
              dataclasses.replace(out[1], max_instances=8)]

  cohort = make_synthetic_cohort(SyntheticSpec(n_patients=40, bag_min=100, bag_max=200,
                                               patch_dim=8))
  t = Trainer(Recording(epochs=(1, 1)), mesh=make_mesh(1), batch_size=8, max_instances=32)
  model = t.method.build({k: {"dim": cohort.modalities[k].dim} for k in ("pathology", "genomics")},
                         __import__("flax").nnx.Rngs(0))
  t.fit(model, cohort, np.arange(40))
  assert set(seen) == {256}   # whole bags of 100-200 patches: the 256 bucket, traced once


def test_oracle_sees_only_what_each_patient_has(tmp_path):
  """With natural missingness the 'full' oracle of a patient without pathology is the
  expectation given genomics alone."""
  from survjax.evaluate.metrics import concordance_index
  cohort = make_synthetic_cohort(SyntheticSpec(n_patients=90, bag_min=20, bag_max=60,
                                               patch_dim=8, missing_pathology=0.4))
  c = _config(tmp_path)
  c.cv.folds = (0,)
  c.eval.scenarios = ("full",)
  c.eval.latency = False
  run_cv(ToyMethod(epochs=(1, 0)), cohort, c, tmp_path / "run")
  fold = json.loads((tmp_path / "run" / "fold_0" / "result.json").read_text())
  ids = [r.split(",")[0] for r in
         (tmp_path / "run" / "fold_0" / "risks.csv").read_text().splitlines()[1:]]
  va = np.array([np.flatnonzero(cohort.case_ids == i)[0] for i in ids])
  has_p = cohort.modalities["pathology"].available[va]
  assert 0 < has_p.sum() < len(va)
  want = np.where(has_p, cohort.true_risk["genomics+pathology"][va], cohort.true_risk["genomics"][va])
  assert fold["scenarios"]["full"]["oracle_c_index"] == pytest.approx(
      concordance_index(cohort.time[va], cohort.event[va], want)[0], abs=1e-12)
