"""Survival losses and scores: discrete-time hazard NLL and the Cox partial likelihood.

Pure JAX functions, safe under ``jit``, ``grad`` and ``vmap``. Every loss takes per-patient
``weights`` ``[B]`` (``0`` for padded patients, usually ``1`` otherwise) and returns a
weighted mean over patients, so a batch padded to a fixed shape gives exactly the loss
of the unpadded batch, whatever the padded rows contain (as long as it is finite).

Discrete-time model (MUST eq. 4-6, impuTMAE): follow-up is cut into ``K`` intervals and a
patient's time is mapped to its bin ``k in {0, ..., K-1}`` (see `survjax.data.timebins`).
The network outputs one logit per bin, ``h_k = sigmoid(logit_k) = P(T = k | T >= k, x)``
and ``S(k) = P(T > k | x) = prod_{j<=k} (1 - h_j)``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def weighted_mean(values: jax.Array, weights: jax.Array) -> jax.Array:
  """``sum_i w_i v_i / sum_i w_i`` (``0`` when all weights are 0); rows with ``w_i = 0``
  are dropped with ``where`` so that a non-finite padded value cannot leak in."""
  weights = weights.astype(values.dtype)
  values = jnp.where(weights > 0, values, 0.0)
  total = jnp.sum(weights)
  return jnp.sum(weights * values) / jnp.where(total > 0, total, 1.0)


def _log_survival(logits: jax.Array) -> jax.Array:
  """``log S(k) = sum_{j<=k} log(1 - h_j)`` with ``log(1 - sigmoid(l)) = log_sigmoid(-l)``."""
  return jnp.cumsum(jax.nn.log_sigmoid(-logits), axis=-1)


def survival_curve(logits: jax.Array) -> jax.Array:
  """Discrete survival function ``S(k) = prod_{j<=k} (1 - sigmoid(logit_j))``.

  Args:
    logits: ``[B, K]`` hazard logits.

  Returns:
    ``[B, K]`` survival probabilities, non-increasing in ``k``.
  """
  return jnp.exp(_log_survival(logits))


def discrete_time_risk(logits: jax.Array) -> jax.Array:
  """Risk score ``r = -sum_{k=0}^{K-1} S(k)`` (MCAT/MUST convention; higher = worse).

  ``sum_k S(k)`` is the expected number of survived intervals, so ``r`` is minus the
  (discrete) restricted mean survival time.

  Args:
    logits: ``[B, K]`` hazard logits.

  Returns:
    ``[B]`` risk scores.
  """
  return -jnp.sum(survival_curve(logits), axis=-1)


def discrete_time_nll(logits: jax.Array, bins: jax.Array, event: jax.Array,
                      weights: jax.Array, alpha: float = 0.0) -> jax.Array:
  r"""Negative log-likelihood of the discrete-time hazard model (weighted mean over patients).

  With ``h_k = sigmoid(l_k)``, ``S(k) = prod_{j<=k} (1 - h_j)``, ``S(-1) = 1``, bin ``k_i``
  and event indicator ``delta_i``:

  .. math::

    \ell_i^{unc} = -\delta_i [\log S(k_i - 1) + \log h_{k_i}], \qquad
    \ell_i^{cen} = -(1 - \delta_i) \log S(k_i),

    \mathcal{L} = \frac{\sum_i w_i [(1 - \alpha)(\ell_i^{unc} + \ell_i^{cen})
                  + \alpha \ell_i^{unc}]}{\sum_i w_i}.

  This is the full likelihood of an event in interval ``k`` (survive ``0..k-1``, then fail
  at ``k``) and of censoring in interval ``k`` (survive ``0..k``), as in Zadeh & Schmid
  (2020) and the reference implementations (``NLLSurvLoss`` of MCAT, SurvPath, CMTA, which
  MUST and impuTMAE build on). MUST eq. (6) as printed drops ``log S(k-1)`` from the
  uncensored term; that would leave the hazards of earlier bins unconstrained by events, so
  we follow the reference code. ``alpha`` up-weights the uncensored term exactly as in
  ``NLLSurvLoss`` (default ``0``: the plain likelihood).

  Numerically stable for any finite logits: ``log h = log_sigmoid(l)`` and
  ``log(1 - h) = log_sigmoid(-l)``, no ``log(0)`` and no clamping ``eps``.

  Args:
    logits: ``[B, K]`` hazard logits.
    bins: ``int[B]`` bin index in ``[0, K-1]`` (indices outside are clipped; the data
      layer validates them).
    event: ``[B]`` ``1`` for an observed event, ``0`` for censored (bool or float).
    weights: ``[B]`` non-negative patient weights, ``0`` for padding.
    alpha: weight of the uncensored-only term, in ``[0, 1]``.

  Returns:
    Scalar loss; ``0`` if all weights are ``0``.
  """
  logits = jnp.asarray(logits)
  num_bins = logits.shape[-1]
  idx = jnp.clip(jnp.asarray(bins).astype(jnp.int32), 0, num_bins - 1)[:, None]
  log_s = _log_survival(logits)                                            # log S(k)
  log_s_prev = jnp.concatenate([jnp.zeros_like(log_s[:, :1]), log_s[:, :-1]], axis=-1)
  log_h = jax.nn.log_sigmoid(logits)
  take = lambda a: jnp.take_along_axis(a, idx, axis=-1)[:, 0]
  delta = jnp.asarray(event).astype(logits.dtype)
  uncensored = -delta * (take(log_s_prev) + take(log_h))
  censored = -(1.0 - delta) * take(log_s)
  per_patient = (1.0 - alpha) * (uncensored + censored) + alpha * uncensored
  return weighted_mean(per_patient, jnp.asarray(weights))


def cox_partial_nll(risk: jax.Array, time: jax.Array, event: jax.Array,
                    weights: jax.Array) -> jax.Array:
  r"""Negative Cox partial log-likelihood, Breslow ties, normalised by the number of events.

  .. math::

    \mathcal{L} = -\frac{1}{\sum_i w_i \delta_i} \sum_i w_i \delta_i
      \Big[r_i - \log \sum_{j:\, t_j \ge t_i} w_j e^{r_j}\Big].

  Tied times share one risk set (``t_j >= t_i`` includes every patient tied with ``i``),
  which is Breslow's approximation; with unit weights this is the likelihood that
  ``sksurv.linear_model.CoxPHSurvivalAnalysis(ties="breslow")`` maximises, divided by the
  number of events. Weights act as case weights inside the risk sets (``w_j e^{r_j}``), so a
  patient with ``w_j = 0`` is in no risk set and contributes no term.

  Computed in ``O(B log B)``: sort by time, a reverse ``lax.cumlogsumexp`` gives
  ``log sum_{j >= p} w_j e^{r_j}`` for every sorted position ``p``, and each patient reads
  it at the first position of its tie group. No overflow for large risks.

  Args:
    risk: ``[B]`` log-risk (linear predictor), higher = earlier event.
    time: ``[B]`` observed times.
    event: ``[B]`` ``1`` for an event, ``0`` for censored.
    weights: ``[B]`` non-negative weights, ``0`` for padding.

  Returns:
    Scalar loss; ``0`` (not NaN) if the batch has no weighted events.
  """
  risk = jnp.asarray(risk)
  time = jnp.asarray(time)
  weights = jnp.asarray(weights).astype(risk.dtype)
  order = jnp.argsort(time)
  t_sorted = time[order]
  w_sorted = weights[order]
  valid = w_sorted > 0
  # Padded rows enter the risk sets at a huge negative finite log-weight rather than -inf:
  # exp underflows to exactly 0 either way, but -inf makes second derivatives (Hessian-
  # vector products, PARACHUTE's curvature) NaN.
  absent = 0.5 * jnp.finfo(risk.dtype).min
  x = jnp.where(valid, risk[order] + jnp.log(jnp.where(valid, w_sorted, 1.0)), absent)
  tail_lse = jax.lax.cumlogsumexp(x, axis=0, reverse=True)   # log sum_{q >= p} w_q e^{r_q}
  first = jnp.searchsorted(t_sorted, t_sorted, side="left")  # first index of the tie group
  lse = tail_lse[first]
  w_event = w_sorted * jnp.asarray(event)[order].astype(risk.dtype)
  has_term = w_event > 0
  term = jnp.where(has_term, risk[order] - jnp.where(has_term, lse, 0.0), 0.0)
  n_events = jnp.sum(w_event)
  return -jnp.sum(w_event * term) / jnp.where(n_events > 0, n_events, 1.0)
