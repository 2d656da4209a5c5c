"""--mode=predict: a smoke run used on a second cohort in the users' layout (MCAT CSV + h5).

One ABMIL smoke run (3 folds) on a 40-patient file cohort, then a second, labelled
30-patient cohort predicted through the CLI, with attention maps. Checked against
independent references: the ensemble risk is recomputed from the fold risks and the
out-of-fold risks the CV harness wrote to ``fold_<k>/risks.csv``; the C-index against
scikit-survival; attention coordinates against the coordinates the fixture wrote. Bad
inputs (unknown run, other feature dimension, a modality the run never saw) each give one
line on stderr, exit status 2 and no output.
"""

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from file_cohort import write_file_cohort

REPO = Path(__file__).resolve().parents[1]

CONFIG = '''"""ABMIL smoke on a files cohort (test config)."""
from configs.abmil import get_config as _base


def get_config(variant=""):
  c = _base(variant)
  c.data.source = "files"
  c.data.files.clinical_csv = {csv!r}
  c.data.files.features_dir = {features!r}
  c.data.files.signatures_csv = {signatures!r}
  c.eval.scenarios = ("full",)
  c.eval.latency = False
  c.progress = False
  return c
'''


def _cli(args, expect=0):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
  out = subprocess.run([sys.executable, "-m", "survjax.main", *args], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=600)
  assert out.returncode == expect, out.stderr[-3000:]
  return out


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  root = tmp_path_factory.mktemp("predict")
  c = write_file_cohort(root / "train", n_patients=40, dim=16, bag=(20, 60), seed=0)
  cfg = root / "config.py"
  cfg.write_text(CONFIG.format(csv=str(c["csv"]), features=str(c["features"]),
                               signatures=str(c["signatures"])))
  work = root / "run"
  config = [f"--config={cfg}:smoke", f"--workdir={work}",
            f"--config.cv.splits_dir={root / 'splits'}"]
  _cli(config)
  return {"root": root, "config": config, "work": work}


def _read_csv(path):
  with open(path, newline="") as f:
    return list(csv.DictReader(f))


def test_training_report_plots(run):
  """The CV report: KM groups from training-fold cut-offs, calibration, C-index dots."""
  work = run["work"]
  results = json.loads((work / "results.json").read_text())
  report = (work / "report.md").read_text()
  assert (work / "cindex_folds.png").stat().st_size > 1000 and "cindex_folds.png" in report
  assert (work / "km_full.png").stat().st_size > 1000
  cal = results["calibration"]
  assert sum(g["n"] for g in cal["groups"]) == 40 and len(cal["groups"]) == 10
  preds = [g["predicted"] for g in cal["groups"]]
  assert preds == sorted(preds) and all(0 <= p <= 1 for p in preds)
  assert "Kaplan-Meier S(t)" in report and (work / "calibration.png").stat().st_size > 1000
  # The log-rank p of the KM figure: held-out risks split at the training-fold median.
  from survjax.evaluate.km import split_logrank
  t, e, high = [], [], []
  for k in range(3):
    info = json.loads((work / f"fold_{k}" / "predict.json").read_text())
    for x in _read_csv(work / f"fold_{k}" / "risks.csv"):
      t.append(float(x["time"]))
      e.append(x["event"] == "1")
      high.append(float(x["full"]) > info["train_cutoff"]["full"])
  p = split_logrank(np.array(t), np.array(e), np.array(high))["p_value"]
  assert results["scenarios"]["full"]["km_logrank_p"] == pytest.approx(p, rel=1e-4)


def test_predict_second_cohort(run):
  root, work = run["root"], run["work"]
  new = write_file_cohort(root / "external", n_patients=30, dim=16, bag=(20, 60), seed=1)
  out = root / "external_out"
  res = _cli(run["config"] + [
      "--mode=predict", f"--predict.clinical_csv={new['csv']}",
      f"--predict.features_dir={new['features']}",
      f"--predict.signatures_csv={new['signatures']}", f"--predict.out={out}",
      "--predict.attention=true", "--predict.bootstrap=50"])
  assert "C-index (Harrell)" in res.stdout
  rows = _read_csv(out / "predictions.csv")
  meta = json.loads((out / "predictions.json").read_text())
  assert [r["case_id"] for r in rows] == new["case_ids"]          # every patient, in order
  assert meta["folds"] == [0, 1, 2] and len(meta["patients"]) == 30
  assert all(r["present_pathology"] == "1" for r in rows)

  # The training-side statistics, recomputed from what the CV harness wrote per fold.
  pooled = []
  stats = {}
  for k in range(3):
    oof = _read_csv(work / f"fold_{k}" / "risks.csv")
    r = np.array([float(x["full"]) for x in oof])
    info = json.loads((work / f"fold_{k}" / "predict.json").read_text())
    assert info["oof_case_ids"] == [x["case_id"] for x in oof]
    np.testing.assert_allclose(info["oof_risk"], r, rtol=1e-6)    # same model, same data
    stats[k] = (r.mean(), r.std())
    pooled.append((r - r.mean()) / r.std())
  cutoff = np.median(np.concatenate(pooled))
  assert meta["cutoff"]["ensemble"] == pytest.approx(cutoff, abs=1e-5)  # risks.csv: 8 digits
  fold_risk = np.array([[float(x[f"risk_fold{k}"]) for k in range(3)] for x in rows])
  expected = np.mean([(fold_risk[:, k] - stats[k][0]) / stats[k][1] for k in range(3)], axis=0)
  ens = np.array([float(x["risk_ensemble"]) for x in rows])
  np.testing.assert_allclose(ens, expected, rtol=1e-5, atol=1e-6)
  assert [x["risk_group"] for x in rows] == ["high" if e > cutoff else "low" for e in ens]

  # Survival curves at the bin edges: probabilities, non-increasing in time.
  s_cols = [c for c in rows[0] if c.startswith("S(")]
  assert s_cols
  s = np.array([[float(x[c]) for c in s_cols] for x in rows])
  assert ((s >= 0) & (s <= 1)).all() and (np.diff(s, axis=1) <= 1e-7).all()

  # External validation: Harrell's C of the ensemble equals scikit-survival's.
  from sksurv.metrics import concordance_index_censored
  t = np.array([float(x["time"]) for x in rows])
  e = np.array([x["event"] == "1" for x in rows])
  ev = meta["external_validation"]
  assert ev["metrics"]["c_index"] == pytest.approx(
      concordance_index_censored(e, t, ens)[0], abs=1e-9)
  lo, hi = ev["bootstrap_ci95"]["c_index"]
  assert lo <= ev["metrics"]["c_index"] <= hi
  for key in ("uno_c", "ibs", "td_auc_mean"):
    assert key in ev["metrics"], ev["metrics"]
  assert (out / "km_external.png").stat().st_size > 1000
  report = (out / "report.md").read_text()
  assert "C-index (Harrell)" in report and "km_external.png" in report

  # Attention maps, CLAM layout: scores sum to one over a one-slide case's patches, the
  # coordinates are those of the slide's .h5 file.
  att = out / "attention"
  one_slide = [c for c in new["case_ids"] if len(new["slides"][c]) == 1]
  checked_coords = 0
  for cid in one_slide:
    sid = new["slides"][cid][0]
    with h5py.File(att / f"{sid}_attention.h5", "r") as h:
      scores, coords = h["scores"][()], h["coords"][()]
    assert scores.sum() == pytest.approx(1.0, abs=1e-5) and (scores > 0).all()
    src = new["files"][sid]
    if src.suffix == ".h5":
      with h5py.File(src, "r") as h:
        np.testing.assert_array_equal(coords, h["coords"][()])
      checked_coords += 1
    else:
      assert len(coords) == len(np.load(src))
  assert checked_coords > 0
  two = [c for c in new["case_ids"] if len(new["slides"][c]) == 2][0]
  total = 0.0
  for sid in new["slides"][two]:
    with h5py.File(att / f"{sid}_attention.h5", "r") as h:
      total += h["scores"][()].sum()
  assert total == pytest.approx(1.0, abs=1e-5)

  # The renderer: a PNG from one attention file.
  png = root / "heat.png"
  r = subprocess.run([sys.executable, "-m", "survjax.heatmap",
                      str(att / f"{new['slides'][one_slide[0]][0]}_attention.h5"),
                      "--out", str(png)], cwd=REPO, capture_output=True, text=True,
                     timeout=120)
  assert r.returncode == 0, r.stderr
  assert png.stat().st_size > 1000


def test_predict_bad_inputs_one_line_exit_2(run):
  root = run["root"]
  new = write_file_cohort(root / "bad_dim", n_patients=12, dim=12, bag=(10, 20), seed=3)
  rad = root / "radiology"
  rad.mkdir()
  for cid in new["case_ids"][:4]:
    np.save(rad / f"{cid}.npy", np.ones((3, 5), np.float32))
  files = [f"--predict.clinical_csv={new['csv']}", f"--predict.features_dir={new['features']}",
           f"--predict.signatures_csv={new['signatures']}"]
  censored = write_file_cohort(root / "censored", n_patients=12, dim=16, bag=(10, 20), seed=5)
  with open(censored["csv"], newline="") as f:
    rows = list(csv.reader(f))
  col = rows[0].index("censorship")
  for row in rows[1:]:
    row[col] = "1"
  with open(censored["csv"], "w", newline="") as f:
    csv.writer(f, lineterminator="\n").writerows(rows)
  censored_files = [f"--predict.clinical_csv={censored['csv']}",
              f"--predict.features_dir={censored['features']}",
              f"--predict.signatures_csv={censored['signatures']}"]
  good = write_file_cohort(root / "good", n_patients=12, dim=16, bag=(10, 20), seed=6)
  good_files = [f"--predict.clinical_csv={good['csv']}",
                f"--predict.features_dir={good['features']}",
                f"--predict.signatures_csv={good['signatures']}"]
  cases = {
      "unknown run": (["--workdir=" + str(root / "nowhere")], files, "no trained run"),
      "feature dimension": ([], files, "feature dimension 12"),
      "modality never seen": ([], files[:1] + [f"--predict.radiology_dir={rad}"],
                              "'radiology' was not in the training cohort"),
      # found before any fold predicts, naming the table, and no output folder made
      "no event to validate on": ([], censored_files, f"{censored['csv']}: 12 labelled patient(s) "
                                                "with 0 event(s)"),
      "name with a path": ([], censored_files + ["--predict.name=../escaped"],
                           "--predict.name: cohort name '../escaped' is a path"),
      "negative bootstrap": ([], censored_files + ["--predict.bootstrap=-5"],
                             "--predict.bootstrap: -5 resamples, expected an integer >= 0"),
      "damaged predict.json": ([f"--workdir={root / 'damaged'}"], good_files,
                               "predict.json: cannot read it"),
  }
  shutil.copytree(run["work"], root / "damaged")
  (root / "damaged" / "fold_0" / "predict.json").write_text("{")
  for name, (extra, pred, needle) in cases.items():
    out = root / f"out_{name.replace(' ', '_')}"
    args = run["config"] + extra + ["--mode=predict", f"--predict.out={out}"] + pred
    if name == "modality never seen":
      ok = write_file_cohort(root / "ok_dim", n_patients=12, dim=16, bag=(10, 20), seed=4)
      args = run["config"] + ["--mode=predict", f"--predict.out={out}",
                              f"--predict.clinical_csv={ok['csv']}",
                              f"--predict.features_dir={ok['features']}",
                              f"--predict.signatures_csv={ok['signatures']}",
                              f"--predict.radiology_dir={rad}"]
      for cid in ok["case_ids"][:4]:
        np.save(rad / f"{cid}.npy", np.ones((3, 5), np.float32))
    res = _cli(args, expect=2)
    lines = [x for x in res.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and needle in lines[0], (name, res.stderr)
    assert not out.exists(), name


def test_breslow_matches_sksurv():
  from sksurv.linear_model.coxph import BreslowEstimator
  from survjax.predict import breslow
  rng = np.random.default_rng(0)
  t = np.round(rng.exponential(10, 50), 1) + 0.1   # with ties
  e = rng.uniform(size=50) < 0.7
  r = rng.normal(size=50)
  ref = BreslowEstimator().fit(r, e, t)
  ours = breslow(t, e, r)
  h = ref.cum_baseline_hazard_
  np.testing.assert_allclose(ours["cumhaz"], h(np.asarray(ours["times"])), rtol=1e-10)


def test_attention_padding_gets_none():
  import jax.numpy as jnp
  import ml_collections
  from flax import nnx
  from survjax.models.baselines import ABMILModel, Unimodal
  cfg = ml_collections.ConfigDict(dict(dim=8, num_bins=4))
  method = Unimodal(name="abmil", modality="pathology", cfg=cfg)
  model = ABMILModel(5, cfg, rngs=nnx.Rngs(0))
  x = np.random.default_rng(0).normal(size=(2, 7, 5)).astype(np.float16)
  mask = np.array([[1] * 4 + [0] * 3, [1] * 7], bool)
  att = method.attention(model, {"modalities": {"pathology": {"x": jnp.asarray(x),
                                                              "mask": jnp.asarray(mask)}}})
  a = np.asarray(att["pathology"])
  assert (a[~mask] == 0).all()
  np.testing.assert_allclose(a.sum(axis=1), 1.0, rtol=1e-6)
  assert Unimodal(name="snn", modality="genomics", cfg=cfg).attention is None


def test_predict_unlabelled_cohort(run):
  """A CSV without survival columns: predictions for everyone, no validation report."""
  root = run["root"]
  new = write_file_cohort(root / "unlabelled", n_patients=10, dim=16, bag=(10, 30), seed=5)
  with open(new["csv"], newline="") as f:
    rows = list(csv.reader(f))
  drop = {rows[0].index("survival_months"), rows[0].index("censorship")}
  with open(new["csv"], "w", newline="") as f:
    csv.writer(f, lineterminator="\n").writerows(
        [[v for j, v in enumerate(r) if j not in drop] for r in rows])
  out = root / "unlabelled_out"
  _cli(run["config"] + ["--mode=predict", f"--predict.out={out}",
                        f"--predict.clinical_csv={new['csv']}",
                        f"--predict.features_dir={new['features']}",
                        f"--predict.signatures_csv={new['signatures']}"])
  pred = _read_csv(out / "predictions.csv")
  assert [r["case_id"] for r in pred] == new["case_ids"] and "time" not in pred[0]
  assert {r["risk_group"] for r in pred} <= {"high", "low"}
  assert not (out / "report.md").exists() and not (out / "km_external.png").exists()
  assert "external_validation" not in json.loads((out / "predictions.json").read_text())


def test_predict_ignores_a_modality_the_method_does_not_read(run):
  """ABMIL reads pathology only: a new cohort's genomics of another layout (two genes per
  family, not three) is dropped, and the predictions equal those made without it."""
  root = run["root"]
  new = write_file_cohort(root / "other_genes", n_patients=12, dim=16, bag=(10, 20), seed=7,
                          genes_per_family=2)
  files = [f"--predict.clinical_csv={new['csv']}", f"--predict.features_dir={new['features']}"]
  outs = {}
  for name, extra in (("with", [f"--predict.signatures_csv={new['signatures']}"]),
                      ("without", [])):
    outs[name] = root / f"other_genes_{name}"
    _cli(run["config"] + ["--mode=predict", f"--predict.out={outs[name]}"] + files + extra)
  got, want = (_read_csv(outs[k] / "predictions.csv") for k in ("with", "without"))
  assert [r["case_id"] for r in got] == new["case_ids"]
  assert got == want
  notes = json.loads((outs["with"] / "predictions.json").read_text())["notes"]
  assert notes == ["the new cohort's genomics is not read by abmil: ignored"]
