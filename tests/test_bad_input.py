"""Bad input through the CLI: exit status 2, one line on stderr, nothing written.

Each case writes a valid cohort in the on-disk formats (`file_cohort.write_file_cohort`:
clinical CSV in MCAT layout, signatures CSV, per-slide .h5/.npy features), breaks one
thing, and runs ``python -m survjax.main`` once in a subprocess. The error must come at
load time (or at the fold check, before any JAX compilation): status 2, exactly one line
on stderr naming the file, the patient (where there is one) and what was expected, and
no workdir, results, report or split files left behind. The library-level checks behind
these are in tests/test_formats.py.
"""

import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from file_cohort import files_args, write_file_cohort

REPO = Path(__file__).resolve().parents[1]
N = 12  # patients: case 0 and 5 have two slides each; ~2/3 events


def _rows(c):
  with open(c["csv"], newline="") as f:
    rows = list(csv.reader(f))
  return rows[0], rows[1:]


def _write_rows(c, header, rows):
  with open(c["csv"], "w", newline="") as f:
    csv.writer(f, lineterminator="\n").writerows([header, *rows])


def _edit(c, col, value, row=3):
  """Sets ``col`` of CSV data row ``row`` (0-based) to ``value``; returns that row's case."""
  header, rows = _rows(c)
  rows[row][header.index(col)] = value
  _write_rows(c, header, rows)
  return rows[row][header.index("case_id")]


def _slide(c, i, suffix=None):
  """The feature file of case ``i``'s first slide (optionally one with ``suffix``)."""
  if suffix is None:
    return c["files"][c["slides"][c["case_ids"][i]][0]]
  for cid in c["case_ids"][i:]:
    for s in c["slides"][cid]:
      if c["files"][s].suffix == suffix:
        return c["files"][s]
  raise AssertionError(suffix)


def _case_of(c, path):
  return next(cid for cid, ss in c["slides"].items() if any(c["files"][s] == path for s in ss))


def _save_like(path, arr):
  """Overwrites a feature file (.npy or .h5) with ``arr``."""
  if path.suffix == ".npy":
    np.save(path, arr)
  else:
    import h5py
    with h5py.File(path, "w") as f:
      f["features"] = arr


# Each breaker gets the cohort dict and returns (file named, case named or None, text).
def missing_feature_file(c):
  p = _slide(c, 3)
  p.unlink()
  return str(p.parent / p.stem), c["case_ids"][3], "not found"


def corrupt_h5(c):
  p = _slide(c, 2, ".h5")
  p.write_bytes(b"\x89HDF\r\n garbage, not an HDF5 file")
  return str(p), _case_of(c, p), "cannot read HDF5"


def truncated_npy(c):
  p = _slide(c, 2, ".npy")
  p.write_bytes(p.read_bytes()[:100])
  return str(p), _case_of(c, p), "cannot read .npy"


def dimension_differs(c):
  p = _slide(c, 6)
  _save_like(p, np.zeros((5, c["dim"] + 3), np.float32))
  first = c["files"][c["slides"][c["case_ids"][0]][0]]
  return str(p), c["case_ids"][6], (f"feature dimension {c['dim'] + 3}, expected {c['dim']} "
                                    f"(the dimension of {first})")


def nan_features(c):
  p = _slide(c, 4)
  x = np.ones((5, c["dim"]), np.float32)
  x[2, 1] = np.nan
  _save_like(p, x)
  return str(p), c["case_ids"][4], "NaN or inf"


def inf_features(c):
  p = _slide(c, 7)
  x = np.ones((5, c["dim"]), np.float32)
  x[0, 0] = -np.inf
  _save_like(p, x)
  return str(p), c["case_ids"][7], "NaN or inf"


def empty_bag(c):
  p = _slide(c, 8)
  _save_like(p, np.zeros((0, c["dim"]), np.float32))
  return str(p), c["case_ids"][8], "empty bag"


def negative_time(c):
  return str(c["csv"]), _edit(c, "survival_months", "-3.5"), "expected a number > 0"


def zero_time(c):
  return str(c["csv"]), _edit(c, "survival_months", "0"), "expected a number > 0"


def missing_time(c):
  return str(c["csv"]), _edit(c, "survival_months", ""), "survival_months is missing"


def event_not_binary(c):
  return str(c["csv"]), _edit(c, "censorship", "2"), "expected 0 or 1"


def case_without_slide(c):
  return str(c["csv"]), _edit(c, "slide_id", "", row=4), "no slide_id"


def duplicate_slide_id(c):
  header, rows = _rows(c)
  rows[5][2] = rows[4][2]  # case 4 (data row 5) lists case 3's slide
  _write_rows(c, header, rows)
  return str(c["csv"]), rows[5][1], "listed twice"


def case_rows_disagree_on_time(c):
  header, rows = _rows(c)
  assert rows[0][1] == rows[1][1]  # case 0 has two slides
  rows[1][header.index("survival_months")] = "99.5"
  _write_rows(c, header, rows)
  return str(c["csv"]), rows[0][1], "survival_months differs"


def case_rows_disagree_on_event(c):
  header, rows = _rows(c)
  col = header.index("censorship")
  rows[1][col] = str(1 - int(rows[0][col]))
  _write_rows(c, header, rows)
  return str(c["csv"]), rows[0][1], "event/censorship differs"


def all_censored(c):
  header, rows = _rows(c)
  for r in rows:
    r[header.index("censorship")] = "1"
  _write_rows(c, header, rows)
  return "splits_0.csv (not written)", None, "no events at all"


def fewer_events_than_folds(c):
  header, rows = _rows(c)
  col = header.index("censorship")
  first_two = list(dict.fromkeys(r[1] for r in rows))[:2]
  for r in rows:  # the first two cases die, everyone else is censored
    r[col] = "0" if r[1] in first_two else "1"
  _write_rows(c, header, rows)
  return "(not written)", None, "2 events for 3 folds"


BREAKERS = [missing_feature_file, corrupt_h5, truncated_npy, dimension_differs, nan_features,
            inf_features, empty_bag, negative_time, zero_time, missing_time,
            event_not_binary, case_without_slide, duplicate_slide_id,
            case_rows_disagree_on_time, case_rows_disagree_on_event, all_censored,
            fewer_events_than_folds]


def _run(args, tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
  return subprocess.run([sys.executable, "-m", "survjax.main", *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=300)


def _one_line(out) -> list[str]:
  """The stderr of a run that stopped on bad input: exit status 2 and exactly one line."""
  lines = out.stderr.strip().splitlines()
  assert out.returncode == 2 and len(lines) == 1, out.stderr[-3000:]
  return lines


def _run_smoke(config: str, tmp_path, *extra):
  """``configs/<config>.py:smoke`` on its synthetic cohort, run and split folders in
  ``tmp_path``, with ``extra`` flags."""
  return _run([f"--config={REPO}/configs/{config}.py:smoke", f"--workdir={tmp_path / 'run'}",
               f"--config.cv.splits_dir={tmp_path / 'splits'}", "--config.progress=False",
               *extra], tmp_path)


def _cli_args(c, tmp_path, *extra):
  return [f"--config={REPO}/configs/abmil.py:smoke", f"--workdir={tmp_path / 'run'}",
          f"--config.cv.splits_dir={tmp_path / 'splits'}", "--config.progress=False",
          *files_args(c), *extra]


def _assert_nothing_written(tmp_path):
  assert not (tmp_path / "run").exists()
  assert not (tmp_path / "splits").exists()
  leftovers = [p for p in tmp_path.rglob("*") if p.name in ("results.json", "report.md")
               or p.name.endswith(".tmp")]
  assert not leftovers, leftovers


@pytest.mark.parametrize("breaker", BREAKERS, ids=lambda f: f.__name__)
def test_bad_input_exits_2_with_one_line_and_writes_nothing(tmp_path, breaker):
  c = write_file_cohort(tmp_path / "cohort", n_patients=N, dim=4, bag=(3, 6), seed=1)
  path, case, what = breaker(c)
  out = _run(_cli_args(c, tmp_path), tmp_path)
  lines = out.stderr.strip().splitlines()
  assert out.returncode == 2, out.stderr[-3000:]
  assert len(lines) == 1, out.stderr
  line = lines[0]
  assert line.startswith("survjax: bad input: "), line
  assert path in line, line
  if case is not None:
    assert f"case {case}" in line, line
  assert what in line and "expected" in line, line
  _assert_nothing_written(tmp_path)


def test_unknown_case_in_split_file(tmp_path):
  """Split files given by the user that name a case the cohort lacks; they stay as they are."""
  c = write_file_cohort(tmp_path / "cohort", n_patients=N, dim=4, bag=(3, 6), seed=1)
  folder = tmp_path / "given" / "cohort"
  folder.mkdir(parents=True)
  for k in range(3):
    ids = list(c["case_ids"])
    val, train = ids[k::3], [x for i, x in enumerate(ids) if i % 3 != k]
    if k == 1:
      val[0] = "TCGA-XX-0000"
    rows = [["", "train", "val"]] + [[str(i), train[i] if i < len(train) else "",
                                      val[i] if i < len(val) else ""]
                                     for i in range(len(train))]
    with open(folder / f"splits_{k}.csv", "w", newline="") as f:
      csv.writer(f, lineterminator="\n").writerows(rows)
  before = {p.name: p.read_bytes() for p in folder.iterdir()}
  out = _run([f"--config={REPO}/configs/abmil.py:smoke", f"--workdir={tmp_path / 'run'}",
              f"--config.cv.splits_dir={tmp_path / 'given'}", "--config.data.name=cohort",
              "--config.progress=False", *files_args(c)], tmp_path)
  lines = _one_line(out)
  assert str(folder / "splits_1.csv") in lines[0] and "case TCGA-XX-0000" in lines[0]
  assert "expected a case of the cohort" in lines[0]
  assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
  assert not (tmp_path / "run").exists()


def test_unknown_config_key(tmp_path):
  c = write_file_cohort(tmp_path / "cohort", n_patients=N, dim=4, bag=(3, 6), seed=1)
  out = _run(_cli_args(c, tmp_path, "--config.data.files.feature_dimm=4"), tmp_path)
  lines = _one_line(out)
  assert "feature_dimm" in lines[0]
  _assert_nothing_written(tmp_path)


def test_unknown_config_variant_names_itself(tmp_path):
  """A variant the config file rejects: the one line carries the file's reason."""
  out = _run([f"--config={REPO}/configs/must.py:decomp", f"--workdir={tmp_path / 'run'}",
              f"--config.cv.splits_dir={tmp_path / 'splits'}"], tmp_path)
  lines = _one_line(out)
  assert lines[0].startswith("survjax: bad command line or config: "), lines[0]
  assert "must.py:decomp" in lines[0] and "unknown variant 'decomp'" in lines[0], lines[0]
  _assert_nothing_written(tmp_path)


def test_out_of_range_synthetic_knob(tmp_path):
  """Every generator knob is a config field; a bad value gets one line and nothing."""
  out = _run_smoke("abmil", tmp_path, "--config.data.synthetic.coupling=1.5")
  lines = _one_line(out)
  assert lines[0].startswith("survjax: bad input: ") and "config.data.synthetic" in lines[0]
  assert "coupling 1.5" in lines[0] and "expected 0 <= coupling < 1" in lines[0]
  _assert_nothing_written(tmp_path)


@pytest.mark.parametrize("field, value, expected", [
    ("model.ldm.latent_dim", "300", "expected 0 (all 64 dimensions) to model.dim = 64"),
    ("model.rank", "128", "expected 1 <= rank <= model.dim = 64"),
    ("model.ldm.schedule", "cosinus", "expected one of ['linear', 'cosine']"),
    ("model.precision", "float16", "expected one of ['float32', 'bfloat16']"),
    ("model.num_heads", "3", "num_heads 3 does not divide dim 64"),
])
def test_out_of_range_must_size(tmp_path, field, value, expected):
  """MUST checks the sizes its config sets when the method is made: one line, nothing."""
  out = _run_smoke("must", tmp_path, f"--config.{field}={value}")
  lines = _one_line(out)
  assert lines[0].startswith(f"survjax: bad input: config.{field}: "), lines[0]
  assert expected in lines[0]
  _assert_nothing_written(tmp_path)


@pytest.mark.parametrize("override, where, expected", [
    ("train.batch_size=0", "config.train.batch_size", "expected an integer >= 1"),
    ("train.batch_size=-4", "config.train.batch_size", "expected an integer >= 1"),
    ("train.accumulate=0", "config.train.accumulate", "expected an integer >= 1"),
    ("eval.batch_size=0", "config.eval.batch_size", "expected an integer >= 1"),
    ("cv.val_fraction=1.5", "config.cv.val_fraction", "expected 0 <= fraction < 1"),
    ("cv.val_fraction=-0.1", "config.cv.val_fraction", "expected 0 <= fraction < 1"),
    ("data.buckets=(0,)", "config.data.buckets", "expected an integer >= 1"),
    ("mesh.num_devices=5", "config.mesh.num_devices", "expected at most 1"),
    ("cv.seed=-1", "config.cv.seed", "expected an integer >= 0"),
    ("model.num_bins=0", "config.model.num_bins", "expected an integer >= 1"),
    ("tune.grid=('model.lr',)", "config.tune.grid", "grid entry 'model.lr', expected pairs"),
    ("model.dim=0", "config.model.dim", "expected an integer >= 1"),
    ("data.source=tfds", "config.data.tfds.name", "needs the dataset's name"),
    ("model.epochs=-1", "config.model (stage 'train')", "expected an integer >= 0"),
    ("model.epochs=0", "config.model", "every stage (train) has 0 epochs"),
])
def test_settings_no_run_can_use(tmp_path, override, where, expected):
  """Sizes no run can use stop before anything is written (not a traceback mid-run, nor a
  run that trains nothing and exits 0)."""
  mode = ["--mode=tune"] if override.startswith("tune.") else []
  out = _run_smoke("abmil", tmp_path, f"--config.{override}", *mode)
  lines = _one_line(out)
  assert lines[0].startswith(f"survjax: bad input: {where}: "), lines[0]
  assert expected in lines[0], lines[0]
  _assert_nothing_written(tmp_path)


@pytest.mark.parametrize("args, expected", [
    (["--config=configs/abmill.py"], "configs/abmill.py"),
    (["--config=configs/abmil.py:smoke", "extra"], "unexpected argument 'extra'"),
    (["--config=configs/abmil.py:smoke", "--mode=predict", "--predict.clinical=x.csv"],
     "unknown --predict field 'clinical'"),
])
def test_command_line_mistakes(tmp_path, args, expected):
  """A config file that is not there, a stray argument: one line, exit 2, nothing run."""
  out = _run([*args, f"--workdir={tmp_path / 'run'}",
              f"--config.cv.splits_dir={tmp_path / 'splits'}"], tmp_path)
  lines = _one_line(out)
  assert lines[0].startswith("survjax: bad command line") and expected in lines[0], lines[0]
  _assert_nothing_written(tmp_path)


def test_an_inner_validation_part_without_a_comparable_pair(tmp_path):
  """12 patients in 3 folds leave fold 1 an inner validation part of one patient: found
  before any fold trains (it used to stop after fold 0 had trained and been written)."""
  c = write_file_cohort(tmp_path / "cohort", n_patients=N, dim=4, bag=(3, 6), seed=1)
  out = _run(_cli_args(c, tmp_path), tmp_path)
  lines = _one_line(out)
  assert lines[0].startswith("survjax: bad input: config.cv.val_fraction: fold 1: its inner "
                             "validation part (1 patients"), lines[0]
  _assert_nothing_written(tmp_path)


def test_an_output_folder_that_is_a_file(tmp_path):
  """--workdir or cv.splits_dir under a file: one line naming the flag, nothing written."""
  (tmp_path / "a_file").write_text("")
  for flag in (f"--workdir={tmp_path / 'a_file' / 'run'}",
               f"--config.cv.splits_dir={tmp_path / 'a_file'}"):
    out = _run_smoke("abmil", tmp_path, flag)
    lines = _one_line(out)
    assert "is not a writable directory" in lines[0] and flag.split("=")[0].lstrip("-") in lines[0]
    _assert_nothing_written(tmp_path)


def test_a_negative_feature_width(tmp_path):
  c = write_file_cohort(tmp_path / "cohort", n_patients=N, dim=4, bag=(3, 6), seed=1)
  out = _run(_cli_args(c, tmp_path, "--config.data.files.feature_dim=-3"), tmp_path)
  lines = _one_line(out)
  assert lines[0].startswith("survjax: bad input: config.data.files.feature_dim: -3 is not "
                             "a feature width, expected an integer >= 0"), lines[0]
  _assert_nothing_written(tmp_path)
