r"""Unbalanced entropic optimal transport (ott-jax) of tokens onto prototypes, for TTA.

A patient's ``N`` tokens (padded to a fixed ``N``, ``mask`` marks the real ones) are
transported onto ``K`` prototypes plus an optional zero-cost *dustbin* column:

.. math::

  \min_{Q \ge 0}\; \langle Q, C \rangle + \varepsilon H(Q)
    + \tau_a' \mathrm{KL}(Q \mathbf{1} \| a) + \tau_b' \mathrm{KL}(Q^\top \mathbf{1} \| b),

  a_i = m_i / \textstyle\sum_j m_j, \qquad
  b = (\rho / K, \dots, \rho / K,\; 1 - \rho),

with ``tau = tau' / (tau' + eps)`` in ott's convention: ``tau_a = 1`` makes the token
marginal a hard constraint (every real token ships exactly ``1 / n`` of mass, padded tokens
ship none: ``a_i = 0``, ott then gives them ``f_i = -inf`` and an exact zero row), and
``tau_b = gamma / (gamma + eps)`` relaxes the prototype marginal by a KL penalty of weight
``gamma``. The dustbin column costs 0 and has mass ``1 - rho``: tokens that fit no
prototype go there, and ``rho`` (ramped up during training) sets how much mass the
prototypes must absorb.

Structure-aware variant (``structure_lambda > 0``): with ``S = F F^T`` the tokens'
cosine similarity (``F`` = L2-normalised token features, zero rows for padding),

.. math::

  \min_Q\; \langle Q, C \rangle - \lambda \langle S, Q Q^\top \rangle + \varepsilon H(Q) + \dots

is solved by majorisation-minimisation: ``-lambda <S, Q Q^T>`` is concave in ``Q`` (``S``
is PSD), so its linearisation at ``Q_t`` majorises it and each outer step is an ordinary
entropic UOT with the cost ``C - 2 lambda S Q_t``; ``S Q_t = F (F^T Q_t)`` is computed
in ``O(N d K)`` without ever forming the ``N x N`` matrix ``S``.

All functions are pure. `batched_plan` solves a whole batch inside one jitted step: costs,
structure terms and plans are formed for the batch at once, ott's loop runs per patient
(``lax.map``; see its docstring for why not under ``vmap``).

Solver settings (``mode``). ``"lse"`` is ott's log-domain Sinkhorn: two log-sum-exp
passes (an ``exp`` per entry) per iteration, safe for any cost. ``"kernel"`` is ott's
kernel (scaling) mode, ``Sinkhorn(lse_mode=False)``: the kernel ``exp(-C / eps)`` is formed
once and each iteration is two matrix-vector products, several times cheaper on a CPU. In
float32 it is safe when no kernel entry under- or overflows, i.e. when ``max |C| / eps``
stays below `KERNEL_MAX_COST` (80; ``exp(-80) = 1.8e-35`` is above float32's smallest
normal number). TTA's costs are bounded: ``C = -log softmax`` of cosines over a
temperature ``T`` lies in ``[0, 2 / T + log K]`` (7.5 for ``T = 0.5``, ``K = 32``), i.e.
``C / eps <= 75`` at ``eps = 0.1`` (the structure term moves it by at most ``2 lambda``).
`batched_plan` checks this bound and ott's own convergence flag (plus finite scalings) for
every patient and re-solves the whole batch in ``"lse"`` mode (one ``lax.cond`` at the
batch level, so the fallback costs nothing when unused) if any patient is outside the
safe range or did not converge.

``momentum`` is ott's over-relaxation (`ott.solvers.linear.acceleration.Momentum` with a
constant weight ``w``): each update becomes ``u_new^w u_old^(1 - w)`` (kernel mode) or
``w f_new + (1 - w) f_old`` (log mode). The unbalanced iteration contracts by a factor of
at most ``tau_b`` per step (Sejourne et al. 2019), for which the classical optimal weight is
``2 / (1 + sqrt(1 - tau_b))`` (1.54 at ``tau_b = 1 / 1.1``); ``w = 1.55`` cuts the
iterations to the threshold about threefold here (benchmarks/uot.py). With ``w != 1`` the
token marginal is no longer exact after the last update but, like the prototype marginal, within the
stopping threshold (ott's error sums both marginals' L1 errors).

``threshold`` is ott's: the L1 norm of the dual gradient, i.e. the token-marginal L1 error
plus the prototype-marginal L1 error against its KL-optimal target ``b exp(-g / gamma)``,
per patient, checked every ``inner_iterations``.

The dustbin and ``rho``. ott relaxes every prototype-side entry with the same ``tau_b``,
the dustbin included: its target is ``1 - rho`` but, being free while the prototypes cost
about ``log K``, it takes more than that (0.90 instead of 0.50 for 32 random-ish
prototypes at ``rho = 0.5``, ``gamma = 1``; POT and a float64 solver of the same
problem agree, benchmarks/uot.py). It carries exactly ``1 - rho`` only as ``gamma -> inf``
(and nothing at ``rho = 1``, whatever ``gamma``). P2OT's ``SemiCurrSinkhornKnopp``
(github.com/rhfeiyang/PPOT), whose dustbin and ``rho`` ramp this design follows, applies
the KL power to the prototype columns only, i.e. a hard dustbin constraint of exactly
``1 - rho`` (whether TTA's released code does the same is not checked here: only its
abstract is in ../shared/papers). ott's `LinearProblem` takes one scalar ``tau_b`` (it
compares ``tau_b`` with 1.0 in Python), so that variant is not expressible with ott's
solver as is.
"""

from __future__ import annotations

import inspect
import warnings

import jax
import jax.numpy as jnp

with warnings.catch_warnings():
  warnings.simplefilter("ignore", DeprecationWarning)  # ott imports jaxopt
  from ott.geometry import epsilon_scheduler, geometry
  from ott.problems.linear import linear_problem
  from ott.solvers.linear import acceleration, implicit_differentiation, sinkhorn

__all__ = ["KERNEL_MAX_COST", "MODES", "kl_tau", "prototype_marginal", "ott_solve",
           "uot_potentials", "plan_from_potentials", "structure_gradient", "structure_objective",
           "structure_objective_dense",
           "prototype_plan", "batched_plan"]

MODES = ("kernel", "lse")
KERNEL_MAX_COST = 80.0  # max |C| / eps allowed in float32 kernel mode


@jax.tree_util.register_pytree_node_class
class _FixedEpsilon(epsilon_scheduler.Epsilon):
  """A constant ``eps`` that ott's geometry sees as a Python float at every iteration.

  ott's default scheduler returns ``max(init * decay**it, 1) * eps`` computed from the
  traced iteration number, so kernel mode's ``kernel ** (eps_target / eps_it)`` becomes
  an elementwise ``pow`` of the whole kernel in every update (plus ``exp`` of the cost,
  recomputed inside the loop); with a constant XLA folds the exponent 1 away.
  """

  def __call__(self, it):
    del it
    return self.target


def kl_tau(gamma: float, epsilon: float) -> float:
  """ott's ``tau`` for a KL marginal penalty of weight ``gamma``: ``gamma / (gamma + eps)``."""
  return gamma / (gamma + epsilon)


def prototype_marginal(num_prototypes: int, rho, dustbin: bool = True) -> jax.Array:
  """``b = (rho/K, ..., rho/K, 1 - rho)`` (no last entry and ``rho`` ignored without a
  dustbin: ``b = 1/K``)."""
  if not dustbin:
    return jnp.full((num_prototypes,), 1.0 / num_prototypes)
  rho = jnp.asarray(rho, jnp.float32)
  return jnp.concatenate([jnp.full((num_prototypes,), rho / num_prototypes),
                          jnp.reshape(1.0 - rho, (1,))])


@jax.tree_util.register_pytree_node_class
class _Sinkhorn(sinkhorn.Sinkhorn):
  """ott's Sinkhorn whose kernel-mode powers are ``exp(t log x)`` instead of ``x ** t``.

  ott writes the over-relaxed scaling ``u_old^(1 - w) u_new^w`` and the KL power
  ``u^tau`` with ``**``, which XLA:CPU lowers to a scalar ``powf`` call per entry, slower
  than the iteration's two matrix-vector products on a patient's 4096 tokens. The same
  update through XLA's vectorised ``exp`` and ``log``; the loop, the error, the stopping
  rule and the differentiation stay ott's.
  """

  def kernel_step(self, ot_prob, state, iteration):
    w = self.momentum.weight(state, iteration)
    geom = ot_prob.geom
    new_gv = _power(geom.update_scaling(state.fu, ot_prob.b, iteration, axis=0),
                    ot_prob.tau_b)
    gv = _relax(w, state.gv, new_gv)
    new_fu = _power(geom.update_scaling(state.gv if self.parallel_dual_updates else gv,
                                        ot_prob.a, iteration, axis=1), ot_prob.tau_a)
    return state.set(potentials=(_relax(w, state.fu, new_fu), gv))


def _power(x, t):
  return x if t == 1.0 else jnp.exp(t * jnp.log(x))


def _relax(w, old, new):
  """ott's kernel-mode momentum ``old^(1 - w) new^w`` (``old <= 0`` read as 1; a zero
  ``new``, the scaling of a zero-mass entry, stays exactly 0)."""
  if isinstance(w, float) and w == 1.0:
    return new
  old = jnp.where(old > 0.0, old, 1.0)
  return jnp.exp((1.0 - w) * jnp.log(old) + w * jnp.log(new))


def ott_solve(cost, a, b, *, epsilon, tau_a, tau_b, threshold, max_iterations, implicit,
              mode, momentum, inner_iterations) -> tuple[sinkhorn.SinkhornOutput, bool]:
  """ott's `SinkhornOutput` of the problem `uot_potentials` solves (same arguments), and
  whether ott was given it transposed.

  In kernel mode the longer side becomes ott's columns (the problem transposed: ``cost.T``,
  ``b``, ``a`` and the two ``tau`` swapped, the same solution): ott stores the kernel
  row-major, and both matrix-vector products of an iteration then run along contiguous
  rows of the long side (several times faster on TTA's ``4096 x 33`` kernels).
  ott updates its column scalings first, so the transposed solve visits the sides in the
  other order; both stop on the same error.
  """
  if mode not in MODES:
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
  transposed = False
  if mode == "kernel":
    if implicit:
      raise ValueError("implicit differentiation needs mode='lse'")
    if cost.shape[0] > cost.shape[1]:
      cost, a, b, tau_a, tau_b, transposed = cost.T, b, a, tau_b, tau_a, True
    geom = geometry.Geometry(kernel_matrix=jnp.exp(-cost / epsilon),
                             epsilon=_FixedEpsilon(epsilon))
  else:
    geom = geometry.Geometry(cost_matrix=cost, epsilon=epsilon)
  prob = linear_problem.LinearProblem(geom, a, b, tau_a=tau_a, tau_b=tau_b)
  solver = _Sinkhorn(
      lse_mode=mode == "lse", threshold=threshold, max_iterations=max_iterations,
      inner_iterations=inner_iterations,
      momentum=acceleration.Momentum(value=momentum, inner_iterations=inner_iterations),
      implicit_diff=implicit_differentiation.ImplicitDiff() if implicit else None)
  return solver(prob), transposed


def uot_potentials(cost: jax.Array, a: jax.Array, b: jax.Array, *, epsilon: float = 0.1,
                   tau_a: float = 1.0, tau_b: float = 1.0, threshold: float = 1e-4,
                   max_iterations: int = 500, implicit: bool = False, mode: str = "lse",
                   momentum: float = 1.0, inner_iterations: int = 10):
  """One entropic (unbalanced) OT problem with ott-jax's Sinkhorn: its dual potentials
  (the plan is `plan_from_potentials`).

  Args:
    cost: ``[N, M]`` cost matrix.
    a, b: ``[N]``, ``[M]`` non-negative marginals (zero entries get zero rows/columns).
    epsilon: entropic regularisation.
    tau_a, tau_b: ott's marginal relaxations (1 = hard constraint).
    threshold: marginal-error stopping threshold (ott's L1 dual-gradient norm).
    max_iterations: iteration cap.
    implicit: differentiate by implicit differentiation of the optimality conditions
      (ott's `ImplicitDiff`, log mode only); otherwise the solve is not meant to be
      differentiated (callers stop the gradient) and ott unrolls nothing.
    mode: ``"lse"`` (log domain) or ``"kernel"`` (scalings; see the module docstring for
      when it is safe: here it is not checked, `prototype_plan` does).
    momentum: ott's constant over-relaxation weight (1 = plain Sinkhorn).
    inner_iterations: iterations between two of ott's error checks.

  Returns:
    ``(f [N], g [M], converged)``; in kernel mode ``f = eps log u`` (``-inf`` on zero-mass
    rows). ``converged`` is ott's flag, and also requires every recorded error and, in
    kernel mode, every scaling to be finite.
  """
  out, transposed = ott_solve(
      cost, a, b, epsilon=epsilon, tau_a=tau_a, tau_b=tau_b, threshold=threshold,
      max_iterations=max_iterations, implicit=implicit, mode=mode, momentum=momentum,
      inner_iterations=inner_iterations)
  # ott stops when its error turns infinite but still reports convergence then (its flag
  # reads the last error slot, left at -1): an over-relaxed kernel solve can diverge so.
  converged = out.converged & jnp.all(jnp.isfinite(out.errors))
  if mode == "kernel":
    f, g = (epsilon * jnp.log(s) for s in out.scalings)
    converged &= jnp.all(f < jnp.inf) & jnp.all(g < jnp.inf)  # NaN fails too
  else:
    f, g = out.f, out.g
  return (g, f, converged) if transposed else (f, g, converged)


def plan_from_potentials(cost, f, g, epsilon):
  """``Q_ij = exp((f_i + g_j - C_ij) / eps)`` (ott's ``transport_from_potentials``)."""
  return jnp.exp((f[..., :, None] + g[..., None, :] - cost) / epsilon)


def structure_gradient(plan: jax.Array, feats: jax.Array) -> jax.Array:
  """``S Q = F (F^T Q)`` with ``S = F F^T``: the gradient of ``<S, Q Q^T>`` is ``2 S Q``.

  Args:
    plan: ``[N, M]``.
    feats: ``[N, d]`` L2-normalised token features (zero rows for padding).
  """
  return feats @ (feats.T @ plan)


def structure_objective(cost, plan, feats, lam):
  """``<Q, C> - lambda <S, Q Q^T>`` factorised: ``<S, Q Q^T> = ||F^T Q||_F^2``."""
  return jnp.sum(plan * cost) - lam * jnp.sum((feats.T @ plan) ** 2)


def structure_objective_dense(cost, plan, feats, lam):
  """``<Q, C> - lambda <S, Q Q^T>`` with the dense ``S = F F^T`` (tests only)."""
  s = feats @ feats.T
  return jnp.sum(plan * cost) - lam * jnp.sum(s * (plan @ plan.T))


def _setup(logits, mask, dustbin):
  """One patient's cost ``[N, K (+1)]``, token marginal ``a``, ``max |C|`` over its real
  rows, and whether it has no real token."""
  lg = logits.astype(jnp.float32)
  lse = jax.nn.logsumexp(lg, axis=-1, keepdims=True)
  cost = jnp.where(mask[:, None], lse - lg, 0.0)  # -log softmax; padded rows cost 0
  if dustbin:
    cost = jnp.concatenate([cost, jnp.zeros_like(cost[:, :1])], axis=-1)
  m = mask.astype(jnp.float32)
  empty = jnp.sum(m) == 0  # no token (padding patient): solve a dummy, return zeros
  a = jnp.where(empty, 1.0 / m.shape[0], m / jnp.maximum(jnp.sum(m), 1.0))
  # C >= 0, so max |C| is the largest real row's lse - min of its logits.
  row_max = lse[:, 0] - jnp.min(lg, axis=-1)
  return cost, a, jnp.max(jnp.where(mask, row_max, 0.0)), empty


def _map(fn, xs, chunk: int):
  """``fn`` over the leading axis, ``chunk`` patients at a time: one at a time is a plain
  ``lax.map`` (no ``vmap``, so ott's loop keeps its own stopping and error cadence),
  a chunk as large as the batch one ``vmap``, in between ``vmap`` within a chunk."""
  b = jax.tree_util.tree_leaves(xs)[0].shape[0]
  if chunk <= 1:
    return jax.lax.map(fn, xs)
  if chunk >= b:
    return jax.vmap(fn)(xs)
  return jax.lax.map(fn, xs, batch_size=chunk)


def _potentials_batch(cost, a, b, max_cost, empty, mask, feats, *, chunk, epsilon, gamma,
                      structure_lambda, outer_iterations, **solver):
  """Every patient's potentials ``(f [B, N], g [B, M], converged [B], cost)``: ott's loop
  per group of ``chunk`` patients; ``cost`` is the last solve's (the structure-aware
  solve's linearised cost, else None: the input's). A patient without tokens gets ``f =
  -inf``, a zero plan."""
  kw = dict(epsilon=epsilon, tau_a=1.0, tau_b=kl_tau(gamma, epsilon), **solver)

  def one(x):
    c_i, a_i, max_c = x
    f, g, converged = uot_potentials(c_i, a_i, b, **kw)
    if solver["mode"] == "kernel":  # float32 kernel entries must not underflow (module doc)
      converged &= max_c <= KERNEL_MAX_COST * epsilon
    return f, g, converged

  def solve(c, max_abs_cost):
    f, g, converged = _map(one, (c, a, max_abs_cost), chunk)
    return jnp.where(empty[:, None], -jnp.inf, f), g, converged

  f, g, converged = solve(cost, max_cost)
  if structure_lambda <= 0:
    return f, g, converged, None
  if feats is None:
    raise ValueError("the structure-aware plan needs token features")
  u = feats.astype(jnp.float32)
  u = u * jax.lax.rsqrt(jnp.maximum(jnp.sum(u * u, axis=-1, keepdims=True), 1e-12))
  u = jnp.where(mask[..., None], u, 0.0)
  c = cost
  for _ in range(outer_iterations):
    # Majorise -lambda <S, Q Q^T> at the current plan: linear cost -2 lambda S Q_t.
    plan = plan_from_potentials(c, f, g, epsilon)
    c = cost - 2.0 * structure_lambda * jax.vmap(structure_gradient)(plan, u)
    f, g, ok = solve(c, jnp.max(jnp.abs(c), axis=(1, 2)))  # padded rows: 0 - 0
    converged &= ok
  return f, g, converged, c


def _plans(logits, mask, rho, feats, *, chunk, dustbin, fallback, **opts):
  """`batched_plan` (``fallback``: re-solve in ``"lse"`` mode when a kernel solve fails)."""
  b = prototype_marginal(logits.shape[-1], rho, dustbin)
  cost, a, max_cost, empty = jax.vmap(lambda l, m: _setup(l, m, dustbin))(logits, mask)
  solve = lambda **o: _potentials_batch(cost, a, b, max_cost, empty, mask, feats, chunk=chunk,
                                        **o)
  f, g, converged, c = solve(**opts)
  if fallback and opts["mode"] == "kernel":
    # The cond carries the potentials, not the [B, N, M] plans (a copy of those would cost
    # about a tenth of the solve); the plan is formed once, after it.
    f, g, converged, c = jax.lax.cond(
        jnp.all(converged), lambda: (f, g, converged, c),
        lambda: solve(**{**opts, "mode": "lse", "momentum": 1.0}))
  return plan_from_potentials(cost if c is None else c, f, g, opts["epsilon"]), converged


def prototype_plan(logits: jax.Array, mask: jax.Array, rho, *, feats: jax.Array | None = None,
                   epsilon: float = 0.1, gamma: float = 1.0, dustbin: bool = True,
                   structure_lambda: float = 0.0, outer_iterations: int = 3,
                   threshold: float = 1e-4, max_iterations: int = 500,
                   implicit: bool = False, mode: str = "lse", momentum: float = 1.0,
                   inner_iterations: int = 10):
  """Transport plan of one patient's tokens onto ``K`` prototypes (+ dustbin).

  The cost is ``C_ik = -log softmax_k(logits_i)`` (0 for the dustbin column); see the
  module docstring for the problem.

  Args:
    logits: ``[N, K]`` token-to-prototype logits.
    mask: bool ``[N]``, True = real token (padded tokens get no mass).
    rho: prototype mass (scalar in ``(0, 1]``); the dustbin carries ``1 - rho``.
    feats: ``[N, d]`` token features for the structure term (needed when
      ``structure_lambda > 0``).
    epsilon: entropic regularisation.
    gamma: KL weight of the prototype marginal (``tau_b = gamma / (gamma + epsilon)``).
    dustbin: append the dustbin column.
    structure_lambda: weight ``lambda`` of the structure term (0 = plain UOT).
    outer_iterations: majorisation-minimisation steps of the structure-aware solve.
    threshold, max_iterations, implicit, mode, momentum, inner_iterations: see
      `uot_potentials`.

  Returns:
    ``(plan [N, K (+1)], converged)``; rows of padded tokens are exactly 0, real rows sum
    to ``1 / n`` (to the solver's tolerance); all zeros when no token is real. In
    ``"kernel"`` mode ``converged`` is also False when ``max |C| / eps`` exceeds
    `KERNEL_MAX_COST` or a scaling is not finite (`batched_plan` then re-solves in
    ``"lse"`` mode).
  """
  plan, converged = _plans(
      logits[None], mask[None], rho, None if feats is None else feats[None], chunk=1,
      fallback=False, epsilon=epsilon, gamma=gamma, dustbin=dustbin,
      structure_lambda=structure_lambda, outer_iterations=outer_iterations,
      threshold=threshold, max_iterations=max_iterations, implicit=implicit, mode=mode,
      momentum=momentum, inner_iterations=inner_iterations)
  return plan[0], converged[0]


# `batched_plan`'s options and their defaults: `prototype_plan`'s keywords but ``feats``.
_PLAN_OPTIONS = {name: p.default for name, p in inspect.signature(prototype_plan).parameters.items()
                 if p.kind is p.KEYWORD_ONLY and name != "feats"}


def batched_plan(logits: jax.Array, mask: jax.Array, rho, feats: jax.Array | None = None,
                 *, patients_per_solve: int = 1, **kwargs):
  """`prototype_plan` for every patient of a batch: ``[B, N, K]`` logits, ``[B, N]``
  mask, ``[B, N, d]`` feats (or None) -> ``([B, N, K (+1)], [B] converged)``.

  The costs, the structure term and the plans are formed for the whole batch at once
  (``vmap``); ott's loop runs per group of ``patients_per_solve`` patients. 1 (the default)
  runs it for one patient at a time (``lax.map``), stopping on that patient's own error, checked
  every ``inner_iterations``, with the patient's kernel in the CPU's cache; a larger group
  is ``vmap``-ed, which turns ott's stopping into a mask (every patient iterates until the
  group's slowest converges) and its every-``inner_iterations`` error check into a select
  computed at every iteration; 0 puts the whole batch in one group. The plans agree to the
  threshold (benchmarks/uot.py times the settings).

  In ``mode="kernel"`` the batch is re-solved in ``"lse"`` mode without momentum when any
  patient's kernel solve is unsafe or did not converge (see the module docstring).
  """
  unknown = set(kwargs) - set(_PLAN_OPTIONS)
  if unknown:
    raise TypeError(f"batched_plan got unexpected options {sorted(unknown)}")
  opts = {**_PLAN_OPTIONS, **kwargs}
  chunk = logits.shape[0] if patients_per_solve <= 0 else patients_per_solve
  return _plans(logits, mask, rho, feats, chunk=chunk, fallback=True, **opts)

