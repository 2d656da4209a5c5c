"""The protocol around every number: run directories that cannot mix configurations,
one run per directory, folds bound to their cohort, epochs chosen on inner validation."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import chex
import numpy as np
import pytest
from flax import nnx

from configs.common import base_config
from survjax import rundir
from survjax.data.splits import inner_validation, load_or_make_folds
from survjax.data.synthetic import SyntheticSpec, make_synthetic_cohort
from survjax.errors import InputError
from survjax.evaluate.cv import cohort_folds, run_cv
from survjax.evaluate.metrics import concordance_index
from survjax.train.sharding import make_mesh
from survjax.train.trainer import Trainer
from toy_method import ToyMethod

REPO = Path(__file__).resolve().parents[1]
SPEC = SyntheticSpec(n_patients=90, bag_min=20, bag_max=60, patch_dim=8)


def _config(tmp_path, **model):
  c = base_config("toy_method")
  c.cv.num_folds = 3
  c.cv.splits_dir = str(tmp_path / "splits")
  c.train.batch_size = 16
  c.train.max_instances = 32
  c.eval.batch_size = 32
  c.eval.latency = False
  c.progress = False
  c.model = dict(lr=1e-2, **model)
  return c


def test_a_resume_under_another_learning_rate_is_refused_naming_the_key(tmp_path):
  cohort = make_synthetic_cohort(SPEC)
  c = _config(tmp_path)
  c.cv.folds = (0,)
  run_cv(ToyMethod(epochs=(1, 1)), cohort, c, tmp_path / "run", mode="train")
  changed = _config(tmp_path)
  changed.model.lr = 5e-2
  changed.cv.folds = (1,)  # another subset of folds is the same run; the lr is not
  with pytest.raises(InputError, match=r"model\.lr 0\.01 -> 0\.05"):
    run_cv(ToyMethod(epochs=(1, 1)), cohort, changed, tmp_path / "run", mode="train")
  assert not (tmp_path / "run" / "fold_1").exists()
  # Evaluation settings and another fold subset are not a different run.
  same = _config(tmp_path)
  same.cv.folds = (1,)
  same.eval.batch_size = 8
  run_cv(ToyMethod(epochs=(1, 1)), cohort, same, tmp_path / "run", mode="train")
  # --restart moves the old run aside and records the new configuration.
  run_cv(ToyMethod(epochs=(1, 1)), cohort, changed, tmp_path / "run", mode="train", restart=True)
  aside = [p for p in tmp_path.iterdir() if p.name.startswith("run.old-")]
  assert len(aside) == 1 and (aside[0] / "fold_0" / "checkpoints").exists()
  recorded = json.loads((tmp_path / "run" / "run.json").read_text())
  assert recorded["training_config"]["model.lr"] == 0.05


def test_a_changed_cohort_is_refused_by_its_run_directory(tmp_path):
  c = _config(tmp_path)
  c.cv.folds = (0,)
  run_cv(ToyMethod(epochs=(1, 0)), make_synthetic_cohort(SPEC), c, tmp_path / "run", mode="train")
  other = make_synthetic_cohort(dataclasses.replace(SPEC, coupling=0.3))
  c.cv.splits_dir = str(tmp_path / "splits2")
  with pytest.raises(InputError, match="cohort_fingerprint"):
    run_cv(ToyMethod(epochs=(1, 0)), other, c, tmp_path / "run", mode="train")


def test_one_run_per_directory_and_stale_locks_are_taken_over(tmp_path):
  work = tmp_path / "run"
  work.mkdir()
  with rundir.locked(work):
    with pytest.raises(InputError, match=f"process {os.getpid()}"):
      with rundir.locked(work):
        pass
  assert not (work / "run.lock").exists()
  dead = subprocess.Popen([sys.executable, "-c", "pass"])
  dead.wait()
  import socket
  (work / "run.lock").write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname()}))
  with rundir.locked(work):
    assert json.loads((work / "run.lock").read_text())["pid"] == os.getpid()


def test_second_cli_run_on_a_locked_directory_stops_with_one_line(tmp_path):
  work = tmp_path / "run"
  work.mkdir()
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  with rundir.locked(work):
    p = subprocess.run([sys.executable, "-m", "survjax.main", f"--config={REPO}/configs/snn.py:smoke",
                        f"--workdir={work}", f"--config.cv.splits_dir={tmp_path}/splits"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert p.returncode == 2
  assert len(p.stderr.strip().splitlines()) == 1 and str(os.getpid()) in p.stderr
  assert sorted(x.name for x in work.iterdir()) == []


def test_unwritable_workdir_is_one_line(tmp_path):
  blocker = tmp_path / "file"
  blocker.write_text("")
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  p = subprocess.run([sys.executable, "-m", "survjax.main", f"--config={REPO}/configs/snn.py:smoke",
                      f"--workdir={blocker}/run", f"--config.cv.splits_dir={tmp_path}/splits"],
                     cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert p.returncode == 2, p.stderr
  assert len(p.stderr.strip().splitlines()) == 1 and "expected a writable --workdir" in p.stderr
  assert not (tmp_path / "splits").exists()   # found before the split files are written


def test_split_files_are_refused_for_another_cohort(tmp_path):
  a = make_synthetic_cohort(SPEC)
  b = make_synthetic_cohort(dataclasses.replace(SPEC, coupling=0.3))  # same ids, other times
  kw = dict(num_folds=3, seed=0, splits_dir=tmp_path, dataset="x")
  folds = load_or_make_folds(a.case_ids, a.time, a.event, **kw)
  again = load_or_make_folds(a.case_ids, a.time, a.event, **kw)
  assert all((f[1] == g[1]).all() for f, g in zip(folds, again))
  with pytest.raises(InputError, match="made for cohort"):
    load_or_make_folds(b.case_ids, b.time, b.event, **kw)


def test_split_files_of_another_partition_are_refused_and_kept(tmp_path):
  a = make_synthetic_cohort(SPEC)
  kw = dict(seed=0, splits_dir=tmp_path, dataset="x")
  load_or_make_folds(a.case_ids, a.time, a.event, num_folds=3, **kw)
  written = {p.name: p.read_bytes() for p in (tmp_path / "x").iterdir()}
  assert sorted(written) == ["cohort.json", "splits_0.csv", "splits_1.csv", "splits_2.csv"]
  for num_folds, seed in ((2, 0), (5, 0), (3, 1)):
    with pytest.raises(InputError, match="this run asks for cv.num_folds"):
      load_or_make_folds(a.case_ids, a.time, a.event, num_folds=num_folds,
                         **dict(kw, seed=seed))
  # Files dropped in by hand (no cohort.json): the count is checked, nothing overwritten.
  (tmp_path / "x" / "cohort.json").unlink()
  with pytest.raises(InputError, match="holds 3 split files"):
    load_or_make_folds(a.case_ids, a.time, a.event, num_folds=5, **kw)
  assert {p.name: p.read_bytes() for p in (tmp_path / "x").iterdir()} == {
      k: v for k, v in written.items() if k != "cohort.json"}
  assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]   # no temporary left


def test_synthetic_variants_with_other_fold_counts_get_their_own_folders(tmp_path):
  cohort = make_synthetic_cohort(SPEC)
  for num_folds in (3, 2, 3):
    c = base_config("toy")
    c.cv.num_folds, c.cv.splits_dir = num_folds, str(tmp_path)
    folds, _ = cohort_folds(cohort, c)
    assert len(folds) == num_folds
  assert sorted(p.name.rsplit("-", 2)[1] for p in tmp_path.iterdir()) == ["2folds", "3folds"]


def test_inner_validation_is_stratified_disjoint_and_reproducible():
  cohort = make_synthetic_cohort(SyntheticSpec(n_patients=400, bag_min=2, bag_max=3,
                                               patch_dim=4))
  tr = np.arange(0, 400, 1)[::1][:320]
  fit, val = inner_validation(tr, cohort.time, cohort.event, 0.2, 5)
  assert not set(fit) & set(val) and sorted(set(fit) | set(val)) == sorted(tr)
  assert abs(len(val) - 64) <= 2
  assert abs(cohort.event[val].mean() - cohort.event[tr].mean()) < 0.03
  fit2, val2 = inner_validation(tr, cohort.time, cohort.event, 0.2, 5)
  assert (val == val2).all()
  assert len(inner_validation(tr, cohort.time, cohort.event, 0.0, 5)[1]) == 0


class _Selecting(ToyMethod):
  """The toy's first stage, choosing its epoch by validation C-index."""

  def __init__(self, epochs, select="c_index"):
    super().__init__(epochs=(epochs, 0))
    self.select = select

  def stages(self):
    first, second = super().stages()
    return [dataclasses.replace(first, select=self.select), second]


def test_epoch_selection_matches_a_reference_loop_over_validation_scores():
  """The chosen epoch is the argmax of the validation C-index (scikit-survival's) over
  runs stopped after each epoch, and the model leaves the stage with that epoch's
  parameters: the same as a run stopped there."""
  from sksurv.metrics import concordance_index_censored
  cohort = make_synthetic_cohort(SPEC)
  tr, val = inner_validation(np.arange(60), cohort.time, cohort.event, 0.25, 0)
  info = {k: {"dim": cohort.modalities[k].dim} for k in ("pathology", "genomics")}
  epochs = 6

  def train(method, **kw):
    t = Trainer(method, mesh=make_mesh(1), batch_size=16, max_instances=32, progress=False)
    model = method.build(info, nnx.Rngs(0))
    t.fit(model, cohort, tr, **kw)
    return t, model

  def val_c(model):
    import jax
    risk = np.asarray(ToyMethod().predict(model, __import__("survjax.data.batching", fromlist=["x"])
                                          .make_batch(cohort, val, __import__(
                                              "survjax.data.batching", fromlist=["x"]).BatchSpec(
                                                  batch_size=len(val))),
                                          frozenset({"pathology", "genomics"}),
                                          jax.random.key(0))["risk"])[:len(val)]
    return concordance_index_censored(cohort.event[val], cohort.time[val], risk)[0]

  reference = [val_c(train(ToyMethod(epochs=(e + 1, 0)))[1]) for e in range(epochs)]
  trainer, chosen_model = train(_Selecting(epochs), val_idx=val)
  chosen = trainer.chosen_epochs[0]["a"]
  assert chosen == int(np.argmax(reference))
  stopped = train(ToyMethod(epochs=(chosen + 1, 0)))[1]
  chex.assert_trees_all_equal(nnx.to_pure_dict(nnx.state(chosen_model, nnx.Param)),
                              nnx.to_pure_dict(nnx.state(stopped, nnx.Param)))
  # Patience: stop once `patience` epochs pass without improvement.
  patient = _Selecting(epochs)
  stages = patient.stages
  patient.stages = lambda: [dataclasses.replace(stages()[0], patience=1), stages()[1]]
  t2, _ = train(patient, val_idx=val)
  assert t2.chosen_epochs[0]["a"] == int(np.argmax(reference[:next(
      (e + 1 for e in range(1, epochs) if reference[e] <= max(reference[:e])), epochs)]))



def test_selection_over_modality_subsets_scores_the_mean_of_their_cindexes():
  """With ``select_present`` the validation score is the mean over the subsets of
  scikit-survival's C of ``predict`` shown that subset, on the complete validation
  patients, all subsets from one jitted program."""
  from sksurv.metrics import concordance_index_censored
  from survjax.data.batching import BatchSpec, make_batch
  import jax
  cohort = make_synthetic_cohort(SPEC)
  tr, val = inner_validation(np.arange(60), cohort.time, cohort.event, 0.25, 0)
  method = ToyMethod(epochs=(2, 0))
  model = method.build({k: {"dim": cohort.modalities[k].dim}
                        for k in ("pathology", "genomics")}, nnx.Rngs(0))
  trainer = Trainer(method, mesh=make_mesh(1), batch_size=16, max_instances=32, progress=False)
  trainer.fit(model, cohort, tr)
  subsets = (("pathology", "genomics"), ("pathology",), ("genomics",))
  stage = dataclasses.replace(method.stages()[0], select="c_index", select_present=subsets)
  batch = make_batch(cohort, val, BatchSpec(batch_size=len(val)))
  want = [concordance_index_censored(
      cohort.event[val], cohort.time[val],
      np.asarray(method.predict(model, batch, frozenset(p), jax.random.key(0))["risk"]))[0]
      for p in subsets]
  assert len(set(np.round(want, 6))) == 3   # the subsets disagree, so the mean is a test
  traced = trainer.traces["validation"]
  got = trainer.validation_score(stage, model, cohort, val, None)
  assert got == pytest.approx(np.mean(want), abs=1e-9)
  assert trainer.traces["validation"] == traced + 1   # the three subsets: one program
  only_full = dataclasses.replace(stage, select_present=None)
  assert trainer.validation_score(only_full, model, cohort, val, None) == pytest.approx(
      want[0], abs=1e-9)


def _fake_run(path, method, folds, rows, fingerprint="abc"):
  """A run directory as run_cv writes it: results.json + fold_<k>/risks.csv."""
  path.mkdir(parents=True)
  scen = {r: {"c_index_mean": 0.0, "c_index_std": 0.0} for r in rows}
  (path / "results.json").write_text(json.dumps(
      {"method": method, "scenarios": scen, "splits_fingerprint": fingerprint}))
  for k, (ids, t, e, risks) in enumerate(folds):
    (path / f"fold_{k}").mkdir()
    lines = ["case_id,time,event," + ",".join(rows)]
    lines += [f"{ids[i]},{float(t[i])!r},{int(e[i])}," + ",".join(repr(float(risks[r][i])) for r in rows)
              for i in range(len(ids))]
    (path / f"fold_{k}" / "risks.csv").write_text("\n".join(lines) + "\n")


def test_bootstrap_cindex_equals_the_cindex_of_the_resampled_patients():
  from survjax.compare import bootstrap_cindex
  rng = np.random.default_rng(0)
  n = 40
  t = np.round(rng.exponential(size=n), 1) + 0.1   # tied times
  e = rng.uniform(size=n) < 0.6
  r = np.round(rng.normal(size=n), 1)               # tied risks
  point, draws = bootstrap_cindex([(t, e, {"a": r})], ["a"], num_draws=20, seed=3)
  assert point["a"] == pytest.approx(concordance_index(t, e, r)[0], abs=1e-12)
  w = np.random.default_rng(3).multinomial(n, np.full(n, 1 / n), size=20)
  for b in range(20):
    idx = np.repeat(np.arange(n), w[b])
    assert draws["a"][b] == pytest.approx(concordance_index(t[idx], e[idx], r[idx])[0], abs=1e-12)


def test_compare_pairs_rows_on_identical_folds_and_refuses_others(tmp_path):
  from survjax.compare import compare, main
  rng = np.random.default_rng(1)
  folds_a, folds_b = [], []
  for k in range(3):
    n = 60
    ids = np.array([f"p{k}-{i}" for i in range(n)])
    t = rng.exponential(size=n) + 0.01
    e = rng.uniform(size=n) < 0.6
    signal = -np.log(t)
    folds_a.append((ids, t, e, {"full": signal + rng.normal(size=n),
                                "missing_x": signal + 3 * rng.normal(size=n)}))
    perm = rng.permutation(n)   # the other run lists the same patients in another order
    folds_b.append((ids[perm], t[perm], e[perm], {"full": rng.normal(size=n)[perm]}))
  _fake_run(tmp_path / "a", "good", folds_a, ["full", "missing_x"])
  _fake_run(tmp_path / "b", "noise", folds_b, ["full"])
  table = compare([tmp_path / "a", tmp_path / "b"], reference="b:full", num_draws=300)
  rows = {e["row"]: e for e in table}
  assert rows["a:full"]["verdict"] == "better" and rows["a:full"]["diff_ci95"][0] > 0
  assert rows["b:full"].get("diff") is None
  lo, hi = rows["b:full"]["ci95"]
  assert lo < 0.5 < hi
  same = compare([tmp_path / "a"], reference="a:full", num_draws=50)
  assert {e["row"]: e for e in same}["a:missing_x"]["verdict"] in ("worse", "level")
  # Two runs of one method are two sets of rows, labelled by their directories.
  _fake_run(tmp_path / "a2", "good", folds_a, ["full", "missing_x"])
  both = {e["row"]: e for e in compare([tmp_path / "a", tmp_path / "a2"], num_draws=20)}
  assert set(both) == {"a:full", "a:missing_x", "a2:full", "a2:missing_x"}
  _fake_run(tmp_path / "c", "other", folds_b, ["full"], fingerprint="zzz")
  with pytest.raises(InputError, match="different folds"):
    compare([tmp_path / "a", tmp_path / "c"])
  assert main([str(tmp_path / "a"), str(tmp_path / "b"), "--reference", "b:full",
               "--out", str(tmp_path / "out" / "cmp"), "--draws", "100"]) == 0
  assert (tmp_path / "out" / "cmp.png").stat().st_size > 1000
  assert "| `a:full` |" in (tmp_path / "out" / "cmp.md").read_text()
  assert main([str(tmp_path / "a"), str(tmp_path / "c")]) == 2


def test_compare_refuses_a_run_lacking_a_fold_it_reports(tmp_path, capsys):
  """A fold's risks missing (or unreadable) is one line and exit 2, in either order: never
  a comparison on the folds that happen to be there."""
  from survjax.compare import compare, main
  rng = np.random.default_rng(2)
  folds = []
  for k in range(3):
    ids = np.array([f"p{k}-{i}" for i in range(30)])
    t, e = rng.exponential(size=30) + 0.01, rng.uniform(size=30) < 0.6
    folds.append((ids, t, e, {"full": rng.normal(size=30)}))
  for name in ("a", "b"):
    _fake_run(tmp_path / name, name, folds, ["full"])
    results = json.loads((tmp_path / name / "results.json").read_text())
    (tmp_path / name / "results.json").write_text(json.dumps({**results, "folds": 3}))
  (tmp_path / "a" / "fold_0.bak").mkdir()   # a stray folder is not a fold
  assert len(compare([tmp_path / "a", tmp_path / "b"], num_draws=10)) == 2
  (tmp_path / "b" / "fold_2" / "risks.csv").unlink()
  for runs in (["a", "b"], ["b", "a"]):
    with pytest.raises(InputError, match="fold_2/risks.csv is missing"):
      compare([tmp_path / r for r in runs])
  (tmp_path / "b" / "fold_2" / "risks.csv").write_text("")
  with pytest.raises(InputError, match="expected columns case_id, time, event"):
    compare([tmp_path / "a", tmp_path / "b"])
  (tmp_path / "not_a_dir").write_text("")
  for extra in (["--draws", "0"], ["--out", str(tmp_path / "not_a_dir" / "cmp")]):
    capsys.readouterr()
    assert main([str(tmp_path / "a"), *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("survjax.compare: bad input: "), err


def test_tuning_never_reads_a_test_fold(tmp_path):
  """Scrambling the labels of fold 0's test patients leaves fold 0's tuning scores and
  choice unchanged (the folds imposed by split files, so both cohorts share them)."""
  from survjax.data.splits import make_folds, write_splits_csv
  from survjax.evaluate.tune import run_tune
  from survjax.evaluate.cv import cohort_folds

  cohort = make_synthetic_cohort(SPEC)
  splits = tmp_path / "splits"
  for k, (tr, va) in enumerate(make_folds(cohort.time, cohort.event, 3, 0)):
    write_splits_csv(splits / f"x/splits_{k}.csv", list(cohort.case_ids[tr]),
                     list(cohort.case_ids[va]))
  c = _config(tmp_path)
  c.data.source = "files"   # split folder named by data, not by fingerprint
  c.cv.splits_dir = str(splits)
  c.cv.val_fraction = 0.25
  c.tune = dict(grid=(("model.lr", (1e-2, 1e-3)),))
  c.model.epochs = (3, 1)
  cohort.name = "x"
  folds, _ = cohort_folds(cohort, c)
  test0 = folds[0][1]
  rng = np.random.default_rng(0)
  scrambled = dataclasses.replace(cohort, time=cohort.time.copy(), event=cohort.event.copy())
  scrambled.time[test0] = rng.permutation(cohort.time[test0]) * 3.0
  scrambled.event[test0] = ~cohort.event[test0]
  folds_s, _ = cohort_folds(scrambled, c)
  assert all((a[1] == b[1]).all() for a, b in zip(folds, folds_s))


  def make(cfg):
    return _Selecting(epochs=cfg.model.epochs[0])

  a = run_tune(cohort, c, tmp_path / "a", folds=folds, run_folds=[0], make_method=make)
  b = run_tune(scrambled, c, tmp_path / "b", folds=folds_s, run_folds=[0], make_method=make)
  assert [p["val_c_index_per_fold"] for p in a["points"]] == \
      [p["val_c_index_per_fold"] for p in b["points"]]
  assert a["chosen"] == b["chosen"] and a["cv_flags"].startswith("--config.model.lr=")
  assert json.loads((tmp_path / "a" / "tune.json").read_text())["chosen"] == a["chosen"]
  # Without the blanking the scores would move: the scrambled labels enter fold 1 and 2
  # through their training patients.
  c1 = run_tune(scrambled, c, tmp_path / "c", folds=folds_s, run_folds=[1], make_method=make)
  d1 = run_tune(cohort, c, tmp_path / "d", folds=folds, run_folds=[1], make_method=make)
  assert [p["val_c_index_per_fold"] for p in c1["points"]] != \
      [p["val_c_index_per_fold"] for p in d1["points"]]


def test_evaluation_batches_do_not_depend_on_a_hidden_modality():
  """With pathology hidden, which patients share a batch (and so its random draws) must
  not follow the hidden bags' lengths: shuffling them leaves the batches unchanged."""
  from survjax.data.batching import BatchSpec, iterate_batches
  cohort = make_synthetic_cohort(dataclasses.replace(SPEC, radiology=True, radiology_dim=4,
                                                     slices_min=3, slices_max=30))
  spec = BatchSpec(batch_size=8, buckets=(64,))
  idx = np.arange(40)

  def groups(c, hide):
    return [tuple(b["index"][b["valid"]]) for b in
            iterate_batches(c, idx, spec, hide=hide, sort_by_length=True)]

  path = cohort.modalities["pathology"]
  perm = np.random.default_rng(0).permutation(len(path.bags))
  other = dataclasses.replace(cohort, modalities={   # the same patients, other bag lengths
      **cohort.modalities, "pathology": dataclasses.replace(path, bags=[path.bags[i] for i in perm])})
  assert groups(cohort, {"pathology"}) == groups(other, {"pathology"})
  assert groups(cohort, ()) != groups(other, ())   # shown bags do set the order


def test_auto_rows_choose_on_validation_and_never_read_the_test_fold(tmp_path, monkeypatch):
  """A method with two risk variants (its risk and its negation) gets a `full/auto` row:
  per fold the variant with the better inner-validation C-index, whose test risks it
  reports; the choice is made on the fold's inner validation patients only."""
  from survjax.evaluate import cv
  cohort = make_synthetic_cohort(SPEC)
  method = ToyMethod(epochs=(2, 1), flipped_variant=True)
  c = _config(tmp_path)
  c.cv.val_fraction = 0.3
  c.eval.scenarios = ("full",)
  seen = []
  choose = cv._choose_variant

  def spy(predictor, model, cohort_, val_idx, *args):
    seen.append(np.asarray(val_idx))
    return choose(predictor, model, cohort_, val_idx, *args)

  monkeypatch.setattr(cv, "_choose_variant", spy)
  res = run_cv(method, cohort, c, tmp_path / "run")
  folds, _ = cv.cohort_folds(cohort, c)
  assert len(seen) == 3
  for k, (tr, te) in enumerate(folds):
    np.testing.assert_array_equal(np.sort(seen[k]), np.sort(cv.fold_validation(cohort, c, k, tr)[1]))
    assert not set(seen[k]) & set(te) and set(seen[k]) <= set(tr)
    f = json.loads((tmp_path / "run" / f"fold_{k}" / "result.json").read_text())
    choice = f["validation"]["full"]
    assert choice["chosen"] == max(choice["c_index"], key=choice["c_index"].get)
    assert abs(choice["c_index"]["risk"] + choice["c_index"]["flipped"] - 1) < 1e-9  # no ties
    assert f["scenarios"]["full/auto"]["c_index"] == f["scenarios"][
        "full" if choice["chosen"] == "risk" else "full/flipped"]["c_index"]
  assert res["scenarios"]["full/auto"]["chosen_per_fold"] == [
      json.loads((tmp_path / "run" / f"fold_{k}" / "result.json").read_text())[
          "validation"]["full"]["chosen"] for k in range(3)]


def test_tuning_under_a_missing_scenario_scores_the_missing_path_on_validation(tmp_path):
  """`tune.scenarios` scores each point with the scenario's modality hidden on the inner
  validation patients: other scores than with every modality, the same ones when the test
  fold's labels are scrambled."""
  from survjax.data.splits import make_folds, write_splits_csv
  from survjax.evaluate.cv import cohort_folds
  from survjax.evaluate.tune import run_tune

  cohort = make_synthetic_cohort(SPEC)
  cohort.name = "x"
  splits = tmp_path / "splits"
  for k, (tr, va) in enumerate(make_folds(cohort.time, cohort.event, 3, 0)):
    write_splits_csv(splits / f"x/splits_{k}.csv", list(cohort.case_ids[tr]),
                     list(cohort.case_ids[va]))
  c = _config(tmp_path)
  c.data.source = "files"
  c.cv.splits_dir = str(splits)
  c.cv.val_fraction = 0.25
  c.tune = dict(grid=(("model.lr", (1e-2,)),), scenarios=("missing_pathology",))
  folds, _ = cohort_folds(cohort, c)
  scrambled = dataclasses.replace(cohort, time=cohort.time.copy(), event=cohort.event.copy())
  scrambled.time[folds[0][1]] = cohort.time[folds[0][1]][::-1] * 2.0

  def make(cfg):
    return ToyMethod(epochs=(2, 1))

  a = run_tune(cohort, c, tmp_path / "a", folds=folds, run_folds=[0], make_method=make)
  b = run_tune(scrambled, c, tmp_path / "b", folds=folds, run_folds=[0], make_method=make)
  assert a["points"][0]["val_c_index_per_scenario"] == b["points"][0]["val_c_index_per_scenario"]
  assert a["points"][0]["val_c_index_per_fold"] == a["points"][0][
      "val_c_index_per_scenario"]["missing_pathology"]
  c.tune.scenarios = ("full",)
  full = run_tune(cohort, c, tmp_path / "c", folds=folds, run_folds=[0], make_method=make)
  assert full["points"][0]["val_c_index_per_fold"] != a["points"][0]["val_c_index_per_fold"]
  c.tune.scenarios = ("missing_nothing",)
  with pytest.raises(InputError, match="unknown scenario 'missing_nothing'"):
    run_tune(cohort, c, tmp_path / "d", folds=folds, run_folds=[0], make_method=make)


def test_constant_fill_oracle_and_room_are_reported_per_fold_and_in_compare(tmp_path):
  """With a modality withheld, each fold reports the constant-fill oracle (the withheld
  specific factors at their mean, `true_risk["const:<revealed>"]`) as Harrell's C on its
  test patients; compare's room is the oracle minus it; the full scenario has none."""
  from survjax.compare import compare
  from survjax.evaluate.cv import cohort_folds
  cohort = make_synthetic_cohort(SPEC)
  c = _config(tmp_path)
  c.eval.scenarios = ("full", "missing_genomics")
  res = run_cv(ToyMethod(epochs=(1, 1)), cohort, c, tmp_path / "run")
  folds, _ = cohort_folds(cohort, c)
  for k, (_, te) in enumerate(folds):
    f = json.loads((tmp_path / "run" / f"fold_{k}" / "result.json").read_text())
    expected = concordance_index(cohort.time[te], cohort.event[te],
                                 cohort.true_risk["const:pathology"][te])[0]
    assert abs(f["scenarios"]["missing_genomics"]["oracle_const_c_index"] - expected) < 1e-12
    assert "oracle_const_c_index" not in f["scenarios"]["full"]
  row = next(r for r in compare([tmp_path / "run"]) if r["row"] == "run:missing_genomics")
  scen = res["scenarios"]["missing_genomics"]
  assert row["imputation_room"] == round(scen["oracle_c_index"] - scen["oracle_const_c_index"], 4)
