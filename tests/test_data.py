"""Synthetic cohort, time bins, splits and batching against independent references."""

import os
import subprocess
import sys

import numpy as np
import pytest
from sksurv.metrics import concordance_index_censored

from survjax.data.batching import BatchSpec, iterate_batches, make_batch
from survjax.data.splits import load_or_make_folds, read_splits_csv
from survjax.data.synthetic import SyntheticSpec, make_synthetic_cohort
from survjax.data.timebins import assign_time_bins, fit_time_bins
from survjax.errors import InputError


@pytest.fixture(scope="module")
def cohort():
  return make_synthetic_cohort(SyntheticSpec(n_patients=300, seed=1))


def _c(t, e, r):
  return concordance_index_censored(e.astype(bool), t, r)[0]


def test_synthetic_is_deterministic_per_seed():
  a = make_synthetic_cohort(SyntheticSpec(n_patients=30, seed=4))
  b = make_synthetic_cohort(SyntheticSpec(n_patients=30, seed=4))
  c = make_synthetic_cohort(SyntheticSpec(n_patients=30, seed=5))
  np.testing.assert_array_equal(a.time, b.time)
  for x, y in zip(a.modalities["pathology"].bags, b.modalities["pathology"].bags):
    np.testing.assert_array_equal(x, y)
  np.testing.assert_array_equal(a.modalities["genomics"].values, b.modalities["genomics"].values)
  assert not np.array_equal(a.time, c.time)


_TIMES = """
import sys
import numpy as np
from survjax.data.synthetic import SyntheticSpec, make_synthetic_cohort
c = make_synthetic_cohort(SyntheticSpec(n_patients=400, patch_dim=8, bag_min=2, bag_max=4))
sys.stdout.write(np.concatenate([c.time, c.event]).astype(np.float64).tobytes().hex())
"""


def test_synthetic_times_do_not_depend_on_numpy_simd_dispatch():
  """numpy's AVX-512 and AVX2 `exp`/`log` differ in the last bit for some inputs (9 of
  these 400 raw times); the cohort's times and events (censoring cuts at one patient's
  event time) are the same under both. On a CPU without AVX-512 both runs take the AVX2
  path."""
  runs = []
  for disable in ("", "X86_V4 AVX512_ICL AVX512_SPR"):
    env = dict(os.environ, NPY_DISABLE_CPU_FEATURES=disable, JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", _TIMES], capture_output=True, text=True,
                         env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    runs.append(np.frombuffer(bytes.fromhex(out.stdout), np.float64))
  np.testing.assert_array_equal(runs[0], runs[1])
  assert len(np.unique(runs[0][:400])) == 400   # rounding made no ties


def test_censoring_ignores_the_last_bit_of_event_times():
  """Event times one ulp apart (numpy's AVX-512 and AVX2 `exp` differ so) give the same
  times and events, the patient censoring cuts at included."""
  from survjax.data.synthetic import _censor
  for seed in range(20):
    rng = np.random.default_rng(seed)
    t, u = rng.exponential(30.0, size=400), rng.uniform(size=400)
    time, event = _censor(t, u, 0.5)
    for direction in (np.inf, 0.0):
      time2, event2 = _censor(np.nextafter(t, direction), u, 0.5)
      np.testing.assert_array_equal(event2, event, err_msg=f"seed {seed}")
      np.testing.assert_array_equal(time2, time, err_msg=f"seed {seed}")


@pytest.mark.parametrize("target", [0.3, 0.5, 0.7])
def test_censoring_rate_matches_the_target(target):
  c = make_synthetic_cohort(SyntheticSpec(n_patients=1000, censoring=target, bag_max=64))
  assert abs((1 - c.event.mean()) - target) < 0.02


def test_oracle_ordering_and_modalities(cohort):
  big = make_synthetic_cohort(SyntheticSpec(n_patients=1000, seed=1, bag_max=70))
  full = _c(big.time, big.event, big.true_risk["genomics+pathology"])
  mp = _c(big.time, big.event, big.true_risk["genomics"])
  mg = _c(big.time, big.event, big.true_risk["pathology"])
  assert 0.72 < full < 0.9
  assert full > mp + 0.02 and full > mg + 0.02
  assert mp > 0.6 and mg > 0.6
  g = cohort.modalities["genomics"]
  assert len(g.groups) == 6 and len(set(g.group_sizes)) > 1
  lens = cohort.modalities["pathology"].lengths()
  assert lens.min() >= 64 and lens.max() <= 480 and cohort.modalities["pathology"].bags[0].dtype == np.float16


def test_time_bins_hold_equal_uncensored_counts():
  rng = np.random.default_rng(0)
  t = rng.exponential(10, 403)
  e = rng.uniform(size=403) < 0.6
  edges = fit_time_bins(t, e, 4)
  bins = assign_time_bins(t, edges)
  counts = np.bincount(bins[e], minlength=4)
  assert counts.max() - counts.min() <= 1
  # k = max{k : tau_k <= t}: a time equal to an edge starts the next bin.
  assert assign_time_bins(np.array([edges[0]]), edges)[0] == 1
  assert assign_time_bins(np.array([1e-9, 1e9]), edges).tolist() == [0, 3]


def test_folds_partition_patients_and_are_reused(cohort, tmp_path):
  folds = load_or_make_folds(cohort.case_ids, cohort.time, cohort.event, num_folds=5, seed=0,
                             splits_dir=tmp_path, dataset="d")
  val = np.concatenate([va for _, va in folds])
  assert sorted(val.tolist()) == list(range(len(cohort)))  # each patient tested exactly once
  for tr, va in folds:
    assert not set(tr) & set(va)
    assert len(tr) + len(va) == len(cohort)
    assert abs(cohort.event[va].mean() - cohort.event.mean()) < 0.06  # stratified
  train, v0 = read_splits_csv(tmp_path / "d" / "splits_0.csv")
  assert set(v0) == set(cohort.case_ids[folds[0][1]]) and len(train) == len(folds[0][0])
  # Read back, not redrawn: identical folds. Another seed would draw other folds; the
  # folder's folds were drawn with seed 0, so that is refused rather than silently reused.
  again = load_or_make_folds(cohort.case_ids, cohort.time, cohort.event, num_folds=5, seed=0,
                             splits_dir=tmp_path, dataset="d")
  for (a, b), (c, d) in zip(folds, again):
    np.testing.assert_array_equal(a, c)
    np.testing.assert_array_equal(b, d)
  with pytest.raises(InputError, match="drawn with seed 0, this run asks for .* cv.seed=9"):
    load_or_make_folds(cohort.case_ids, cohort.time, cohort.event, num_folds=5, seed=9,
                       splits_dir=tmp_path, dataset="d")


def test_split_file_with_unknown_case_is_rejected(cohort, tmp_path):
  load_or_make_folds(cohort.case_ids, cohort.time, cohort.event, num_folds=3, seed=0,
                     splits_dir=tmp_path, dataset="d")
  path = tmp_path / "d" / "splits_1.csv"
  path.write_text(path.read_text().replace(cohort.case_ids[0], "TCGA-XX-0000", 1))
  with pytest.raises(InputError, match="splits_1.csv: case TCGA-XX-0000: unknown case id"):
    load_or_make_folds(cohort.case_ids, cohort.time, cohort.event, num_folds=3, seed=0,
                       splits_dir=tmp_path, dataset="d")


def test_split_files_holding_out_a_case_twice_are_rejected(cohort, tmp_path):
  """Each case is held out by exactly one fold: a case in two folds' val (two out-of-fold
  risks) or twice in one column is one `InputError` naming the file and the case."""
  from survjax.data.splits import write_splits_csv
  folds = load_or_make_folds(cohort.case_ids, cohort.time, cohort.event, num_folds=3, seed=0,
                             splits_dir=tmp_path, dataset="d")
  ids = cohort.case_ids
  moved = ids[folds[0][1][0]]   # held out by fold 0, also by fold 1 now
  train1 = [c for c in ids[folds[1][0]] if c != moved]
  write_splits_csv(tmp_path / "d" / "splits_1.csv", train1, [*ids[folds[1][1]], moved])
  with pytest.raises(InputError, match=f"splits_1.csv: case {moved}: case held out"):
    load_or_make_folds(ids, cohort.time, cohort.event, num_folds=3, seed=0,
                       splits_dir=tmp_path, dataset="d")
  write_splits_csv(tmp_path / "d" / "splits_1.csv", [*ids[folds[1][0]], ids[folds[1][0][0]]],
                   list(ids[folds[1][1]]))
  with pytest.raises(InputError, match="listed twice in the train column"):
    load_or_make_folds(ids, cohort.time, cohort.event, num_folds=3, seed=0,
                       splits_dir=tmp_path, dataset="d")


def test_batches_have_static_shapes_masks_and_hidden_modalities(cohort):
  spec = BatchSpec(batch_size=16, max_instances=100)
  rng = np.random.default_rng(0)
  idx = np.arange(40)
  batches = list(iterate_batches(cohort, idx, spec, shuffle_rng=rng, sample_rng=rng))
  assert len(batches) == 3
  for b in batches:
    assert b["modalities"]["pathology"]["x"].shape == (16, 100, 128)  # capped: max_instances
    assert b["modalities"]["genomics"]["x"].shape == (16, 264)
  last = batches[-1]
  assert last["valid"].sum() == 8 and (last["index"][8:] == -1).all()
  assert not last["modalities"]["pathology"]["mask"][8:].any()
  seen = np.concatenate([b["index"][b["valid"]] for b in batches])
  assert sorted(seen.tolist()) == idx.tolist()
  # Real instances are rows of the patient's bag; padding is masked.
  b0 = batches[0]
  j = 0
  i = b0["index"][j]
  bag = cohort.modalities["pathology"].bags[i]
  n = b0["modalities"]["pathology"]["mask"][j].sum()
  assert n == min(len(bag), 100)
  rows = {r.tobytes() for r in bag}
  assert all(r.tobytes() in rows for r in b0["modalities"]["pathology"]["x"][j, :n])
  hidden = make_batch(cohort, idx[:4], BatchSpec(4), hide=("genomics",), fill=np.nan)
  assert not hidden["modalities"]["genomics"]["available"].any()
  assert np.isnan(hidden["modalities"]["genomics"]["x"]).all()
  assert hidden["modalities"]["pathology"]["available"].all()


def test_eval_batches_keep_whole_bags_in_few_buckets(cohort):
  spec = BatchSpec(batch_size=32)
  shapes = {b["modalities"]["pathology"]["x"].shape[1]
            for b in iterate_batches(cohort, np.arange(len(cohort)), spec, sort_by_length=True)}
  assert shapes <= {256, 1024}


def test_validate_names_file_case_and_expectation(cohort):
  bad = cohort.subset(np.arange(5))
  bad.time[2] = -1.0
  with pytest.raises(InputError) as e:
    bad.validate(source="clinical.csv")
  msg = str(e.value)
  assert msg.startswith("clinical.csv: case SYN-01-00002: survival time") and "> 0" in msg
  assert "\n" not in msg
  bad = cohort.subset(np.arange(5))
  bad.time = np.asarray(bad.time, np.float64)
  bad.time[1] = 1e300   # finite, but inf in the float32 batches
  with pytest.raises(InputError, match=r"case SYN-01-00001: survival time 1e\+300, .*float32"):
    bad.validate(source="clinical.csv")
  bad = cohort.subset(np.arange(5))
  bad.modalities["pathology"].bags[3] = bad.modalities["pathology"].bags[3][:, :64]
  with pytest.raises(InputError, match="case SYN-01-00003: pathology feature dimension 64, expected 128"):
    bad.validate()


def _oos_r2(x, y):
  """Out-of-sample R^2 of a least-squares fit of y on x (fit on one half, test on the other)."""
  x = np.concatenate([x, np.ones((len(x), 1))], 1)
  h = len(x) // 2
  coef = np.linalg.lstsq(x[:h], y[:h], rcond=None)[0]
  resid = y[h:] - x[h:] @ coef
  return 1.0 - resid.var() / y[h:].var()


@pytest.mark.parametrize("coupling", [0.0, 0.7])
def test_missing_modality_oracle_is_the_conditional_mean(coupling):
  """The missing-genomics oracle is a function of what pathology shows (predicted from it
  with R^2 ~ 1), and what it leaves out of the full risk cannot be predicted from
  pathology: it is the conditional mean. With coupling, pathology predicts more of the
  full risk (part of the genomics-specific risk)."""
  c = make_synthetic_cohort(SyntheticSpec(n_patients=4000, seed=3, coupling=coupling,
                                          bag_min=64, bag_max=64, signal_frac=0.5))
  # A patient's mean patch is affine in its [s, a_P] plus noise: pathology's view.
  x = np.stack([b.astype(np.float64).mean(0) for b in c.modalities["pathology"].bags])
  t = c.true_risk
  full, seen = t["genomics+pathology"], t["pathology"]
  assert _oos_r2(x, seen) > 0.98
  # 128 features fitted on 2000 patients: a useless predictor scores about -128/2000.
  assert _oos_r2(x, full - seen) < 0.01
  r2_full = _oos_r2(x, full)
  assert (r2_full > 0.8) if coupling else (r2_full < 0.75)
