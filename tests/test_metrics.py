"""Metrics against scikit-survival (exact) and against independent textbook computations."""

import math
import time as _time
import warnings

import numpy as np
import pytest
from scipy import stats

from survjax.errors import InputError
from survjax.evaluate import km, metrics
from survjax.evaluate.representations import (between_patient_spread, centred_cosine,
                                              representation_diagnostics)


# ---- C-index ----------------------------------------------------------------------------------

def _sksurv_cindex(time, event, risk):
  """sksurv's result, or None where it raises or gives NaN (0/0: no comparable pair)."""
  from sksurv.metrics import concordance_index_censored
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore", RuntimeWarning)
      out = concordance_index_censored(np.asarray(event, bool), time, risk)
  except ValueError:
    return None
  return out if np.isfinite(out[0]) else None


def _random_case(rng, n, kind):
  time = rng.integers(1, int(rng.integers(2, 15)), n).astype(np.float64)   # many time ties
  event = rng.random(n) < rng.uniform(0.05, 0.6)                           # heavy censoring
  if kind == "int":
    risk = rng.integers(0, 5, n).astype(np.float64)                        # many risk ties
  elif kind == "near":   # differences around the 1e-8 tie tolerance
    risk = 1.0 + rng.integers(0, 5, n) * 1e-8 + rng.choice([0.0, 3e-9, -4e-9, 1.5e-8], n)
  elif kind == "grid":   # |r_i - r_j| exactly 1e-8: tied (sksurv ties are <= tol)
    risk = rng.integers(0, 4, n) * 1e-8
  elif kind == "f32":
    risk = rng.normal(size=n).round(1).astype(np.float32)
  else:
    risk = rng.normal(size=n)
  return time, event, risk


_KINDS = ["int", "near", "grid", "f32", "normal"]


@pytest.mark.parametrize("kind", _KINDS)
def test_cindex_equals_sksurv_exactly(kind):
  rng = np.random.default_rng(_KINDS.index(kind))
  sizes = [2, 2, 3, 3, 4, 5, 7, 10, 16, 30, 64, 100, 257, 600, 2000]
  n_checked = 0
  for n in sizes + list(rng.integers(2, 40, 40)):
    time, event, risk = _random_case(rng, int(n), kind)
    ref = _sksurv_cindex(time, event, risk)
    if ref is None:
      with pytest.raises(InputError):
        metrics.concordance_index(time, event, risk)
      continue
    got = metrics.concordance_index(time, event, risk)
    assert tuple(got) == tuple(ref), (n, got, ref)   # all five outputs, bit for bit
    n_checked += 1
  assert n_checked >= 35


def test_cindex_by_hand():
  # times 1 (event), 2 (event), 2 (censored), 3 (censored), 3 (event).
  time = np.array([1.0, 2.0, 2.0, 3.0, 3.0])
  event = np.array([1, 1, 0, 0, 1])
  risk = np.array([0.9, 0.5, 0.5, 0.1, 0.7])
  # comparable: (0,1) con, (0,2) con, (0,3) con, (0,4) con, (1,2) tied time & tied risk,
  # (1,3) con, (1,4) dis, (4,3) tied time & con.
  c, con, dis, tr, tt = metrics.concordance_index(time, event, risk)
  assert (con, dis, tr, tt) == (6, 1, 1, 2)
  assert c == pytest.approx(6.5 / 8, abs=1e-15)


def test_cindex_100k_closed_form_and_fast():
  n = 100_000
  rng = np.random.default_rng(0)
  time = rng.permutation(n).astype(np.float64) + 1.0       # distinct times
  event = np.ones(n, bool)
  pairs = n * (n - 1) // 2
  t0 = _time.perf_counter()
  assert metrics.concordance_index(time, event, -time) == (1.0, pairs, 0, 0, 0)
  assert _time.perf_counter() - t0 < 20.0                  # ~0.1 s; generous on a busy box
  assert metrics.concordance_index(time, event, time) == (0.0, 0, pairs, 0, 0)
  assert metrics.concordance_index(time, event, np.zeros(n)) == (0.5, 0, 0, pairs, 0)
  # with censoring: event i is comparable with every later patient.
  event = rng.random(n) < 0.3
  rank_desc = n - np.argsort(np.argsort(time))              # patients with time >= t_i
  out = metrics.concordance_index(time, event, -time)
  assert out[1] == int((rank_desc[event] - 1).sum()) and out[2:] == (0, 0, 0)


def test_cindex_bad_input():
  with pytest.raises(InputError, match="without any event"):
    metrics.concordance_index([1.0, 2.0, 3.0], [0, 0, 0], [1.0, 2.0, 3.0])
  with pytest.raises(InputError, match="no comparable pair"):
    metrics.concordance_index([1.0, 2.0, 3.0], [0, 0, 1], [1.0, 2.0, 3.0])
  with pytest.raises(InputError, match="no comparable pair"):
    metrics.concordance_index([2.0, 2.0], [1, 1], [1.0, 2.0])
  with pytest.raises(InputError, match="at least 2"):
    metrics.concordance_index([1.0], [1], [1.0])
  with pytest.raises(InputError, match="NaN"):
    metrics.concordance_index([1.0, 2.0], [1, 1], [np.nan, 1.0])
  with pytest.raises(InputError, match="0/1"):
    metrics.concordance_index([1.0, 2.0], [2, 1], [0.0, 1.0])
  with pytest.raises(InputError, match="shape"):
    metrics.concordance_index([1.0, 2.0], [1, 1], [0.0, 1.0, 2.0])
  for msg in ("no comparable pair", "without any event"):
    try:
      metrics.concordance_index([1.0, 2.0], [0, 1 if "pair" in msg else 0], [0.0, 1.0])
    except InputError as e:
      assert "\n" not in str(e) and msg in str(e)


# ---- IPCW metrics ---------------------------------------------------------------------------------

def _cohort(rng, n, censor=True, ties=False):
  t = rng.exponential(5.0, n)
  if ties:
    t = np.ceil(t)
  e = rng.random(n) < 0.6 if censor else np.ones(n, bool)
  return t, e


def test_uno_c_is_sksurv_and_harrell_without_censoring():
  from sksurv.metrics import concordance_index_ipcw
  from sksurv.util import Surv
  rng = np.random.default_rng(0)
  tr_t, tr_e = _cohort(rng, 200)
  tr_t[np.argmax(tr_t)] += 100.0                           # training follow-up covers the test
  te_t, te_e = _cohort(rng, 80)
  risk = -te_t + rng.normal(0, 3, 80)
  got = metrics.uno_c(tr_t, tr_e.astype(int), te_t, te_e.astype(int), risk)
  want = concordance_index_ipcw(Surv.from_arrays(tr_e, tr_t), Surv.from_arrays(te_e, te_t),
                                risk)[0]
  assert isinstance(got, float) and got == want
  got_tau = metrics.uno_c(tr_t, tr_e, te_t, te_e, risk, tau=4.0)
  assert got_tau == concordance_index_ipcw(Surv.from_arrays(tr_e, tr_t),
                                           Surv.from_arrays(te_e, te_t), risk, tau=4.0)[0]
  # no censoring anywhere (G = 1) and distinct times: Uno's C is Harrell's C.
  tr_t, tr_e = _cohort(rng, 200, censor=False)
  te_t, te_e = _cohort(rng, 60, censor=False)
  te_t = np.minimum(te_t, tr_t.max() - 1e-6)
  risk = -te_t + rng.normal(0, 3, 60)
  assert metrics.uno_c(tr_t, tr_e, te_t, te_e, risk) == pytest.approx(
      metrics.concordance_index(te_t, te_e, risk)[0], abs=1e-12)


def test_uno_c_test_events_after_training_followup():
  rng = np.random.default_rng(1)
  tr_t, tr_e = _cohort(rng, 50)
  te_t, te_e = _cohort(rng, 30)
  te_t[0], te_e[0] = tr_t.max() + 10.0, True
  with pytest.raises(InputError, match="after the last training time"):
    metrics.uno_c(tr_t, tr_e, te_t, te_e, rng.normal(size=30))
  tau = float(np.quantile(tr_t, 0.5))
  assert 0.0 <= metrics.uno_c(tr_t, tr_e, te_t, te_e, rng.normal(size=30), tau=tau) <= 1.0


def test_integrated_brier_against_uncensored_formula_and_sksurv():
  from sksurv.metrics import integrated_brier_score
  from sksurv.util import Surv
  rng = np.random.default_rng(2)
  tr_t, tr_e = _cohort(rng, 100, censor=False)
  te_t, te_e = _cohort(rng, 40, censor=False)
  te_t = np.minimum(te_t, tr_t.max() - 1e-6)
  times = np.array([0.5, 1.0, 2.0, 3.0, 5.0, 8.0])
  times = times[(times >= te_t.min()) & (times < te_t.max())]
  scale = rng.uniform(2, 8, 40)[:, None]
  surv = np.exp(-times[None, :] / scale)
  # without censoring G = 1 and BS(t) = mean_i (S_i(t) - 1[t_i > t])^2.
  bs = ((surv - (te_t[:, None] > times[None, :])) ** 2).mean(0)
  want = np.trapezoid(bs, times) / (times[-1] - times[0])
  got = metrics.integrated_brier(tr_t, tr_e, te_t, te_e, surv, times)
  assert got == pytest.approx(want, rel=1e-12)
  # times out of range are dropped with their columns; unsorted times are fine.
  extra = np.r_[times, te_t.min() - 0.1, te_t.max() + 1.0]
  surv_extra = np.c_[surv, np.full((40, 2), 0.5)]
  perm = rng.permutation(extra.size)
  got2 = metrics.integrated_brier(tr_t, tr_e, te_t, te_e, surv_extra[:, perm], extra[perm])
  assert got2 == got
  # censored data: same as sksurv called directly.
  tr_t, tr_e = _cohort(rng, 150)
  tr_t[np.argmax(tr_t)] += 100.0
  te_t, te_e = _cohort(rng, 50)
  times = np.linspace(np.quantile(te_t, 0.1), np.quantile(te_t, 0.8), 7)
  surv = np.exp(-times[None, :] / rng.uniform(2, 8, 50)[:, None])
  assert metrics.integrated_brier(tr_t, tr_e.astype(float), te_t, te_e, surv, times) == \
      integrated_brier_score(Surv.from_arrays(tr_e, tr_t), Surv.from_arrays(te_e, te_t), surv,
                             times)
  with pytest.raises(InputError, match="expected >= 2"):
    metrics.integrated_brier(tr_t, tr_e, te_t, te_e, surv[:, :1], times[:1])
  with pytest.raises(InputError, match="columns"):
    metrics.integrated_brier(tr_t, tr_e, te_t, te_e, surv, times[:-1])


def test_cumulative_auc_against_uncensored_formula():
  rng = np.random.default_rng(3)
  tr_t, tr_e = _cohort(rng, 100, censor=False, ties=True)
  te_t, te_e = _cohort(rng, 50, censor=False, ties=True)
  te_t = np.minimum(te_t, tr_t.max())
  risk = np.round(-te_t + rng.normal(0, 2, 50))           # tied risks too
  times = np.array([1.0, 2.0, 4.0, 6.0, 1e6])
  auc, mean_auc, used = metrics.cumulative_auc(tr_t, tr_e, te_t, te_e, risk, times)
  keep = times[(times >= te_t.min()) & (times < te_t.max())]
  np.testing.assert_array_equal(used, keep)
  for a, t in zip(auc, used):   # G = 1: the fraction of (case, control) pairs ordered right
    case, ctrl = risk[(te_t <= t) & te_e], risk[te_t > t]
    diff = case[:, None] - ctrl[None, :]
    want = ((diff > 0) + 0.5 * (diff == 0)).mean()
    assert a == pytest.approx(want, abs=1e-12)
  assert min(auc) <= mean_auc <= max(auc)
  with pytest.raises(InputError, match="no evaluation time"):
    metrics.cumulative_auc(tr_t, tr_e, te_t, te_e, risk, [1e6])


# ---- Kaplan-Meier and log-rank ------------------------------------------------------------------

def _textbook_logrank(time, event, group):
  """Observed minus expected in group 1 at each distinct event time, hypergeometric variance."""
  o_minus_e, var = 0.0, 0.0
  for t in np.unique(time[event]):
    at_risk = time >= t
    n, n1 = at_risk.sum(), (at_risk & group).sum()
    d, d1 = (event & (time == t)).sum(), (event & (time == t) & group).sum()
    o_minus_e += d1 - d * n1 / n
    if n > 1:
      var += d * (n1 / n) * (1 - n1 / n) * (n - d) / (n - 1)
  chi2 = o_minus_e ** 2 / var
  return chi2, stats.chi2.sf(chi2, 1)


@pytest.mark.parametrize("seed", range(5))
def test_logrank_equals_textbook(seed):
  rng = np.random.default_rng(seed)
  n = int(rng.integers(20, 200))
  risk = rng.normal(size=n)
  time = np.ceil(rng.exponential(np.exp(-0.7 * risk) * 5))            # ties in time
  event = rng.random(n) < 0.6
  out = km.median_split_logrank(time, event.astype(int), risk)
  high = risk > np.median(risk)
  assert out["threshold"] == np.median(risk)
  assert (out["n_high"], out["n_low"]) == (high.sum(), n - high.sum())
  chi2, p = _textbook_logrank(time, event, high)
  assert abs(out["p_value"] - p) < 1e-8 and out["chi2"] == pytest.approx(chi2, rel=1e-9)


def test_km_curve_by_hand_and_plot(tmp_path):
  # the high-risk group: times 1, 2, 2+, 3, 4+, 5 (+ = censored).
  time = np.r_[[1.0, 2.0, 2.0, 3.0, 4.0, 5.0], np.arange(1.0, 7.0)]
  event = np.r_[[1, 1, 0, 1, 0, 1], [0, 1, 0, 1, 0, 1]]
  risk = np.r_[np.arange(10.0, 16.0), np.arange(0.0, 6.0)]
  out = km.median_split_logrank(time, event, risk)
  assert out["threshold"] == 7.5 and out["n_high"] == 6 and out["n_low"] == 6
  t, s = out["curves"]["high"]
  np.testing.assert_array_equal(t, [1.0, 2.0, 3.0, 4.0, 5.0])
  # S(1) = 5/6; S(2) = 5/6 * 4/5 (one death of 5 at risk; the censoring at 2 counts as at
  # risk); S(3) = 2/3 * 2/3 (3 at risk); S(4) unchanged (censored); S(5) = 0.
  np.testing.assert_allclose(s, [5 / 6, 2 / 3, 4 / 9, 4 / 9, 0.0], rtol=1e-12, atol=1e-15)
  t, s = out["curves"]["low"]
  np.testing.assert_allclose(s, [1.0, 4 / 5, 4 / 5, 4 / 5 * 2 / 3, 4 / 5 * 2 / 3, 0.0],
                             rtol=1e-12, atol=1e-15)
  path = tmp_path / "figs" / "km_full.png"
  assert km.plot_km(out, path, title="test") == path
  data = path.read_bytes()
  assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
  assert not (tmp_path / "figs" / "km_full.png.tmp").exists()


def test_degenerate_split(tmp_path):
  out = km.median_split_logrank([1.0, 2.0, 3.0, 4.0], [1, 0, 1, 1], [0.3] * 4)
  assert out["n_high"] == 0 and out["n_low"] == 4
  assert math.isnan(out["p_value"]) and math.isnan(out["chi2"])
  assert out["curves"]["high"][0].size == 0
  km.plot_km(out, tmp_path / "km.png")
  assert (tmp_path / "km.png").stat().st_size > 0
  no_events = km.median_split_logrank([1.0, 2.0, 3.0, 4.0], [0, 0, 0, 0], [1, 2, 3, 4])
  assert no_events["n_high"] == 2 and math.isnan(no_events["p_value"])


def test_centred_cosine_ignores_common_offsets():
  """Adding one vector to every patient drives the raw cosine to 1 and leaves the centred
  one unchanged; exact alignment gives +-1; the rows' order does not matter."""
  rng = np.random.default_rng(0)
  a, b = rng.normal(size=(2, 50, 8))
  base = centred_cosine(a, b)
  assert abs(base) < 0.2  # independent draws
  offset = 100.0 * rng.normal(size=8)
  raw = np.mean(np.sum((a + offset) * (b + offset), 1)
                / np.linalg.norm(a + offset, axis=1) / np.linalg.norm(b + offset, axis=1))
  assert raw > 0.99
  both = representation_diagnostics({"a": a + offset, "b": b + offset}, (("a", "b"),))
  np.testing.assert_allclose(both["cos(a,b)"], raw, atol=1e-12)
  np.testing.assert_allclose(both["cos_centred(a,b)"], base, atol=1e-12)
  np.testing.assert_allclose(centred_cosine(a + offset, b - 3 * offset), base, atol=1e-12)
  np.testing.assert_allclose(centred_cosine(2 * a + offset, a), 1.0, atol=1e-12)
  np.testing.assert_allclose(centred_cosine(a, -a + offset), -1.0, atol=1e-12)
  perm = rng.permutation(50)
  np.testing.assert_allclose(centred_cosine(a[perm], b[perm]), base, atol=1e-12)
  with pytest.raises(ValueError, match="one shape"):
    centred_cosine(a, b[:, :4])


def test_between_patient_spread_closed_form():
  """x_i = m + z_i with column-centred z: spread = sum Var(z) / (|m|^2 + sum Var(z))."""
  rng = np.random.default_rng(1)
  z = rng.normal(size=(40, 6))
  z -= z.mean(0)
  m = rng.normal(size=6) * 5.0
  var = np.sum(np.mean(z * z, 0))
  np.testing.assert_allclose(between_patient_spread(m + z), var / (m @ m + var), rtol=1e-12)
  assert between_patient_spread(np.tile(m, (7, 1))) < 1e-30
  np.testing.assert_allclose(between_patient_spread(z), 1.0, rtol=1e-12)
  assert between_patient_spread(np.zeros((3, 4))) == 0.0
  out = representation_diagnostics({"a": m + z, "b": z}, (("a", "b"),))
  assert set(out) == {"spread(a)", "spread(b)", "cos(a,b)", "cos_centred(a,b)"}
  np.testing.assert_allclose(out["cos_centred(a,b)"], 1.0, atol=1e-12)


def test_ratio_scenarios_are_paired_across_methods_and_have_the_stated_rate():
  from survjax.evaluate import scenarios as scen
  ids = np.array([f"c{i}" for i in range(4000)])
  a = scen.hidden_for("missing_30pct_genomics", ("pathology", "genomics"), ids, 0)
  b = scen.hidden_for("missing_30pct_genomics", ("genomics", "radiology", "pathology"), ids, 0)
  assert a == b   # the same patients lose genomics, whatever the method's modalities
  rate = np.mean([h == frozenset({"genomics"}) for h in a])
  assert abs(rate - 0.3) < 3 * np.sqrt(0.3 * 0.7 / len(ids))
  assert all(h in (frozenset(), frozenset({"genomics"})) for h in a)
  # Per patient, not per position: a subset of patients gets the same draws.
  assert scen.hidden_for("missing_30pct_genomics", ("pathology", "genomics"), ids[::7], 0) == a[::7]
  mixed = scen.hidden_for("missing_60pct_mixed", ("pathology", "genomics"), ids, 0)
  lost = [next(iter(h)) for h in mixed if h]
  assert abs(len(lost) / len(ids) - 0.6) < 0.05
  assert abs(np.mean([m == "pathology" for m in lost]) - 0.5) < 0.05
  other_seed = scen.hidden_for("missing_30pct_genomics", ("pathology", "genomics"), ids, 1)
  assert other_seed != a
  with pytest.raises(Exception, match="unknown scenario"):
    scen.expand(["missing_30pct_radiology"], ("pathology", "genomics"))


def test_synthetic_oracles_are_conditional_expectations_for_every_subset():
  """Each subset's oracle is E[eta | revealed factors]: its residual to the full risk is
  uncorrelated with the oracle itself (a conditional expectation is a projection), the
  constant fill's oracle is below it where coupling gives room, and the keys of the
  scenarios 'full' / 'missing_<m>' resolve."""
  from survjax.data.synthetic import SyntheticSpec, make_synthetic_cohort
  from survjax.evaluate import scenarios as scen
  cohort = make_synthetic_cohort(SyntheticSpec(n_patients=20000, bag_min=2, bag_max=3,
                                               patch_dim=4, radiology=True,
                                               share_radiology=0.3, radiology_dim=4,
                                               slices_min=2, slices_max=3))
  full = cohort.true_risk["genomics+pathology+radiology"]
  for key, oracle in cohort.true_risk.items():
    if not key or key.startswith("const:") or oracle is full:
      continue
    resid = full - oracle
    assert abs(np.corrcoef(resid, oracle)[0, 1]) < 0.03, key
  # Room for imputation: the conditional oracle explains more of eta than the constant one.
  cond, const = cohort.true_risk["pathology"], cohort.true_risk["const:pathology"]
  assert np.corrcoef(cond, full)[0, 1] > np.corrcoef(const, full)[0, 1] + 0.02
  hidden = scen.hidden_for("missing_radiology", ("pathology", "radiology"), cohort.case_ids[:5], 0)
  got = scen.oracle_risk(cohort.true_risk, ("pathology", "radiology"), hidden, np.arange(5))
  np.testing.assert_array_equal(got, cohort.true_risk["pathology"][:5])
