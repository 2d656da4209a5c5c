"""Survival losses against independent references: plain loops, hand-computed closed forms,
and the Cox fit of scikit-survival. Every comparison is on absolute values (a loss that is
off by a constant factor, or that drops a term, fails)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from survjax import survival


# ---- references (slow, plain Python on float64) ------------------------------------------

def _log_sigmoid(x):
  """log(1 / (1 + e^-x)) without overflow."""
  return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def ref_discrete_nll(logits, bins, event, weights, alpha=0.0):
  num, den = 0.0, 0.0
  for l, k, d, w in zip(np.asarray(logits, np.float64), bins, event, weights):
    if w == 0:
      continue
    log_h = [_log_sigmoid(float(v)) for v in l]
    log_1mh = [_log_sigmoid(-float(v)) for v in l]
    log_s_prev = sum(log_1mh[:k])           # log S(k-1), S(-1) = 1
    log_s = sum(log_1mh[:k + 1])            # log S(k)
    unc = -d * (log_s_prev + log_h[k])
    cen = -(1 - d) * log_s
    num += w * ((1 - alpha) * (unc + cen) + alpha * unc)
    den += w
  return num / den if den > 0 else 0.0


def ref_cox_nll(risk, time, event, weights):
  num, den = 0.0, 0.0
  risk = np.asarray(risk, np.float64)
  for i in range(len(risk)):
    if not (event[i] and weights[i] > 0):
      continue
    m = max(risk[j] for j in range(len(risk)) if time[j] >= time[i] and weights[j] > 0)
    s = sum(weights[j] * math.exp(risk[j] - m) for j in range(len(risk))
            if time[j] >= time[i] and weights[j] > 0)
    num += weights[i] * (risk[i] - (m + math.log(s)))
    den += weights[i]
  return -num / den if den > 0 else 0.0


def _random_discrete(rng, b=13, k=4):
  logits = rng.normal(0, 2, (b, k)).astype(np.float32)
  bins = rng.integers(0, k, b)
  event = rng.integers(0, 2, b)
  weights = rng.integers(0, 2, b).astype(np.float32)
  weights[0] = 1.0
  return logits, bins, event, weights


def _random_cox(rng, b=17):
  risk = rng.normal(0, 1.5, b).astype(np.float32)
  time = rng.integers(1, 6, b).astype(np.float32)       # many ties
  event = rng.integers(0, 2, b)
  weights = rng.choice([0.0, 0.5, 1.0, 2.0], b).astype(np.float32)
  weights[0], event[0] = 1.0, 1
  return risk, time, event, weights


# eager grads compile op by op (seconds each on 2 cores): jit them once.
_nll_vg = jax.jit(jax.value_and_grad(survival.discrete_time_nll))
_cox_vg = jax.jit(jax.value_and_grad(survival.cox_partial_nll))


# ---- discrete-time NLL ----------------------------------------------------------------------

@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("alpha", [0.0, 0.4, 1.0])
def test_discrete_nll_matches_loop(seed, alpha):
  logits, bins, event, weights = _random_discrete(np.random.default_rng(seed))
  got = survival.discrete_time_nll(logits, bins, event, weights, alpha=alpha)
  np.testing.assert_allclose(float(got), ref_discrete_nll(logits, bins, event, weights, alpha),
                             rtol=2e-6, atol=1e-6)


def test_discrete_nll_k1_closed_form():
  # One bin: an event costs -log h, a censoring -log(1 - h).
  logits = np.array([[0.3], [-1.2]], np.float32)
  h = 1 / (1 + np.exp(-logits[:, 0].astype(np.float64)))
  got = survival.discrete_time_nll(logits, np.array([0, 0]), np.array([1, 0]), np.ones(2))
  np.testing.assert_allclose(float(got), (-np.log(h[0]) - np.log(1 - h[1])) / 2, rtol=1e-6)


def test_discrete_nll_k2_by_hand():
  # logits (0, log 3): h = (1/2, 3/4), S(0) = 1/2, S(1) = 1/8.
  logits = np.tile(np.array([[0.0, math.log(3.0)]], np.float32), (4, 1))
  bins = np.array([1, 0, 1, 0])
  event = np.array([1, 0, 0, 1])
  # event in bin 1: -log(S(0) h_1) = log(8/3); censored in 0: log 2; censored in 1: log 8;
  # event in bin 0: -log h_0 = log 2.
  per = np.array([math.log(8 / 3), math.log(2), math.log(8), math.log(2)])
  got = survival.discrete_time_nll(logits, bins, event, np.ones(4))
  np.testing.assert_allclose(float(got), per.mean(), rtol=1e-6)
  assert abs(float(got) - math.log(256 / 3) / 4) < 1e-6
  # MUST eq. (6) as printed (no S(k-1) for events) would give log(4/3) for patient 0:
  assert abs(float(got) - (per.mean() - (math.log(8 / 3) - math.log(4 / 3)) / 4)) > 0.1
  # weights: a weighted mean over patients, not a sum.
  w = np.array([2.0, 1.0, 0.0, 1.0])
  got_w = survival.discrete_time_nll(logits, bins, event, w)
  np.testing.assert_allclose(float(got_w), (per * w).sum() / 4.0, rtol=1e-6)
  # alpha = 1: uncensored terms only, still divided by all weights.
  got_a = survival.discrete_time_nll(logits, bins, event, np.ones(4), alpha=1.0)
  np.testing.assert_allclose(float(got_a), (per[0] + per[3]) / 4, rtol=1e-6)


def test_survival_curve_and_risk():
  logits = np.random.default_rng(0).normal(0, 2, (5, 4)).astype(np.float32)
  h = 1 / (1 + np.exp(-logits.astype(np.float64)))
  s = np.cumprod(1 - h, axis=1)
  np.testing.assert_allclose(np.asarray(survival.survival_curve(logits)), s, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(survival.discrete_time_risk(logits)), -s.sum(1),
                             rtol=1e-5)


def test_discrete_nll_large_logits_finite():
  logits = np.array([[50.0, -50.0, 50.0], [-50.0, 50.0, -50.0], [50.0, 50.0, 50.0],
                     [-50.0, -50.0, -50.0]], np.float32)
  bins, event, w = np.array([0, 1, 2, 2]), np.array([1, 1, 0, 0]), np.ones(4, np.float32)
  loss, grad = _nll_vg(logits, bins, event, w)
  assert np.isfinite(float(loss)) and np.all(np.isfinite(np.asarray(grad)))
  np.testing.assert_allclose(float(loss), ref_discrete_nll(logits, bins, event, w), rtol=1e-5)
  # patient 2 is censored in bin 2 with three near-certain hazards: -log S(2) ~= 150.
  assert float(loss) == pytest.approx(150 / 4, rel=1e-6)
  risk = survival.discrete_time_risk(logits)
  assert np.all(np.isfinite(np.asarray(risk)))


def test_discrete_nll_padding_invariance():
  logits, bins, event, _ = _random_discrete(np.random.default_rng(1), b=6)
  w = np.ones(6, np.float32)
  pad_logits = np.concatenate([logits, np.full((3, 4), 1e4, np.float32)])
  pad_bins = np.concatenate([bins, [0, 3, 7]])
  pad_event = np.concatenate([event, [1, 0, 1]])
  pad_w = np.concatenate([w, np.zeros(3, np.float32)])
  f = _nll_vg
  l0, g0 = f(logits, bins, event, w)
  l1, g1 = f(pad_logits, pad_bins, pad_event, pad_w)
  assert float(l0) == pytest.approx(float(l1), rel=1e-7, abs=0)
  np.testing.assert_allclose(np.asarray(g1[:6]), np.asarray(g0), rtol=1e-6, atol=1e-9)
  assert np.all(np.asarray(g1[6:]) == 0)
  l_empty = survival.discrete_time_nll(logits, bins, event, np.zeros(6))
  assert float(l_empty) == 0.0


# ---- Cox partial likelihood -------------------------------------------------------------------

@pytest.mark.parametrize("seed", range(8))
def test_cox_matches_loop(seed):
  risk, time, event, weights = _random_cox(np.random.default_rng(seed))
  got = jax.jit(survival.cox_partial_nll)(risk, time, event, weights)
  np.testing.assert_allclose(float(got), ref_cox_nll(risk, time, event, weights),
                             rtol=2e-6, atol=1e-6)


def test_cox_two_patients_closed_form():
  r = np.array([math.log(2.0), 0.0], np.float32)
  ones = np.ones(2, np.float32)
  # t1 < t2, both events: only patient 1 has a non-trivial risk set {1, 2}:
  # L = -(1/2)[log2 - log(2 + 1) + 0 - 0] = (log 3 - log 2) / 2.
  got = survival.cox_partial_nll(r, np.array([1.0, 2.0]), np.array([1, 1]), ones)
  np.testing.assert_allclose(float(got), 0.5 * math.log(1.5), rtol=1e-6)
  # tied times (Breslow): both have the risk set {1, 2}: L = log 3 - log(2) / 2.
  got = survival.cox_partial_nll(r, np.array([2.0, 2.0]), np.array([1, 1]), ones)
  np.testing.assert_allclose(float(got), math.log(3.0) - 0.5 * math.log(2.0), rtol=1e-6)
  # reversed times: patient 2 fails first with risk set {1, 2}: L = (log 3 - 0) / 2.
  got = survival.cox_partial_nll(r, np.array([2.0, 1.0]), np.array([1, 1]), ones)
  np.testing.assert_allclose(float(got), 0.5 * math.log(3.0), rtol=1e-6)
  # patient 2 censored: one event, normalised by one event: L = log 3 - log 2.
  got = survival.cox_partial_nll(r, np.array([1.0, 2.0]), np.array([1, 0]), ones)
  np.testing.assert_allclose(float(got), math.log(1.5), rtol=1e-6)


def test_cox_weight_is_a_case_weight():
  risk, time, event, _ = _random_cox(np.random.default_rng(3), b=9)
  w = np.ones(9, np.float32)
  w[2] = 2.0
  dup = lambda a: np.concatenate([a, a[2:3]])
  got = survival.cox_partial_nll(risk, time, event, w)
  want = survival.cox_partial_nll(dup(risk), dup(time), dup(event), np.ones(10, np.float32))
  np.testing.assert_allclose(float(got), float(want), rtol=1e-6)


def test_cox_gradient_vanishes_at_sksurv_fit():
  from sksurv.linear_model import CoxPHSurvivalAnalysis
  from sksurv.util import Surv

  rng = np.random.default_rng(0)
  n, p = 60, 3
  x = rng.normal(size=(n, p))
  true_t = rng.exponential(np.exp(-(x @ np.array([0.8, -0.5, 0.3]))))
  cens_t = rng.exponential(1.5, n)
  time = np.ceil(np.minimum(true_t, cens_t) * 4) / 4      # quarter units: many ties
  event = true_t <= cens_t
  assert len(np.unique(time[event])) < event.sum()          # there are tied event times
  fit = CoxPHSurvivalAnalysis(ties="breslow", alpha=0).fit(x, Surv.from_arrays(event, time))
  with jax.enable_x64(True):
    loss = lambda beta: survival.cox_partial_nll(jnp.asarray(x) @ beta, jnp.asarray(time),
                                                 jnp.asarray(event), jnp.ones(n))
    grad, loss = jax.jit(jax.grad(loss)), jax.jit(loss)
    g_fit = np.asarray(grad(jnp.asarray(fit.coef_)))
    g_zero = np.asarray(grad(jnp.zeros(p)))
    assert np.max(np.abs(g_fit)) < 1e-7, g_fit
    assert np.max(np.abs(g_zero)) > 1e-2
    # and the fit is a minimum of our loss: moving away increases it.
    l_fit = float(loss(jnp.asarray(fit.coef_)))
    for d in np.eye(p):
      assert float(loss(jnp.asarray(fit.coef_ + 0.05 * d))) > l_fit
      assert float(loss(jnp.asarray(fit.coef_ - 0.05 * d))) > l_fit


def test_cox_padding_invariance():
  risk, time, event, w = _random_cox(np.random.default_rng(5), b=8)
  f = _cox_vg
  l0, g0 = f(risk, time, event, w)
  # padded rows: sorted first (time 0), last (time 1e9) and tied with real patients.
  pad = lambda a, v: np.concatenate([a, np.asarray(v, a.dtype)])
  args = (pad(risk, [30.0, -30.0, 5.0]), pad(time, [0.0, 1e9, time[1]]), pad(event, [1, 1, 1]),
          pad(w, [0.0, 0.0, 0.0]))
  l1, g1 = f(*args)
  assert float(l1) == pytest.approx(float(l0), rel=1e-6, abs=0)
  np.testing.assert_allclose(np.asarray(g1[:8]), np.asarray(g0), rtol=1e-5, atol=1e-8)
  assert np.all(np.asarray(g1[8:]) == 0)
  # padded rows first in the time order and an all-padding batch: finite, zero.
  l2, g2 = f(np.array([1.0, 2.0], np.float32), np.array([9.0, 1.0], np.float32),
             np.array([1, 1]), np.array([0.0, 1.0], np.float32))
  assert float(l2) == 0.0 and np.all(np.isfinite(np.asarray(g2)))
  l3, g3 = f(risk, time, event, np.zeros_like(w))
  assert float(l3) == 0.0 and np.all(np.asarray(g3) == 0)


def test_cox_no_events_is_zero():
  risk, time, _, w = _random_cox(np.random.default_rng(2), b=6)
  l, g = _cox_vg(risk, time, np.zeros(6), w)
  assert float(l) == 0.0 and np.all(np.asarray(g) == 0)


def test_cox_large_risks_finite():
  risk = np.array([50.0, -50.0, 50.0, -50.0, 0.0], np.float32)
  time = np.array([1.0, 1.0, 2.0, 3.0, 3.0], np.float32)
  event = np.array([1, 1, 0, 1, 1])
  w = np.ones(5, np.float32)
  l, g = _cox_vg(risk, time, event, w)
  assert np.isfinite(float(l)) and np.all(np.isfinite(np.asarray(g)))
  np.testing.assert_allclose(float(l), ref_cox_nll(risk, time, event, w), rtol=1e-6)
  # patient 1 (risk -50) fails with the risk-50 patients at risk: a loss of about 100 / 4.
  assert float(l) > 100 / 4


def test_cox_partial_nll_is_minimised_at_sksurvs_coxph_fit():
  """scikit-survival's unpenalised Breslow CoxPH coefficients are the minimiser of
  cox_partial_nll for a linear risk, and its log-likelihood equals ours there."""
  from sksurv.linear_model import CoxPHSurvivalAnalysis
  from sksurv.linear_model.coxph import CoxPHOptimizer

  rng = np.random.default_rng(3)
  n, p = 120, 3
  x = rng.normal(size=(n, p))
  t = np.round(rng.exponential(np.exp(-x @ np.array([0.8, -0.5, 0.0]))), 1) + 0.1  # ties
  e = rng.uniform(size=n) < 0.7
  y = np.array(list(zip(e, t)), dtype=[("event", bool), ("time", float)])
  fit = CoxPHSurvivalAnalysis(ties="breslow", alpha=0.0, tol=1e-12, n_iter=200).fit(x, y)
  beta = fit.coef_

  def loss(b):
    return survival.cox_partial_nll(jnp.asarray(x) @ b, jnp.asarray(t), jnp.asarray(e),
                                    jnp.ones(n))

  b = jnp.asarray(beta, jnp.float32)
  # float32: the gradient of a loss of order 1 is zero to a few 1e-7 at the optimum; a
  # step of 0.05 away from it gives gradients of order 1e-2.
  np.testing.assert_allclose(np.asarray(jax.grad(loss)(b)), 0.0, atol=2e-5)
  assert np.max(np.abs(np.asarray(jax.grad(loss)(b + 0.05)))) > 1e-3
  opt = CoxPHOptimizer(x, e, t, alpha=np.zeros(p), ties="breslow")
  # sksurv's nlog_likelihood is the negative log partial likelihood divided by n.
  want = opt.nlog_likelihood(beta) * n / e.sum()
  np.testing.assert_allclose(float(loss(b)), want, rtol=1e-5)


def test_cox_second_derivatives_are_finite_and_unchanged_by_padding():
  """Hessian-vector products of the Cox loss (forward-over-reverse) are finite with padded
  rows and equal those of the unpadded batch."""
  risk, time, event, weights = _random_cox(np.random.default_rng(4))
  keep = np.asarray(weights) > 0
  v = np.random.default_rng(5).normal(size=risk.shape).astype(np.float32)

  def hvp(r, t, e, w, vec):
    g = lambda x: jax.grad(survival.cox_partial_nll)(x, t, e, w)
    return jax.jvp(g, (r,), (vec,))[1]

  padded = np.asarray(jax.jit(hvp)(risk, time, event, weights, v))
  assert np.all(np.isfinite(padded))
  plain = np.asarray(hvp(jnp.asarray(risk)[keep], jnp.asarray(time)[keep],
                         jnp.asarray(event)[keep], jnp.asarray(weights)[keep], v[keep]))
  np.testing.assert_allclose(padded[keep], plain, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(padded[~keep], 0.0)
