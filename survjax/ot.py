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

All functions are pure and work on one patient; `batched_plan` vmaps them over a batch so
the whole batch is solved inside one jitted step.

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
``2 / (1 + sqrt(1 - tau_b))`` (1.54 at ``tau_b = 1 / 1.1``); ``w = 1.5`` more than halves
the iterations to the threshold here (benchmarks/uot.py). With ``w != 1`` the token marginal
is no longer exact after the last update but, like the prototype marginal, within the
stopping threshold (ott's error sums both marginals' L1 errors).

``threshold`` is ott's: the L1 norm of the dual gradient, i.e. the token-marginal L1 error
plus the prototype-marginal L1 error against its KL-optimal target ``b exp(-g / gamma)``,
per patient (under ``vmap`` every patient runs until the slowest converges; finished
patients are frozen). Under ``vmap`` ott's every-``inner_iterations`` error check becomes a
select, so the error is computed every iteration anyway; ``inner_iterations = 1`` then
stops at the first iteration below the threshold at no extra cost.

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

import warnings

import jax
import jax.numpy as jnp

with warnings.catch_warnings():
  warnings.simplefilter("ignore", DeprecationWarning)  # ott imports jaxopt
  from ott.geometry import epsilon_scheduler, geometry
  from ott.problems.linear import linear_problem
  from ott.solvers.linear import acceleration, implicit_differentiation, sinkhorn

__all__ = ["KERNEL_MAX_COST", "MODES", "kl_tau", "prototype_marginal", "ott_solve",
           "solve_uot", "structure_gradient", "structure_objective", "structure_objective_dense",
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


def ott_solve(cost, a, b, *, epsilon, tau_a, tau_b, threshold, max_iterations, implicit,
              mode, momentum, inner_iterations) -> sinkhorn.SinkhornOutput:
  """ott's `SinkhornOutput` of the problem `solve_uot` solves (same arguments)."""
  if mode not in MODES:
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
  if mode == "kernel":
    if implicit:
      raise ValueError("implicit differentiation needs mode='lse'")
    geom = geometry.Geometry(kernel_matrix=jnp.exp(-cost / epsilon),
                             epsilon=_FixedEpsilon(epsilon))
  else:
    geom = geometry.Geometry(cost_matrix=cost, epsilon=epsilon)
  prob = linear_problem.LinearProblem(geom, a, b, tau_a=tau_a, tau_b=tau_b)
  solver = sinkhorn.Sinkhorn(
      lse_mode=mode == "lse", threshold=threshold, max_iterations=max_iterations,
      inner_iterations=inner_iterations,
      momentum=acceleration.Momentum(value=momentum, inner_iterations=inner_iterations),
      implicit_diff=implicit_differentiation.ImplicitDiff() if implicit else None)
  return solver(prob)


def solve_uot(cost: jax.Array, a: jax.Array, b: jax.Array, *, epsilon: float = 0.1,
              tau_a: float = 1.0, tau_b: float = 1.0, threshold: float = 1e-4,
              max_iterations: int = 500, implicit: bool = False, mode: str = "lse",
              momentum: float = 1.0, inner_iterations: int = 10):
  """One entropic (unbalanced) OT problem with ott-jax's Sinkhorn.

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
    ``(plan [N, M], converged bool)``.
  """
  out = ott_solve(cost, a, b, epsilon=epsilon, tau_a=tau_a, tau_b=tau_b,
                  threshold=threshold, max_iterations=max_iterations, implicit=implicit,
                  mode=mode, momentum=momentum, inner_iterations=inner_iterations)
  if mode == "kernel":
    geom = out.ot_prob.geom
    u, v = out.scalings
    finite = jnp.all(jnp.isfinite(u)) & jnp.all(jnp.isfinite(v))
    return geom.transport_from_scalings(u, v), out.converged & finite
  return out.matrix, out.converged


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
      `solve_uot`.

  Returns:
    ``(plan [N, K (+1)], converged)``; rows of padded tokens are exactly 0, real rows sum
    to ``1 / n`` (to the solver's tolerance); all zeros when no token is real. In
    ``"kernel"`` mode ``converged`` is also False when ``max |C| / eps`` exceeds
    `KERNEL_MAX_COST` or a scaling is not finite (`batched_plan` then re-solves in
    ``"lse"`` mode).
  """
  num_protos = logits.shape[-1]
  cost = -jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  cost = jnp.where(mask[:, None], cost, 0.0)  # finite everywhere; padded rows carry no mass
  if dustbin:
    cost = jnp.concatenate([cost, jnp.zeros_like(cost[:, :1])], axis=-1)
  m = mask.astype(jnp.float32)
  empty = jnp.sum(m) == 0  # no token (padding patient): solve a dummy, return zeros
  a = jnp.where(empty, 1.0 / m.shape[0], m / jnp.maximum(jnp.sum(m), 1.0))
  b = prototype_marginal(num_protos, rho, dustbin)
  kw = dict(epsilon=epsilon, tau_a=1.0, tau_b=kl_tau(gamma, epsilon), threshold=threshold,
            max_iterations=max_iterations, implicit=implicit, mode=mode, momentum=momentum,
            inner_iterations=inner_iterations)

  def solve(c, max_abs_cost):
    plan, converged = solve_uot(c, a, b, **kw)
    if mode == "kernel":  # float32 kernel entries must not underflow (module docstring)
      converged &= max_abs_cost <= KERNEL_MAX_COST * epsilon
    return plan, converged

  # max |C| over real rows (padded rows and the dustbin cost 0): C >= 0 and its row maximum
  # is logsumexp - min of the logits, read off [N] vectors (the cost itself then feeds only
  # the kernel's exp, which XLA fuses with it).
  lg = logits.astype(jnp.float32)
  row_max = jax.nn.logsumexp(lg, axis=-1) - jnp.min(lg, axis=-1)
  plan, converged = solve(cost, jnp.max(jnp.where(mask, row_max, 0.0)))
  if structure_lambda > 0:
    if feats is None:
      raise ValueError("the structure-aware plan needs token features")
    f = feats.astype(jnp.float32)
    f = f * jax.lax.rsqrt(jnp.maximum(jnp.sum(f * f, axis=-1, keepdims=True), 1e-12))
    f = jnp.where(mask[:, None], f, 0.0)
    for _ in range(outer_iterations):
      # Majorise -lambda <S, Q Q^T> at the current plan: linear cost -2 lambda S Q_t.
      c = cost - 2.0 * structure_lambda * structure_gradient(plan, f)
      plan, ok = solve(c, jnp.max(jnp.abs(c)))  # padded rows: 0 - 0
      converged &= ok
  return jnp.where(empty, 0.0, plan), converged


def _vmapped_plan(logits, mask, rho, feats, kwargs, chunk):
  """`prototype_plan` vmapped over the patients, ``chunk`` patients at a time."""
  one = lambda x: prototype_plan(x[0], x[1], rho, feats=x[2], **kwargs)
  xs = (logits, mask, feats)
  if chunk >= logits.shape[0]:
    return jax.vmap(one)(xs)
  return jax.lax.map(one, xs, batch_size=chunk)


def batched_plan(logits: jax.Array, mask: jax.Array, rho, feats: jax.Array | None = None,
                 *, chunk_bytes: int = 0, **kwargs):
  """`prototype_plan` for every patient at once (``jax.vmap``): ``[B, N, K]`` logits,
  ``[B, N]`` mask, ``[B, N, d]`` feats (or None) -> ``([B, N, K (+1)], [B] converged)``.

  In ``mode="kernel"`` the batch is re-solved in ``"lse"`` mode without momentum when any
  patient's kernel solve is unsafe or did not converge (see the module docstring).

  ``chunk_bytes > 0`` solves the patients in consecutive groups (``lax.map`` over groups,
  ``vmap`` within a group) whose float32 plans fit in that many bytes, so that a group's
  kernel stays in the CPU's cache across the iterations, and a group stops with its own
  slowest patient; 0 (or a batch that fits) vmaps the whole batch. The plans are the same.
  """
  kwargs.setdefault("mode", "lse")
  b, n, k = logits.shape
  per_patient = 4 * n * (k + int(kwargs.get("dustbin", True)))
  chunk = b if chunk_bytes <= 0 else max(1, min(b, chunk_bytes // per_patient))
  if kwargs["mode"] != "kernel":
    return _vmapped_plan(logits, mask, rho, feats, kwargs, chunk)
  plan, converged = _vmapped_plan(logits, mask, rho, feats, kwargs, chunk)
  fallback = {**kwargs, "mode": "lse", "momentum": 1.0}
  return jax.lax.cond(jnp.all(converged), lambda: (plan, converged),
                      lambda: _vmapped_plan(logits, mask, rho, feats, fallback, chunk))
