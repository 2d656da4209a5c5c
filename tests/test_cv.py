"""Evaluation harness and CLI: the results.json contract, resume after a real kill, errors."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

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
  report = (tmp_path / "run" / "report.md").read_text()
  assert "| `full` |" in report and "km_full.png" in report
  risks = (tmp_path / "run" / "fold_0" / "risks.csv").read_text().splitlines()
  assert risks[0].startswith("case_id,time,event,full,")
  assert len(risks) - 1 == json.loads((tmp_path / "run" / "fold_0" / "result.json").read_text())["n_test"]
  # Three folds, one bucket each: one trace per stage; prediction once per pattern x bucket.
  t = on_disk["timing"]["train_traces"]
  assert t["step:a"] == 1 and t["step:b"] == 1
  assert on_disk["timing"]["predict_traces"] <= 3 * 2 + 3


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
