"""A real-format cohort end to end through the CLI: files vs tfds build, and determinism.

The cohort (`file_cohort.write_file_cohort`): 40 patients, MCAT clinical CSV with the six
gene families in a signatures CSV, 20-60 patches of dimension 16 per slide in .h5 (CLAM
layout, some under ``h5_files/``) and .npy files, several cases with two slides; a
clinical tabular modality (age, sex, oncotree code) declared in a config file.

float16: the tfds build stores patch features as float16, and so does the files path:
`survjax.data.formats.read_features` returns float16, the host format of every bag. The
fixture therefore writes arbitrary float32 features; both paths round them to float16 the
same way, and the two cohorts are bit-identical before training starts (checked below),
so no float16-representable fixture is needed.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from file_cohort import write_file_cohort

REPO = Path(__file__).resolve().parents[1]

CONFIG = '''"""ABMIL smoke on a files cohort with a clinical tabular modality (test config)."""
from configs.abmil import get_config as _base


def get_config(variant=""):
  c = _base(variant)
  c.data.source = "files"
  c.data.files.clinical_csv = {csv!r}
  c.data.files.features_dir = {features!r}
  c.data.files.signatures_csv = {signatures!r}
  c.data.files.tabular = {{"clinical": ["age", "is_female", "oncotree_code"]}}
  c.eval.reference_models = ("coxph", "rsf")
  c.eval.scenarios = ("full",)
  c.eval.latency = False
  c.progress = False
  return c
'''


def _cli(args, module="survjax.main"):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
  out = subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  return out


def _comparable(workdir):
  """results.json without the fields that legitimately differ between runs."""
  r = json.loads((Path(workdir) / "results.json").read_text())
  r.pop("timing")
  r.pop("finished")
  return r


def _risks(workdir, folds=3):
  return [(Path(workdir) / f"fold_{k}" / "risks.csv").read_text() for k in range(folds)]


def _fold_records(workdir, folds=3):
  """Each fold's result.json (unrounded C-index per fold) without its timings."""
  out = []
  for k in range(folds):
    f = json.loads((Path(workdir) / f"fold_{k}" / "result.json").read_text())
    f.pop("timing")
    for v in f.get("reference", {}).values():
      v.pop("fit_s")
    out.append(f)
  return out


@pytest.fixture(scope="module")
def cohort_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp("e2e")
  c = write_file_cohort(root / "cohort", n_patients=40, dim=16, bag=(20, 60), seed=0)
  cfg = root / "files_config.py"
  cfg.write_text(CONFIG.format(csv=str(c["csv"]), features=str(c["features"]),
                               signatures=str(c["signatures"])))
  return {"root": root, "cohort": c, "config": cfg}


@pytest.fixture(scope="module")
def files_run(cohort_dir):
  root = cohort_dir["root"]
  work = root / "files_run"
  _cli([f"--config={cohort_dir['config']}:smoke", f"--workdir={work}",
        f"--config.cv.splits_dir={root / 'splits_a'}"])
  return work


@pytest.mark.slow
def test_files_run_writes_the_contract(files_run, cohort_dir):
  r = json.loads((files_run / "results.json").read_text())
  assert r["method"] == "abmil" and r["dataset"] == "cohort"
  assert r["n_patients"] == 40 and r["folds"] == 3
  assert list(r["scenarios"]) == ["full"] and len(r["scenarios"]["full"]["per_fold"]) == 3
  assert [x["model"] for x in r["reference_rows"]] == ["CoxPH (sksurv)", "RSF (sksurv)"]
  assert "| CoxPH (sksurv) | `full` |" in (files_run / "report.md").read_text()
  for k in range(3):
    assert (cohort_dir["root"] / "splits_a" / "cohort" / f"splits_{k}.csv").is_file()


@pytest.mark.slow
def test_tfds_build_gives_identical_results(files_run, cohort_dir):
  from survjax.data.formats import load_file_cohort
  from survjax.data.tfds_builder import load_tfds_cohort
  from test_tfds import assert_cohorts_identical
  root, c = cohort_dir["root"], cohort_dir["cohort"]
  data = root / "tfds"
  _cli([f"--clinical_csv={c['csv']}", f"--features_dir={c['features']}",
        f"--signatures_csv={c['signatures']}",
        '--tabular={"clinical": ["age", "is_female", "oncotree_code"]}',
        f"--data_dir={data}", "--name=cohort"], module="survjax.data.prepare")
  from_files = load_file_cohort(c["csv"], name="cohort", features_dir=c["features"],
                                signatures_csv=c["signatures"],
                                tabular={"clinical": ["age", "is_female", "oncotree_code"]})
  assert from_files.modalities["pathology"].bags[0].dtype == np.float16
  assert_cohorts_identical(load_tfds_cohort(data, "cohort"), from_files)
  work = root / "tfds_run"
  # Same config file, data switched to the build; its own (fresh) splits directory.
  _cli([f"--config={cohort_dir['config']}:smoke", f"--workdir={work}",
        f"--config.cv.splits_dir={root / 'splits_b'}", "--config.data.source=tfds",
        f"--config.data.tfds.data_dir={data}", "--config.data.tfds.name=cohort"])
  a, b = _comparable(files_run), _comparable(work)
  assert a["config"]["data"]["source"] == "files" and b["config"]["data"]["source"] == "tfds"
  a.pop("config"), b.pop("config")
  assert a == b  # scenarios (per-fold C-index), reference rows, diagnostics: bit-identical
  assert _fold_records(work) == _fold_records(files_run)  # unrounded C-index per fold
  assert _risks(work) == _risks(files_run)
  for k in range(3):
    assert (root / "splits_a" / "cohort" / f"splits_{k}.csv").read_bytes() == \
        (root / "splits_b" / "cohort" / f"splits_{k}.csv").read_bytes()


@pytest.mark.slow
def test_same_command_twice_is_bit_identical(files_run, cohort_dir):
  root = cohort_dir["root"]
  work = root / "files_run_again"
  _cli([f"--config={cohort_dir['config']}:smoke", f"--workdir={work}",
        f"--config.cv.splits_dir={root / 'splits_c'}"])
  a, b = _comparable(files_run), _comparable(work)
  a["config"]["cv"].pop("splits_dir"), b["config"]["cv"].pop("splits_dir")
  assert a == b
  assert _fold_records(work) == _fold_records(files_run)
  assert _risks(work) == _risks(files_run)


@pytest.mark.slow
def test_multimodal_method_files_vs_tfds_in_process(tmp_path):
  """Two modalities (pathology + genomics) and every missing-modality scenario.

  In process with the toy method (a CLI run of MUST's smoke config takes about a minute
  here): the cohort read from files and the same cohort read back from its tfds build
  give identical fold results and risks.
  """
  from configs.common import base_config
  from survjax.data.formats import load_file_cohort
  from survjax.data.tfds_builder import build_tfds_cohort, load_tfds_cohort
  from survjax.evaluate.cv import run_cv
  from toy_method import ToyMethod
  c = write_file_cohort(tmp_path / "cohort", n_patients=40, dim=16, bag=(20, 60), seed=2)
  files = load_file_cohort(c["csv"], name="mm", features_dir=c["features"],
                           signatures_csv=c["signatures"])
  build_tfds_cohort(files, tmp_path / "tfds")
  built = load_tfds_cohort(tmp_path / "tfds", "mm")
  cfg = base_config("toy")
  cfg.cv.num_folds = 3
  cfg.cv.splits_dir = str(tmp_path / "splits")
  cfg.train.batch_size = 16
  cfg.train.max_instances = 32
  cfg.eval.scenarios = ("auto", "missing_50pct_mixed")
  cfg.eval.latency = False
  cfg.eval.reference_models = ("coxph",)
  cfg.progress = False
  res = [run_cv(ToyMethod(epochs=(3, 1)), cohort, cfg, tmp_path / name)
         for name, cohort in (("files", files), ("tfds", built))]
  assert list(res[0]["scenarios"]) == ["full", "missing_pathology", "missing_genomics",
                                       "missing_50pct_mixed"]
  assert res[0]["scenarios"] == res[1]["scenarios"]
  assert res[0]["reference_rows"] == res[1]["reference_rows"]
  assert _fold_records(tmp_path / "files") == _fold_records(tmp_path / "tfds")
  assert _risks(tmp_path / "files") == _risks(tmp_path / "tfds")
