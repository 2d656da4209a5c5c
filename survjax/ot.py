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
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp

with warnings.catch_warnings():
  warnings.simplefilter("ignore", DeprecationWarning)  # ott imports jaxopt
  from ott.geometry import geometry
  from ott.problems.linear import linear_problem
  from ott.solvers.linear import implicit_differentiation, sinkhorn

__all__ = ["kl_tau", "prototype_marginal", "solve_uot", "structure_gradient",
           "structure_objective",
           "structure_objective_dense", "prototype_plan", "batched_plan"]


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


def solve_uot(cost: jax.Array, a: jax.Array, b: jax.Array, *, epsilon: float = 0.1,
              tau_a: float = 1.0, tau_b: float = 1.0, threshold: float = 1e-4,
              max_iterations: int = 500, implicit: bool = False):
  """One entropic (unbalanced) OT problem with ott-jax's log-domain Sinkhorn.

  Args:
    cost: ``[N, M]`` cost matrix.
    a, b: ``[N]``, ``[M]`` non-negative marginals (zero entries get zero rows/columns).
    epsilon: entropic regularisation.
    tau_a, tau_b: ott's marginal relaxations (1 = hard constraint).
    threshold: marginal-error stopping threshold.
    max_iterations: iteration cap.
    implicit: differentiate by implicit differentiation of the optimality conditions
      (ott's `ImplicitDiff`); otherwise the solve is not meant to be differentiated
      (callers stop the gradient) and ott unrolls nothing.

  Returns:
    ``(plan [N, M], converged bool)``.
  """
  geom = geometry.Geometry(cost_matrix=cost, epsilon=epsilon)
  prob = linear_problem.LinearProblem(geom, a, b, tau_a=tau_a, tau_b=tau_b)
  solver = sinkhorn.Sinkhorn(
      threshold=threshold, max_iterations=max_iterations,
      implicit_diff=implicit_differentiation.ImplicitDiff() if implicit else None)
  out = solver(prob)
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
                   implicit: bool = False):
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
    threshold, max_iterations, implicit: see `solve_uot`.

  Returns:
    ``(plan [N, K (+1)], converged)``; rows of padded tokens are exactly 0, real rows sum
    to ``1 / n`` (to the solver's tolerance); all zeros when no token is real.
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
            max_iterations=max_iterations, implicit=implicit)
  plan, converged = solve_uot(cost, a, b, **kw)
  if structure_lambda > 0:
    if feats is None:
      raise ValueError("the structure-aware plan needs token features")
    f = feats.astype(jnp.float32)
    f = f * jax.lax.rsqrt(jnp.maximum(jnp.sum(f * f, axis=-1, keepdims=True), 1e-12))
    f = jnp.where(mask[:, None], f, 0.0)
    for _ in range(outer_iterations):
      # Majorise -lambda <S, Q Q^T> at the current plan: linear cost -2 lambda S Q_t.
      plan, converged = solve_uot(cost - 2.0 * structure_lambda * structure_gradient(plan, f),
                                  a, b, **kw)
  return jnp.where(empty, 0.0, plan), converged


def batched_plan(logits: jax.Array, mask: jax.Array, rho, feats: jax.Array | None = None,
                 **kwargs):
  """`prototype_plan` for every patient at once (``jax.vmap``): ``[B, N, K]`` logits,
  ``[B, N]`` mask, ``[B, N, d]`` feats (or None) -> ``([B, N, K (+1)], [B] converged)``."""
  if feats is None:
    return jax.vmap(lambda l, m: prototype_plan(l, m, rho, **kwargs))(logits, mask)
  return jax.vmap(lambda l, m, f: prototype_plan(l, m, rho, feats=f, **kwargs))(
      logits, mask, feats)
