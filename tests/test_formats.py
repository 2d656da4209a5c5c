"""On-disk formats: feature files, clinical CSV, signatures, `load_file_cohort`."""

import h5py
import numpy as np
import pytest

from survjax.data.formats import (load_file_cohort, read_clinical_csv, read_features,
                                  read_signatures_csv)
from survjax.errors import InputError

HEADER = "case_id,slide_id,survival_months,censorship,oncotree_code,age,stage,"
HEADER += "TP53_rnaseq,TP53_cnv,EGFR_rnaseq,MYC_mut,KRAS_rnaseq"
ROWS = [
    "A,a1.svs,10.5,0,IDC,50,II,1.0,0,2.0,1,0.1",
    "A,a2,10.5,0,IDC,50,II,1.0,0,2.0,1,0.1",
    "B,b1,3,1,ILC,61,I,0.5,1,1.5,0,0.2",
    "C,c1,7.25,1,IDC,,,0.25,-1,1.25,0,0.3",
]
SIGNATURES = "Tumor Suppressor Genes,Oncogenes,Protein Kinases\nTP53,MYC,EGFR\n,EGFR,\n"


def _write_csv(path, rows, header=HEADER):
  path.write_text("\n".join([header, *rows]) + "\n")
  return path


@pytest.fixture
def files(tmp_path):
  """A tiny cohort: 3 cases, case A with two slides (.h5 in CLAM's [1, N, D] + .npy)."""
  rng = np.random.default_rng(0)
  feat = tmp_path / "features"
  feat.mkdir()
  bags = {"a1": rng.normal(size=(3, 4)), "a2": rng.normal(size=(2, 4)),
          "b1": rng.normal(size=(5, 4)), "c1": rng.normal(size=(1, 4))}
  with h5py.File(feat / "a1.h5", "w") as f:
    f["features"] = bags["a1"][None].astype(np.float32)
    f["coords"] = np.zeros((3, 2), np.int64)
  np.save(feat / "a2.npy", bags["a2"].astype(np.float32))
  np.save(feat / "b1.npy", bags["b1"].astype(np.float32))
  with h5py.File(feat / "c1.h5", "w") as f:
    f["features"] = bags["c1"].astype(np.float16)
  csv = _write_csv(tmp_path / "clinical.csv", ROWS)
  sig = tmp_path / "signatures.csv"
  sig.write_text(SIGNATURES)
  return {"csv": csv, "features": feat, "signatures": sig, "bags": bags, "tmp": tmp_path}


def _assert_input_error(fn, path, case=None, match=None):
  """``fn`` raises a one-line InputError naming ``path`` (and ``case``)."""
  with pytest.raises(InputError) as info:
    fn()
  msg = str(info.value)
  assert "\n" not in msg, msg
  assert str(path) in msg, msg
  if case is not None:
    assert f"case {case}" in msg, msg
  if match is not None:
    assert match in msg, msg
  return msg


# --------------------------------------------------------------------------- loading


def test_file_cohort_bags_concatenated_in_slide_order(files):
  cohort = load_file_cohort(files["csv"], name="tiny", features_dir=files["features"])
  assert list(cohort.case_ids) == ["A", "B", "C"]
  np.testing.assert_array_equal(cohort.time, [10.5, 3.0, 7.25])
  np.testing.assert_array_equal(cohort.event, [True, False, False])
  path = cohort.modalities["pathology"]
  assert path.kind == "bag" and path.available.all()
  bags = files["bags"]
  expected = [np.concatenate([bags["a1"], bags["a2"]]), bags["b1"], bags["c1"]]
  for got, want in zip(path.bags, expected):
    assert got.dtype == np.float16
    np.testing.assert_array_equal(got, want.astype(np.float16))


def test_genomic_groups_by_suffix_without_signatures(files):
  gen = load_file_cohort(files["csv"], name="tiny").modalities["genomics"]
  assert gen.kind == "tokens"
  assert gen.columns == ("TP53_rnaseq", "TP53_cnv", "EGFR_rnaseq", "MYC_mut", "KRAS_rnaseq")
  assert gen.groups == (("rnaseq", (0, 2, 4)), ("cnv", (1,)), ("mut", (3,)))
  np.testing.assert_array_equal(gen.values[1], np.float32([0.5, 1, 1.5, 0, 0.2]))


def test_signature_groups_as_mcat(files):
  gen = load_file_cohort(files["csv"], name="tiny", signatures_csv=files["signatures"]
                         ).modalities["genomics"]
  # KRAS is in no family and is dropped; each family takes all its genes' columns,
  # sorted by name as MCAT does; EGFR belongs to two families.
  assert gen.columns == ("TP53_rnaseq", "TP53_cnv", "EGFR_rnaseq", "MYC_mut")
  cols = {name: [gen.columns[i] for i in idx] for name, idx in gen.groups}
  assert cols == {"Tumor Suppressor Genes": ["TP53_cnv", "TP53_rnaseq"],
                  "Oncogenes": ["EGFR_rnaseq", "MYC_mut"],
                  "Protein Kinases": ["EGFR_rnaseq"]}


def test_tabular_tokens_and_one_hot(files):
  cohort = load_file_cohort(files["csv"], name="tiny", tabular={
      "clinical": ["age", "stage"], "tumor": {"type": ["oncotree_code"]}})
  clin = cohort.modalities["clinical"]
  assert clin.columns == ("age", "stage=I", "stage=II")
  assert clin.groups == (("age", (0,)), ("stage", (1, 2)))
  np.testing.assert_array_equal(clin.available, [True, True, False])  # C: all empty
  np.testing.assert_array_equal(clin.values, np.float32([[50, 0, 1], [61, 1, 0], [0, 0, 0]]))
  tumor = cohort.modalities["tumor"]
  assert tumor.groups == (("type", (0, 1)),) and tumor.columns == (
      "oncotree_code=IDC", "oncotree_code=ILC")


def test_radiology_missing_case_is_unavailable(files):
  rad = files["tmp"] / "radiology"
  rad.mkdir()
  np.save(rad / "B.npy", np.ones((7, 3), np.float32))
  mod = load_file_cohort(files["csv"], name="tiny", radiology_dir=rad).modalities["radiology"]
  np.testing.assert_array_equal(mod.available, [False, True, False])
  assert [b.shape for b in mod.bags] == [(0, 3), (7, 3), (0, 3)]


def test_allow_missing_pathology(files):
  (files["features"] / "b1.npy").unlink()
  rows = ROWS + ["D,,4,0,IDC,40,I,1,1,1,1,1"]
  csv = _write_csv(files["tmp"] / "c2.csv", rows)
  cohort = load_file_cohort(csv, name="tiny", features_dir=files["features"],
                            allow_missing=("pathology",))
  path = cohort.modalities["pathology"]
  np.testing.assert_array_equal(path.available, [True, False, True, False])
  assert path.bags[1].shape == (0, 4)


def test_allow_missing_genomics(files):
  csv = _write_csv(files["tmp"] / "c2.csv", ROWS + ["D,d1,4,0,IDC,40,I,,,,,"])
  _assert_input_error(lambda: load_file_cohort(csv, name="t"), csv, "D",
                      match="allow_missing=('genomics',)")
  gen = load_file_cohort(csv, name="t", allow_missing=("genomics",)).modalities["genomics"]
  np.testing.assert_array_equal(gen.available, [True, True, True, False])
  assert not gen.values[3].any()
  partial = _write_csv(files["tmp"] / "c3.csv", ROWS + ["D,d1,4,0,IDC,40,I,1,,1,1,1"])
  _assert_input_error(lambda: load_file_cohort(partial, name="t", allow_missing=("genomics",)),
                      partial, "D", match="'TP53_cnv' is empty")
  _assert_input_error(lambda: load_file_cohort(csv, name="t", allow_missing=("genomcs",)),
                      csv, match="'genomcs'")


def test_pt_features(tmp_path):
  torch = pytest.importorskip("torch")
  x = np.arange(12, dtype=np.float32).reshape(3, 4)
  torch.save(torch.from_numpy(x), tmp_path / "s.pt")
  np.testing.assert_array_equal(read_features(tmp_path / "s.pt"), x.astype(np.float16))


def test_pt_reader_logic_with_stub_torch(tmp_path, monkeypatch):
  """Runs where torch is absent: a stub checks the call and the dict/tensor handling."""
  import sys
  import types

  class Tensor:
    def __init__(self, a):
      self.a = a

    def detach(self):
      return self

    def cpu(self):
      return self

    def to(self, dtype):
      assert dtype == "float32"
      return Tensor(self.a.astype(np.float32))

    def numpy(self):
      return self.a

  x = np.arange(8, dtype=np.float64).reshape(2, 4)
  calls = []

  def load(path, map_location=None, weights_only=False):
    calls.append(weights_only)
    return {"features": Tensor(x), "coords": None}

  monkeypatch.setitem(sys.modules, "torch", types.SimpleNamespace(
      Tensor=Tensor, float32="float32", load=load))
  (tmp_path / "s.pt").write_bytes(b"stub")
  np.testing.assert_array_equal(read_features(tmp_path / "s.pt"), x.astype(np.float16))
  assert calls == [True]  # weights_only=True: never unpickle arbitrary objects


def test_pt_without_torch_says_what_to_install(tmp_path, monkeypatch):
  import sys
  monkeypatch.setitem(sys.modules, "torch", None)  # makes `import torch` fail
  (tmp_path / "s.pt").write_bytes(b"x")
  _assert_input_error(lambda: read_features(tmp_path / "s.pt", case_id="A"),
                      tmp_path / "s.pt", "A", match="pip install survjax[torch]")


# --------------------------------------------------------------------------- bad features


def _bad_npy(tmp_path, arr):
  np.save(tmp_path / "x.npy", arr)
  return tmp_path / "x.npy"


@pytest.mark.parametrize("arr, match", [
    (np.zeros((2, 3, 4), np.float32), "2-D"),
    (np.zeros((0, 4), np.float32), "empty bag"),
    (np.array([[1.0, np.nan, 0, 0]], np.float32), "NaN"),
    (np.array([[1.0, 0, -np.inf, 0]], np.float32), "inf"),
    (np.array([[1e6, 0, 0, 0]], np.float32), "float16"),
    (np.zeros((2, 5), np.float32), "expected 4"),
])
def test_bad_feature_arrays(tmp_path, arr, match):
  path = _bad_npy(tmp_path, arr)
  _assert_input_error(lambda: read_features(path, expected_dim=4, case_id="P1"), path, "P1",
                      match=match)


def test_feature_file_missing_or_unreadable(tmp_path):
  _assert_input_error(lambda: read_features(tmp_path / "no.h5", case_id="P1"),
                      tmp_path / "no.h5", "P1", match="not found")
  (tmp_path / "bad.h5").write_bytes(b"not an hdf5 file")
  _assert_input_error(lambda: read_features(tmp_path / "bad.h5", case_id="P1"),
                      tmp_path / "bad.h5", "P1", match="cannot read")
  with h5py.File(tmp_path / "nofeat.h5", "w") as f:
    f["coords"] = np.zeros((2, 2))
  _assert_input_error(lambda: read_features(tmp_path / "nofeat.h5", case_id="P1"),
                      tmp_path / "nofeat.h5", "P1", match="'features'")


def test_missing_slide_file_names_file_and_case(files):
  (files["features"] / "b1.npy").unlink()
  _assert_input_error(
      lambda: load_file_cohort(files["csv"], name="t", features_dir=files["features"]),
      files["features"] / "b1", "B", match="not found")


def test_wrong_dim_across_slides_names_file_and_case(files):
  np.save(files["features"] / "b1.npy", np.zeros((2, 6), np.float32))
  _assert_input_error(
      lambda: load_file_cohort(files["csv"], name="t", features_dir=files["features"]),
      files["features"] / "b1.npy", "B", match="expected 4")


def test_case_without_slide_id(files):
  csv = _write_csv(files["tmp"] / "c2.csv", ROWS + ["D,,4,0,IDC,40,I,1,1,1,1,1"])
  _assert_input_error(
      lambda: load_file_cohort(csv, name="t", features_dir=files["features"]), csv, "D",
      match="slide_id")


# --------------------------------------------------------------------------- bad CSV


@pytest.mark.parametrize("row, case, match", [
    ("D,d1,,0,IDC,40,I,1,1,1,1,1", "D", "missing"),
    ("D,d1,-2,0,IDC,40,I,1,1,1,1,1", "D", "expected a number > 0"),
    ("D,d1,0,0,IDC,40,I,1,1,1,1,1", "D", "expected a number > 0"),
    ("D,d1,soon,0,IDC,40,I,1,1,1,1,1", "D", "'soon'"),
    ("D,d1,4,2,IDC,40,I,1,1,1,1,1", "D", "expected 0 or 1"),
    ("D,d1,4,yes,IDC,40,I,1,1,1,1,1", "D", "expected 0 or 1"),
    ("D,d1,4,0,IDC,40,I,1,1,high,1,1", "D", "EGFR_rnaseq"),
    ("B,b2,4,1,ILC,61,I,0.5,1,1.5,0,0.2", "B", "survival_months differs"),
    ("B,b2,3,0,ILC,61,I,0.5,1,1.5,0,0.2", "B", "event/censorship differs"),
    ("B,b2,3,1,ILC,61,I,0.5,1,1.5,1,0.2", "B", "'MYC_mut' differs"),
    ("D,b1,4,0,IDC,40,I,1,1,1,1,1", "D", "listed twice"),
])
def test_bad_clinical_rows(tmp_path, row, case, match):
  csv = _write_csv(tmp_path / "clinical.csv", ROWS + [row])
  _assert_input_error(lambda: read_clinical_csv(csv), csv, case, match=match)


@pytest.mark.parametrize("drop", ["case_id", "slide_id", "survival_months", "censorship"])
def test_missing_column(tmp_path, drop):
  cols = HEADER.split(",")
  keep = [i for i, c in enumerate(cols) if c != drop]
  rows = [",".join(r.split(",")[i] for i in keep) for r in ROWS]
  csv = _write_csv(tmp_path / "clinical.csv", rows, header=",".join(cols[i] for i in keep))
  _assert_input_error(lambda: read_clinical_csv(csv), csv, match=f"'{drop}'")


def test_empty_csv(tmp_path):
  empty = tmp_path / "empty.csv"
  empty.write_text("")
  _assert_input_error(lambda: read_clinical_csv(empty), empty, match="empty file")
  header_only = _write_csv(tmp_path / "header.csv", [])
  _assert_input_error(lambda: read_clinical_csv(header_only), header_only, match="empty file")


def test_event_column_instead_of_censorship(tmp_path):
  rows = ["A,a1,5,1", "B,b1,6,0"]
  csv = _write_csv(tmp_path / "c.csv", rows, header="case_id,slide_id,survival_months,event")
  table = read_clinical_csv(csv)
  np.testing.assert_array_equal(table.event, [True, False])
  assert table.gene_columns == ()


def test_signature_family_without_columns(files):
  sig = files["tmp"] / "sig.csv"
  sig.write_text("Oncogenes,Cytokines_and_Growth_Factors\nMYC,IL6\n,TNF\n")
  msg = _assert_input_error(
      lambda: read_signatures_csv(sig, ("MYC_mut", "TP53_cnv"), clinical_csv=files["csv"]),
      sig, match="Cytokines_and_Growth_Factors")
  assert str(files["csv"]) in msg


# --------------------------------------------------------------------------- sksurv breast


def test_breast_cancer_cohort():
  from sksurv.datasets import load_breast_cancer

  from survjax.data.breast import load_breast_cancer_cohort
  x, y = load_breast_cancer()
  cohort = load_breast_cancer_cohort()
  assert len(cohort) == 198 and cohort.event.sum() == y["e.tdm"].sum()
  np.testing.assert_array_equal(cohort.time, y["t.tdm"])
  genes, clin = cohort.modalities["genes"], cohort.modalities["clinical"]
  assert genes.values.shape == (198, 76) and genes.group_sizes == (19, 19, 19, 19)
  assert sorted(i for _, idx in genes.groups for i in idx) == list(range(76))
  assert sorted(i for _, idx in clin.groups for i in idx) == list(range(clin.dim))
  assert set(genes.columns) | {g for g, _ in clin.groups} == set(x.columns)
  assert [g for g, _ in clin.groups] == [c for c in x.columns if c in
                                         ("age", "er", "grade", "size", "tumor")]
  # raw values; the numeric columns are z-scored per training fold (test_fold_standardise)
  np.testing.assert_allclose(genes.values, x[list(genes.columns)].to_numpy(np.float32))
  for name, idx in clin.groups:
    if len(idx) > 1:  # one-hot categorical
      np.testing.assert_array_equal(clin.values[:, idx].sum(1), 1, err_msg=name)
