"""TTA: unbalanced OT plan (marginals, dustbin, balanced limit, padding, structure term)
and the model's prediction path (determinism, hidden modality never read, padding)."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

with warnings.catch_warnings():
  warnings.simplefilter("ignore", DeprecationWarning)
  from ott.geometry import geometry
  from ott.problems.linear import linear_problem
  from ott.solvers.linear import sinkhorn

from configs import tta as tta_config
from survjax import ot
from survjax.data.batching import BatchSpec, make_batch
from survjax.data.synthetic import SyntheticSpec, make_synthetic_cohort
from survjax.method import cohort_info
from survjax.models import get_method
from survjax.models.tta import rho_schedule

TIGHT = dict(threshold=1e-6, max_iterations=20000)
# Jitted once per static setting (eager ott calls recompile their loop every time).
_plan = jax.jit(ot.prototype_plan, static_argnames=(
    "epsilon", "gamma", "dustbin", "structure_lambda", "outer_iterations", "threshold",
    "max_iterations", "implicit", "mode", "momentum", "inner_iterations"))


def _kl(cols, b):
  safe = np.where(cols > 0, cols / np.where(b > 0, b, 1.0), 1.0)
  return float(np.sum(np.where(cols > 0, cols * np.log(safe), 0.0)))


def _logits(n=40, k=8, seed=0):
  return 3.0 * jax.random.normal(jax.random.PRNGKey(seed), (n, k))


def _reference_plan(logits, mask, rho, eps=0.1, gamma=1.0, dustbin=True):
  """Independent float64 numpy solver of the same problem (scaling iterations to 1e-13):
  hard token marginal, every prototype-side column KL-relaxed with weight gamma."""
  logits = np.asarray(logits, np.float64)
  mask = np.asarray(mask)
  lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True))
  cost = np.where(mask[:, None], -(logits - logits.max(-1, keepdims=True) - lse), 0.0)
  k = logits.shape[1]
  if dustbin:
    cost = np.concatenate([cost, np.zeros((len(cost), 1))], axis=1)
    b = np.concatenate([np.full(k, rho / k), [1.0 - rho]])
  else:
    b = np.full(k, 1.0 / k)
  a = mask / mask.sum()
  kern = np.exp(-cost / eps)
  u, tau = np.ones(len(a)), gamma / (gamma + eps)
  for _ in range(100000):
    v = (b / (kern.T @ u)) ** tau
    u_new = a / (kern @ v)
    done = np.max(np.abs(u_new - u)) <= 1e-13 * np.max(np.abs(u_new))
    u = u_new
    if done:
      break
  return u[:, None] * kern * v[None, :]


def _tta_logits(b, n, k, seed, temperature=0.5):
  """TTA's logits: cosines of random tokens and prototypes over a temperature."""
  kx, kp = jax.random.split(jax.random.PRNGKey(seed))
  x = jax.random.normal(kx, (b, n, 16))
  p = jax.random.normal(kp, (k, 16))
  x = x / jnp.linalg.norm(x, axis=-1, keepdims=True)
  p = p / jnp.linalg.norm(p, axis=-1, keepdims=True)
  return x @ p.T / temperature


def test_plan_marginals_and_dustbin():
  n_real, n, k = 30, 40, 8
  logits = _logits(n, k)
  mask = jnp.arange(n) < n_real
  for rho in (0.3, 0.7, 1.0):
    plan, converged = _plan(logits, mask, rho, **TIGHT)
    plan = np.asarray(plan)
    assert bool(converged)
    # Token marginal: a hard constraint, uniform over real tokens; padding ships nothing.
    np.testing.assert_allclose(plan[:n_real].sum(1), 1.0 / n_real, rtol=1e-4)
    assert np.all(plan[n_real:] == 0.0)
    # Prototype marginal: KL-relaxed, so close to but not exactly b; the dustbin ~ 1 - rho.
    cols = plan.sum(0)
    b = np.asarray(ot.prototype_marginal(k, rho))
    assert abs(cols.sum() - 1.0) < 1e-4
    # The dustbin is relaxed like the prototypes (ott's one tau_b): it carries what the
    # relaxed problem gives it, as an independent float64 solver finds, not exactly 1 - rho.
    ref = _reference_plan(logits, mask, rho)
    np.testing.assert_allclose(plan, ref, atol=2e-6)
    np.testing.assert_allclose(cols[-1], ref[:, -1].sum(), atol=1e-5)
    kl = _kl(cols, b)
    # A stronger KL weight gamma pulls the columns closer to b.
    tight, _ = _plan(logits, mask, rho, gamma=100.0, **TIGHT)
    cols_t = np.asarray(tight).sum(0)
    kl_t = _kl(cols_t, b)
    assert kl_t < kl + 1e-9 and kl_t < 1e-2, (kl, kl_t)
    assert abs(cols_t[-1] - (1.0 - rho)) < 0.02, (rho, cols_t[-1])


def test_dustbin_takes_more_than_one_minus_rho_with_tta_costs():
  # TTA-like costs (cosines / 0.5, K = 32): a free dustbin against prototypes costing about
  # log K takes far more than its target 1 - rho under gamma = 1 (benchmarks/uot.py: 0.90
  # at rho = 0.5); ott and the float64 reference agree on it, so it is the problem's
  # solution, not a solver defect. It tends to 1 - rho as gamma grows.
  logits = _tta_logits(1, 200, 32, seed=11)[0]
  mask = jnp.ones(200, bool)
  plan, converged = _plan(logits, mask, 0.5, **TIGHT)
  ref = _reference_plan(logits, mask, 0.5)
  assert bool(converged)
  np.testing.assert_allclose(np.asarray(plan)[:, -1].sum(), ref[:, -1].sum(), atol=1e-5)
  assert ref[:, -1].sum() > 0.8
  strong = _reference_plan(logits, mask, 0.5, gamma=1000.0)
  assert abs(strong[:, -1].sum() - 0.5) < 0.02


# The speed setting (TTA's default): ott's kernel-mode Sinkhorn with over-relaxation, error
# checked every 5 iterations; the previous default: log domain, plain.
_o = tta_config.get_config().model.ot
FAST = dict(mode=_o.mode, momentum=_o.momentum, inner_iterations=_o.inner_iterations,
            threshold=1e-3, max_iterations=200)
PREVIOUS = dict(mode="lse", momentum=1.0, inner_iterations=10, threshold=1e-3,
                max_iterations=200)
_batched = jax.jit(ot.batched_plan, static_argnames=(
    "epsilon", "gamma", "dustbin", "structure_lambda", "outer_iterations", "threshold",
    "max_iterations", "implicit", "mode", "momentum", "inner_iterations", "patients_per_solve"))


def test_kernel_mode_plan_agrees_with_the_log_domain_default():
  # Stated tolerance: per patient, each setting's plan is within the stopping threshold
  # (1e-3) in L1 (total mass 1) of the float64 reference, so the two differ by at most
  # 2e-3 (measured: below 5e-4); padded tokens still receive exactly nothing.
  b, n, k = 4, 96, 32
  logits = _tta_logits(b, n, k, seed=12)
  mask = jnp.arange(n)[None, :] < jnp.array([96, 80, 50, 1])[:, None]
  # The kernel path is taken (prototype_plan flags an unsafe or unconverged kernel solve,
  # which batched_plan would redo in the log domain).
  assert bool(_plan(logits[0], mask[0], 0.5, **FAST)[1])
  feats = jax.random.normal(jax.random.PRNGKey(13), (b, n, 8))
  for rho, lam in ((0.1, 0.0), (0.5, 0.0), (1.0, 0.0), (0.5, 0.1)):
    f = feats if lam > 0 else None
    fast, conv_f = _batched(logits, mask, rho, f, structure_lambda=lam, **FAST)
    prev, conv_p = _batched(logits, mask, rho, f, structure_lambda=lam, **PREVIOUS)
    fast, prev = np.asarray(fast), np.asarray(prev)
    assert bool(np.all(conv_f)) and bool(np.all(conv_p))
    if lam == 0 and rho == 0.5:
      # ott's loop vmapped over groups of 2 and over the whole batch (it stops on the
      # group's slowest patient): the same plans to the threshold, and the same to float
      # rounding with a fixed number of iterations (log domain: no fallback to take).
      for group in (2, 0):
        grouped, _ = _batched(logits, mask, rho, patients_per_solve=group, **FAST)
        np.testing.assert_array_less(np.abs(np.asarray(grouped) - fast).sum((1, 2)), 2e-3)
        fixed = dict(mode="lse", momentum=1.0, inner_iterations=1, threshold=0.0,
                     max_iterations=30)
        one, _ = _batched(logits, mask, rho, patients_per_solve=1, **fixed)
        many, _ = _batched(logits, mask, rho, patients_per_solve=group, **fixed)
        np.testing.assert_allclose(np.asarray(many), np.asarray(one), rtol=1e-5, atol=1e-9)
    np.testing.assert_array_less(np.abs(fast - prev).sum((1, 2)), 2e-3)
    assert np.all(fast[~np.asarray(mask)] == 0.0)
    if lam == 0:
      for i in range(b):
        ref = _reference_plan(logits[i], mask[i], rho)
        assert np.abs(fast[i] - ref).sum() < 1e-3, (rho, i)
        assert np.abs(prev[i] - ref).sum() < 1e-3, (rho, i)


def test_kernel_mode_falls_back_to_the_log_domain_when_unsafe():
  # eps = 0.02 puts max C / eps far above KERNEL_MAX_COST: the batch is re-solved in the
  # log domain without momentum, giving exactly that solver's plan (the kernel solve with
  # momentum would differ).
  logits = _tta_logits(2, 24, 4, seed=14)
  mask = jnp.ones((2, 24), bool)
  assert float(jnp.max(-jax.nn.log_softmax(logits, -1))) / 0.02 > ot.KERNEL_MAX_COST
  slow = {**FAST, "max_iterations": 2000}  # plain Sinkhorn at eps = 0.02 needs more
  fast, conv = _batched(logits, mask, 0.5, epsilon=0.02, **slow)
  lse, _ = _batched(logits, mask, 0.5, epsilon=0.02, **{**slow, "mode": "lse", "momentum": 1.0})
  assert bool(np.all(conv))
  np.testing.assert_array_equal(np.asarray(fast), np.asarray(lse))


def test_a_diverging_kernel_solve_is_flagged_and_redone_in_the_log_domain():
  # One real token and the structure term: the over-relaxed kernel solve of the second
  # majorisation step diverges (ott stops on an infinite error, yet its own flag reads
  # "converged"). The patient must be flagged and the batch re-solved in the log domain.
  b, n, k = 4, 96, 32
  logits = _tta_logits(b, n, k, seed=12)
  mask = jnp.arange(n)[None, :] < jnp.array([96, 80, 50, 1])[:, None]
  feats = jax.random.normal(jax.random.PRNGKey(13), (b, n, 8))
  opts = dict(structure_lambda=0.1, outer_iterations=1)
  _, ok = _plan(logits[3], mask[3], 0.5, feats=feats[3], **opts, **FAST)
  assert not bool(ok)
  plan, conv = _batched(logits, mask, 0.5, feats, **opts, **FAST)
  lse, _ = _batched(logits, mask, 0.5, feats, **opts, **{**FAST, "mode": "lse", "momentum": 1.0})
  assert bool(np.all(conv))
  np.testing.assert_array_equal(np.asarray(plan), np.asarray(lse))
  assert abs(float(np.asarray(plan)[3].sum()) - 1.0) < 1e-3


def test_rho_schedule():
  np.testing.assert_allclose(rho_schedule(jnp.array([0.0, 1.0, 2.0])),
                             [0.1 + 0.9 * np.exp(-5.0), 1.0, 1.0], rtol=1e-6)


def test_balanced_limit_matches_ott():
  n, k = 40, 8
  logits = _logits(n, k, seed=1)
  mask = jnp.ones(n, bool)
  ours, _ = _plan(logits, mask, 1.0, gamma=1e7, dustbin=False, **TIGHT)
  cost = -jax.nn.log_softmax(logits, axis=-1)
  geom = geometry.Geometry(cost_matrix=cost, epsilon=0.1)
  prob = linear_problem.LinearProblem(geom, jnp.full(n, 1.0 / n), jnp.full(k, 1.0 / k))
  ref = sinkhorn.Sinkhorn(threshold=1e-6, max_iterations=20000)(prob).matrix
  np.testing.assert_allclose(np.asarray(ours), np.asarray(ref), atol=1e-6)
  np.testing.assert_allclose(np.asarray(ours).sum(0), 1.0 / k, atol=1e-5)


def test_padding_changes_nothing():
  n_real, k = 25, 8
  logits = _logits(n_real, k, seed=2)
  feats = jax.random.normal(jax.random.PRNGKey(3), (n_real, 6))
  pad = 1000.0 * jax.random.normal(jax.random.PRNGKey(4), (15, k))
  padded = jnp.concatenate([logits, pad])
  mask = jnp.arange(n_real + 15) < n_real
  for lam in (0.0, 0.1):
    kw = dict(structure_lambda=lam, **TIGHT)
    a, _ = _plan(logits, jnp.ones(n_real, bool), 0.5, feats=feats, **kw)
    b, _ = _plan(padded, mask, 0.5,
                             feats=jnp.concatenate([feats, 50.0 * jnp.ones((15, 6))]), **kw)
    np.testing.assert_allclose(np.asarray(b[:n_real]), np.asarray(a), atol=1e-7)
    assert np.all(np.asarray(b[n_real:]) == 0.0)
  # A patient with no real token (batch padding) gets an all-zero, finite plan.
  empty, _ = _plan(logits, jnp.zeros(n_real, bool), 0.5)
  assert np.all(np.asarray(empty) == 0.0)


def test_structure_term_factorised_equals_dense():
  n, k, d = 20, 5, 7
  feats = jax.random.normal(jax.random.PRNGKey(5), (n, d))
  feats = feats / jnp.linalg.norm(feats, axis=-1, keepdims=True)
  plan = jax.random.uniform(jax.random.PRNGKey(6), (n, k)) / (n * k)
  cost = jax.random.uniform(jax.random.PRNGKey(7), (n, k))
  s = feats @ feats.T
  np.testing.assert_allclose(ot.structure_gradient(plan, feats), s @ plan, rtol=1e-5, atol=1e-8)
  np.testing.assert_allclose(ot.structure_objective(cost, plan, feats, 0.1),
                             ot.structure_objective_dense(cost, plan, feats, 0.1), rtol=1e-6)
  # Majorisation-minimisation keeps the token marginal and moves the plan towards
  # similar tokens sharing prototypes (a lower structure objective).
  logits = _logits(n, k, seed=8)
  mask = jnp.ones(n, bool)
  p0, _ = _plan(logits, mask, 1.0, dustbin=False, **TIGHT)
  p1, _ = _plan(logits, mask, 1.0, feats=feats, dustbin=False,
                            structure_lambda=0.1, **TIGHT)
  np.testing.assert_allclose(np.asarray(p1).sum(1), 1.0 / n, rtol=1e-4)
  c = -jax.nn.log_softmax(logits, -1)
  assert ot.structure_objective(c, p1, feats, 0.1) <= ot.structure_objective(c, p0, feats, 0.1) + 1e-4


# ---- the model ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def toy():
  cohort = make_synthetic_cohort(SyntheticSpec(n_patients=24, seed=3, patch_dim=16,
                                               bag_min=12, bag_max=60))
  config = tta_config.get_config("smoke")
  m = config.model
  m.dim, m.num_prototypes, m.num_heads = 32, 8, 4
  method = get_method(config)
  model = method.build(cohort_info(cohort, method.modalities), nnx.Rngs(0))
  return cohort, method, model


def _predict(method, model, batch, present):
  graphdef, state = nnx.split(model)
  fn = jax.jit(lambda s, b: method.predict(nnx.merge(graphdef, s), b, present,
                                           jax.random.PRNGKey(0)))
  return np.asarray(fn(state, batch)["risk"])


def test_predict_deterministic_padding_free_and_never_reads_hidden(toy):
  cohort, method, model = toy
  spec = BatchSpec(batch_size=16)
  idx = np.arange(12)
  batch = make_batch(cohort, idx, spec)
  full = _predict(method, model, batch, frozenset(method.modalities))
  assert np.all(np.isfinite(full))
  np.testing.assert_array_equal(full, _predict(method, model, batch, frozenset(method.modalities)))
  for hidden in method.modalities:
    have = frozenset(method.modalities) - {hidden}
    nan = make_batch(cohort, idx, spec, hide=(hidden,), fill=np.nan)
    zero = make_batch(cohort, idx, spec, hide=(hidden,), fill=0.0)
    out = _predict(method, model, nan, have)
    assert np.all(np.isfinite(out)), hidden
    np.testing.assert_array_equal(out, _predict(method, model, zero, have))


def test_implicit_gradient_through_the_plan():
  n, k = 12, 4
  logits = _logits(n, k, seed=9)
  mask = jnp.arange(n) < 10
  weights = jax.random.normal(jax.random.PRNGKey(10), (n, k + 1))

  def f(l, implicit):
    plan, _ = _plan(l, mask, 0.6, implicit=implicit, **TIGHT)
    return jnp.sum(plan * weights)

  g = jax.grad(f)(logits, True)
  assert np.all(np.isfinite(np.asarray(g)))
  assert np.all(np.asarray(g)[10:] == 0.0)  # padded tokens: no gradient either
  assert np.any(np.asarray(g) != 0.0)


def test_train_step_finite_and_clock_ramps_rho(toy):
  cohort, method, model = toy
  if True:
    batch = jax.tree.map(jnp.asarray, make_batch(cohort, np.arange(12), BatchSpec(16, max_instances=32)))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tx = method.optimizer(10)
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state, key):
      def loss(p):
        return method.loss(nnx.merge(graphdef, p, rest), batch, key)
      (val, metrics), grads = jax.value_and_grad(loss, has_aux=True)(params)
      updates, opt_state = tx.update(grads, opt_state, params)
      return optax_apply(params, updates), opt_state, val, metrics, grads

    import optax
    optax_apply = optax.apply_updates
    for i in range(2):
      params, opt_state, val, metrics, grads = step(params, opt_state, jax.random.PRNGKey(i))
      assert np.isfinite(float(val))
      assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
    clock = nnx.merge(graphdef, params, rest).clock[...]
    np.testing.assert_allclose(float(clock), 2 * method.cfg.epochs / 10, rtol=1e-6)
    assert float(metrics["rho"]) > float(rho_schedule(0.0))
