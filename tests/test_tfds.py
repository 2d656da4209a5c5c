"""tfds build of a cohort: exact round trip, order kept, no TensorFlow needed."""

import pickle
import subprocess
import sys

import numpy as np
import pytest

from survjax.data.cohort import Cohort, Modality
from survjax.data.tfds_builder import build_tfds_cohort, dataset_dir, load_tfds_cohort
from survjax.errors import InputError


def _cohort() -> Cohort:
  """5 patients, bags of lengths 3/1/0(missing)/7/2, a tokens block missing for one."""
  rng = np.random.default_rng(0)
  lengths = [3, 1, 0, 7, 2]
  bags = [rng.normal(size=(k, 6)).astype(np.float16) for k in lengths]
  genes = rng.normal(size=(5, 5)).astype(np.float32)
  genes[1] = 0.0
  return Cohort(
      name="toy cohort",
      case_ids=np.array(["P-03", "P-01", "Pé-02", "P-10", "P-04"]),
      time=np.array([1 / 3, 12.0, 7.1, 0.25, 100.0 / 7]),  # not float32-representable
      event=np.array([True, False, True, True, False]),
      modalities={
          "pathology": Modality(kind="bag", available=np.array(lengths) > 0, bags=bags),
          "genomics": Modality(kind="tokens", available=[True, False, True, True, True],
                               values=genes, groups=(("a", (0, 1)), ("b", (2, 3, 4))),
                               columns=("g1_rnaseq", "g2_rnaseq", "g1_cnv", "g3_cnv",
                                        "g4_mut")),
          "rna": Modality(kind="vector", available=np.ones(5, bool),
                          values=rng.normal(size=(5, 3)).astype(np.float32)),
      },
      true_risk={"full": rng.normal(size=5), "missing_genomics": rng.normal(size=5)},
  )


def assert_cohorts_identical(got: Cohort, want: Cohort) -> None:
  assert got.name == want.name
  assert list(got.case_ids) == list(want.case_ids)
  assert got.time.dtype == want.time.dtype and got.time.tobytes() == want.time.tobytes()
  np.testing.assert_array_equal(got.event, want.event)
  assert list(got.modalities) == list(want.modalities)
  for name, w in want.modalities.items():
    g = got.modalities[name]
    assert (g.kind, g.groups, g.columns) == (w.kind, w.groups, w.columns), name
    np.testing.assert_array_equal(g.available, w.available)
    if w.kind == "bag":
      for gb, wb in zip(g.bags, w.bags, strict=True):
        assert (gb.dtype, gb.shape) == (wb.dtype, wb.shape), name
        assert gb.tobytes() == wb.tobytes(), name
    else:
      assert (g.values.dtype, g.values.shape) == (w.values.dtype, w.values.shape), name
      assert g.values.tobytes() == w.values.tobytes(), name
  assert (got.true_risk is None) == (want.true_risk is None)
  assert list(got.true_risk or {}) == list(want.true_risk or {})
  for k, v in (want.true_risk or {}).items():
    assert got.true_risk[k].dtype == v.dtype and got.true_risk[k].tobytes() == v.tobytes()


def test_round_trip_is_exact(tmp_path):
  cohort = _cohort()
  path = build_tfds_cohort(cohort, tmp_path, name="toy")
  assert path == dataset_dir(tmp_path, "toy")
  assert any(p.name.startswith("survjax_cohort-patients.array_record") for p in path.iterdir())
  assert sorted(p.name for p in tmp_path.iterdir()) == ["survjax_cohort"]  # no scratch left
  assert_cohorts_identical(load_tfds_cohort(tmp_path, "toy"), cohort)


def test_existing_build_needs_overwrite(tmp_path):
  cohort = _cohort()
  build_tfds_cohort(cohort, tmp_path, name="toy")
  with pytest.raises(InputError, match="already exists"):
    build_tfds_cohort(cohort, tmp_path, name="toy")
  smaller = cohort.subset([4, 0])
  build_tfds_cohort(smaller, tmp_path, name="toy", overwrite=True)
  assert_cohorts_identical(load_tfds_cohort(tmp_path, "toy"), smaller)


def test_missing_build_and_bad_name(tmp_path):
  with pytest.raises(InputError, match="no tfds build") as info:
    load_tfds_cohort(tmp_path, "absent")
  assert str(tmp_path) in str(info.value)
  with pytest.raises(InputError, match="dataset name"):
    build_tfds_cohort(_cohort(), tmp_path)  # "toy cohort" has a space


@pytest.mark.parametrize("damage", ["truncated records", "empty records", "broken info"])
def test_damaged_build_is_one_input_error(tmp_path, damage):
  """A build tfds cannot read is one `InputError` naming its folder, not the reader's
  RuntimeError, ValueError or protobuf error."""
  path = build_tfds_cohort(_cohort(), tmp_path, name="toy")
  records = next(p for p in path.iterdir() if ".array_record" in p.name)
  if damage == "truncated records":
    records.write_bytes(records.read_bytes()[:-10])
  elif damage == "empty records":
    records.write_bytes(b"")
  else:
    (path / "dataset_info.json").write_text("{")
  with pytest.raises(InputError, match="cannot read this tfds build") as info:
    load_tfds_cohort(tmp_path, "toy")
  assert str(path) in str(info.value) and "\n" not in str(info.value)


_SCRIPT = """
import pickle, sys
from survjax.data.tfds_builder import build_tfds_cohort, load_tfds_cohort
cohort = pickle.load(open(sys.argv[1], "rb"))
build_tfds_cohort(cohort, sys.argv[2], name="toy")
assert "tensorflow" not in sys.modules, "building imported tensorflow"
got = load_tfds_cohort(sys.argv[2], "toy")
assert "tensorflow" not in sys.modules, "reading imported tensorflow"
print(",".join(got.case_ids))
"""


def test_build_and_read_without_tensorflow(tmp_path):
  cohort = _cohort()
  with open(tmp_path / "cohort.pkl", "wb") as f:
    pickle.dump(cohort, f)
  out = subprocess.run([sys.executable, "-c", _SCRIPT, str(tmp_path / "cohort.pkl"),
                        str(tmp_path / "data")], capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.strip().splitlines()[-1] == ",".join(cohort.case_ids)


def _write_file_cohort(root):
  """A 3-case CSV (case A with two slides) and its .npy features."""
  rng = np.random.default_rng(1)
  feats = root / "features"
  feats.mkdir()
  for slide, n in (("a1", 3), ("a2", 2), ("b1", 4), ("c1", 1)):
    np.save(feats / f"{slide}.npy", rng.normal(size=(n, 8)).astype(np.float32))
  csv = root / "clinical.csv"
  csv.write_text("case_id,slide_id,survival_months,censorship,x_rnaseq,y_cnv\n"
                 "A,a1,5.5,0,1.0,0\nA,a2,5.5,0,1.0,0\nB,b1,9,1,2.5,1\nC,c1,2,0,0.5,-1\n")
  return csv, feats


def test_prepare_cli(tmp_path):
  from survjax.data.formats import load_file_cohort
  csv, feats = _write_file_cohort(tmp_path)
  cmd = [sys.executable, "-m", "survjax.data.prepare", f"--clinical_csv={csv}",
         f"--features_dir={feats}", f"--data_dir={tmp_path / 'data'}", "--name=files"]
  out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr[-2000:]
  assert_cohorts_identical(load_tfds_cohort(tmp_path / "data", "files"),
                           load_file_cohort(csv, name="files", features_dir=feats))
  # Bad input: one line on stderr naming the file, exit status 2, nothing rewritten.
  np.save(feats / "b1.npy", np.full((2, 8), np.nan, np.float32))
  out = subprocess.run(cmd + ["--overwrite"], capture_output=True, text=True, timeout=120)
  assert out.returncode == 2
  last = out.stderr.strip().splitlines()[-1]
  assert "b1.npy" in last and "case B" in last and "NaN" in last, out.stderr
  assert len(load_tfds_cohort(tmp_path / "data", "files")) == 3
  assert last.startswith("survjax: bad input: "), last
  (tmp_path / "a_file").write_text("")
  out = subprocess.run(cmd[:-2] + [f"--data_dir={tmp_path / 'a_file'}", "--name=other"],
                       capture_output=True, text=True, timeout=120)
  lines = out.stderr.strip().splitlines()
  assert out.returncode == 2 and len(lines) == 1, out.stderr[-2000:]
  assert lines[0].startswith("survjax: bad input: ") and "--data_dir" in lines[0], lines[0]
