"""Survival metrics on the host (numpy): Harrell's C-index, Uno's C, IBS, cumulative AUC.

`concordance_index` is a vectorised ``O(n log^2 n)`` reimplementation of
``sksurv.metrics.concordance_index_censored`` that returns exactly the same five numbers
(about a second for 100k patients, where the sksurv loop takes minutes). The other metrics
wrap scikit-survival, which stays the reference: they turn our arrays into its structured
``Surv`` arrays with boolean events, keep evaluation times inside the range where the
metric is defined, and turn its ``ValueError`` into a one-line `InputError`.

scikit-survival is imported lazily, so importing this module is cheap.
"""

from __future__ import annotations

import numpy as np

from survjax.errors import InputError


# ---- input checks ------------------------------------------------------------------------

def _check_time_event(time, event, what: str = "test"):
  time = np.asarray(time)
  event = np.asarray(event)
  if time.ndim != 1 or event.shape != time.shape:
    raise InputError(f"{what} time and event must be 1-D of one length, got shapes "
                     f"{time.shape} and {event.shape}")
  if not (np.issubdtype(time.dtype, np.integer) or np.issubdtype(time.dtype, np.floating)):
    raise InputError(f"{what} time has dtype {time.dtype}, expected numbers")
  if not np.all(np.isfinite(time)):
    raise InputError(f"{what} time has NaN or inf at patient index "
                     f"{int(np.flatnonzero(~np.isfinite(time))[0])}, expected finite numbers")
  if event.dtype != bool:
    if not np.all(np.isin(event, (0, 1))):
      raise InputError(f"{what} event has values other than 0/1 or True/False")
    event = event.astype(bool)
  return time, event


def _check_risk(risk, n: int, name: str = "risk", ndim=(1,)):
  risk = np.asarray(risk)
  if risk.ndim not in ndim or risk.shape[0] != n:
    raise InputError(f"{name} has shape {risk.shape}, expected {n} patients"
                     + (" (1-D)" if ndim == (1,) else ""))
  if not np.issubdtype(risk.dtype, np.floating):
    risk = risk.astype(np.float64)
  if not np.all(np.isfinite(risk)):
    raise InputError(f"{name} has NaN or inf, expected finite predictions")
  return risk


# ---- Harrell's C-index -----------------------------------------------------------------------

def _tie_windows(u: np.ndarray, tol: float):
  """For sorted unique values ``u``: ``[lo_q, hi_q)``, the indices ``k`` with
  ``|u_k - u_q| <= tol`` evaluated in ``u``'s dtype exactly as sksurv does.

  ``fl(u_k - u_q)`` is monotone in ``u_k`` (rounding is monotone), so the tied set is a
  contiguous window around ``q``; ``searchsorted`` on ``u -/+ tol`` finds it up to rounding
  and the loops move each edge (rarely more than one step) until the predicate agrees.
  """
  m = u.shape[0]
  q = np.arange(m)
  tied = lambda k, sel: np.absolute(u[k] - u[sel]) <= tol
  lo = np.minimum(np.searchsorted(u, u - tol, side="left"), q)
  hi = np.maximum(np.searchsorted(u, u + tol, side="right"), q + 1)
  while (sel := np.flatnonzero(lo > 0)).size and (
      sel := sel[tied(lo[sel] - 1, sel)]).size:
    lo[sel] -= 1
  while (sel := np.flatnonzero(~tied(lo, q))).size:
    lo[sel] += 1
  while (sel := np.flatnonzero(hi < m)).size and (sel := sel[tied(hi[sel], sel)]).size:
    hi[sel] += 1
  while (sel := np.flatnonzero(~tied(hi - 1, q))).size:
    hi[sel] -= 1
  return lo, hi


def _prefix_less_counts(keys: np.ndarray, prefix: np.ndarray, thresholds: np.ndarray,
                        key_max: int) -> np.ndarray:
  """``out[q, c] = #{p < prefix[q] : keys[p] < thresholds[q, c]}`` (keys, thresholds in
  ``[0, key_max]``), by a merge-sort tree built one level at a time.

  ``[0, P)`` is the union, over the set bits ``L`` of ``P``, of the aligned block
  ``(P >> L) - 1`` of length ``2^L``; at level ``L`` the keys are sorted within blocks
  (offset by ``block * (key_max + 1)``, so one global ``searchsorted`` answers all queries).
  """
  n = keys.shape[0]
  levels = max(1, int(np.ceil(np.log2(max(n, 2)))))
  stride = np.int64(key_max) + 1
  padded = np.full(1 << levels, key_max, np.int64)
  padded[:n] = keys
  pos = np.arange(1 << levels, dtype=np.int64)
  prefix = prefix.astype(np.int64)
  out = np.zeros(thresholds.shape, np.int64)
  for lev in range(levels):
    sel = np.flatnonzero((prefix >> lev) & 1)
    if not sel.size:
      continue
    tree = np.sort((pos >> lev) * stride + padded)
    block = (prefix[sel] >> lev) - 1
    found = np.searchsorted(tree, (block * stride)[:, None] + thresholds[sel], side="left")
    out[sel] += found - (block << lev)[:, None]
  return out


def concordance_index(time, event, risk, tied_tol: float = 1e-8):
  r"""Harrell's concordance index, identical to ``sksurv.metrics.concordance_index_censored``.

  A pair ``(i, j)`` is comparable when ``i`` has an event and ``t_i < t_j``, or
  ``t_i = t_j`` and ``j`` is censored (two events at one time are not comparable). Then

  .. math::

    C = \frac{\#\{r_i > r_j\} + \tfrac12 \#\{|r_i - r_j| \le \text{tol}\}}
             {\#\text{comparable pairs}},

  where a pair inside the tolerance counts as a risk tie, not as concordant (exactly
  sksurv's rule, evaluated in the dtype of ``risk``).

  Implementation: for each event, the comparable partners are the patients with a strictly
  later time (a prefix of the time-descending order) plus the censored ones at the same
  time; counts of partners whose risk rank is below the tie window and below its end give
  the concordant and tied pairs. ``O(n log^2 n)`` time, ``O(n)`` memory.

  Args:
    time: ``[n]`` observed times.
    event: ``[n]`` event indicator (bool or 0/1).
    risk: ``[n]`` predicted risk, higher = earlier event.
    tied_tol: risks closer than this (``<=``) are tied.

  Returns:
    ``(cindex, concordant, discordant, tied_risk, tied_time)`` as in sksurv; ``tied_time``
    counts the comparable pairs with equal times (an event and a censoring).

  Raises:
    InputError: fewer than 2 patients, no events, no comparable pair, or bad values.
  """
  time, event = _check_time_event(time, event)
  n = time.shape[0]
  risk = _check_risk(risk, n)
  if not tied_tol >= 0:
    raise InputError(f"tied_tol={tied_tol}, expected >= 0")
  if n < 2:
    raise InputError(f"C-index of {n} patient(s), expected at least 2")
  if not event.any():
    raise InputError(f"C-index of {n} patients without any event, expected at least one event")

  u, rank = np.unique(risk, return_inverse=True)
  rank = rank.reshape(-1)
  m = u.shape[0]
  lo, hi = _tie_windows(u, tied_tol)
  ev = np.flatnonzero(event)
  thresholds = np.stack([lo[rank[ev]], hi[rank[ev]], np.full(ev.size, m)], axis=1)

  # Partners with a strictly later time: a prefix of the time-descending order.
  order = np.argsort(time, kind="stable")[::-1]
  n_later = n - np.searchsorted(time[order[::-1]], time[ev], side="right")
  later = _prefix_less_counts(rank[order], n_later, thresholds, m)

  # Censored partners at the same time: keys (time group, risk rank), sorted.
  _, tgroup = np.unique(time, return_inverse=True)
  tgroup = tgroup.reshape(-1).astype(np.int64)
  stride = np.int64(m) + 1
  cen_keys = np.sort(tgroup[~event] * stride + rank[~event])
  base = (tgroup[ev] * stride)[:, None]
  same = (np.searchsorted(cen_keys, base + thresholds, side="left")
          - np.searchsorted(cen_keys, base, side="left"))

  below = later + same                      # [events, (below lo, below hi, all)]
  concordant = int(below[:, 0].sum())
  tied_risk = int((below[:, 1] - below[:, 0]).sum())
  discordant = int((below[:, 2] - below[:, 1]).sum())
  tied_time = int(same[:, 2].sum())
  pairs = concordant + tied_risk + discordant
  if pairs == 0:
    raise InputError(f"C-index of {n} patients with {ev.size} event(s) but no comparable pair "
                     "(an event followed by a later time), expected at least one")
  cindex = float(concordant + 0.5 * tied_risk) / float(pairs)
  return cindex, concordant, discordant, tied_risk, tied_time


# ---- scikit-survival wrappers ----------------------------------------------------------------

def _surv(time, event):
  from sksurv.util import Surv
  return Surv.from_arrays(event=event, time=np.asarray(time, np.float64))


def _call_sksurv(name: str, fn, *args, **kwargs):
  try:
    return fn(*args, **kwargs)
  except ValueError as e:  # NoComparablePairException is a ValueError too
    raise InputError(f"{name}: {e}") from e


def _check_followup(train_time, time, event, name: str):
  """IPCW metrics estimate the censoring distribution on the training set: it is undefined
  after the last training time, so test events there are an error."""
  late = event & (time > train_time.max())
  if late.any():
    raise InputError(f"{name}: {int(late.sum())} test event(s) after the last training time "
                     f"{float(train_time.max()):g} (first at patient index "
                     f"{int(np.flatnonzero(late)[0])}), expected test events inside the "
                     "training follow-up")


def _eval_times(times, time, train_time=None):
  """Indices of the evaluation times kept, in increasing time order: those with
  ``min(test time) <= t < max(test time)`` (and ``t <= max(train time)`` when given)."""
  times = np.asarray(times, np.float64).reshape(-1)
  if times.size == 0 or not np.all(np.isfinite(times)):
    raise InputError("evaluation times are empty or not finite")
  order = np.argsort(times, kind="stable")
  if np.any(np.diff(times[order]) == 0):
    raise InputError("evaluation times have duplicates, expected distinct times")
  keep = (times >= time.min()) & (times < time.max())
  if train_time is not None:
    keep &= times <= train_time.max()
  order = order[keep[order]]
  return order


def uno_c(train_time, train_event, time, event, risk, tau=None, tied_tol: float = 1e-8
          ) -> float:
  r"""Uno's IPCW concordance index (``sksurv.metrics.concordance_index_ipcw``).

  .. math::

    C_\tau = \frac{\sum_{i,j} \delta_i \hat G(t_i)^{-2} 1[t_i < t_j, t_i < \tau]
                   1[r_i > r_j]}{\sum_{i,j} \delta_i \hat G(t_i)^{-2} 1[t_i < t_j, t_i < \tau]},

  with ``G`` the Kaplan-Meier estimate of the censoring distribution on the *training*
  set (risk ties count 1/2). ``G`` is unknown after the last training time: test events
  there raise `InputError` unless ``tau`` truncates them (only test patients with
  ``t < tau`` enter).

  Args:
    train_time, train_event: training fold (for the censoring distribution).
    time, event: test fold.
    risk: ``[n_test]`` predicted risk, higher = earlier event.
    tau: truncation time, ``None`` for none.
    tied_tol: risks within this distance are tied.

  Returns:
    Uno's C as a float.
  """
  from sksurv.metrics import concordance_index_ipcw
  train_time, train_event = _check_time_event(train_time, train_event, "training")
  time, event = _check_time_event(time, event)
  risk = _check_risk(risk, time.shape[0])
  if not train_event.any() or not event.any():
    raise InputError("Uno's C: no events in the training or test set, expected at least one")
  if tau is None:
    _check_followup(train_time, time, event, "Uno's C (pass tau to truncate)")
  elif not np.isfinite(tau) or tau <= time.min():
    raise InputError(f"Uno's C: tau={tau}, expected a finite time > {float(time.min()):g}")
  out = _call_sksurv("Uno's C", concordance_index_ipcw, _surv(train_time, train_event),
                     _surv(time, event), risk, tau=tau, tied_tol=tied_tol)
  if not np.isfinite(out[0]):
    raise InputError("Uno's C: no comparable pair, expected at least one")
  return float(out[0])


def integrated_brier(train_time, train_event, time, event, surv_fn_values, times) -> float:
  r"""Integrated Brier score (``sksurv.metrics.integrated_brier_score``), lower is better.

  .. math::

    BS(t) = \frac1n \sum_i \Big[\frac{\hat S_i(t)^2 1[t_i \le t, \delta_i]}{\hat G(t_i)}
            + \frac{(1 - \hat S_i(t))^2 1[t_i > t]}{\hat G(t)}\Big], \qquad
    IBS = \frac{1}{t_{max} - t_{min}} \int_{t_{min}}^{t_{max}} BS(t)\, dt
    \;\text{(trapezoid rule)},

  with ``G`` the censoring Kaplan-Meier of the training set.

  Evaluation times are restricted to where the score is defined: times outside
  ``[min test time, max test time)`` or after the last training time are dropped together
  with their columns of ``surv_fn_values`` (not clipped: ``S(t)`` is only known at the
  given ``t``); at least two must remain. Times need not be sorted.

  Args:
    train_time, train_event: training fold.
    time, event: test fold.
    surv_fn_values: ``[n_test, T]`` predicted ``S_i(t)`` at ``times``.
    times: ``[T]`` distinct evaluation times.

  Returns:
    The IBS as a float.
  """
  from sksurv.metrics import integrated_brier_score
  train_time, train_event = _check_time_event(train_time, train_event, "training")
  time, event = _check_time_event(time, event)
  surv = _check_risk(surv_fn_values, time.shape[0], "surv_fn_values", ndim=(2,))
  if surv.shape[1] != np.size(times):
    raise InputError(f"surv_fn_values has {surv.shape[1]} columns, expected one per time "
                     f"({np.size(times)})")
  keep = _eval_times(times, time, train_time)
  if keep.size < 2:
    raise InputError(f"integrated Brier score: {keep.size} evaluation time(s) inside the "
                     f"follow-up [{float(time.min()):g}, {float(time.max()):g}), expected >= 2")
  times = np.asarray(times, np.float64).reshape(-1)[keep]
  return float(_call_sksurv("integrated Brier score", integrated_brier_score,
                            _surv(train_time, train_event), _surv(time, event),
                            surv[:, keep], times))


def cumulative_auc(train_time, train_event, time, event, risk, times, tied_tol: float = 1e-8):
  r"""Cumulative/dynamic AUC (``sksurv.metrics.cumulative_dynamic_auc``).

  .. math::

    AUC(t) = \frac{\sum_{i,j} 1[r_i > r_j]\, 1[t_j > t]\, 1[t_i \le t]\, \delta_i
                   \hat G(t_i)^{-1}}{\sum_i 1[t_i > t] \sum_i 1[t_i \le t]\, \delta_i
                   \hat G(t_i)^{-1}},

  cases are patients with an event by ``t``, controls those still event-free after ``t``;
  ``mean_auc`` weights ``AUC(t)`` by the Kaplan-Meier drop of the test set.

  Evaluation times outside ``[min test time, max test time)`` are dropped (with their
  columns when ``risk`` is 2-D); the kept times are returned.

  Args:
    train_time, train_event: training fold.
    time, event: test fold.
    risk: ``[n_test]`` risk, or ``[n_test, T]`` time-dependent risk (e.g. cumulative hazard
      at ``times``; not survival probabilities).
    times: ``[T]`` distinct evaluation times.
    tied_tol: risks within this distance are tied.

  Returns:
    ``(auc [T'], mean_auc, times [T'])`` with ``T'`` the kept times in increasing order.
  """
  from sksurv.metrics import cumulative_dynamic_auc
  train_time, train_event = _check_time_event(train_time, train_event, "training")
  time, event = _check_time_event(time, event)
  risk = _check_risk(risk, time.shape[0], ndim=(1, 2))
  if risk.ndim == 2 and risk.shape[1] != np.size(times):
    raise InputError(f"risk has {risk.shape[1]} columns, expected one per time "
                     f"({np.size(times)})")
  if not event.any():
    raise InputError("cumulative AUC: no events in the test set, expected at least one")
  _check_followup(train_time, time, event, "cumulative AUC")
  keep = _eval_times(times, time)
  if keep.size == 0:
    raise InputError(f"cumulative AUC: no evaluation time inside the follow-up "
                     f"[{float(time.min()):g}, {float(time.max()):g})")
  times = np.asarray(times, np.float64).reshape(-1)[keep]
  auc, mean_auc = _call_sksurv("cumulative AUC", cumulative_dynamic_auc,
                               _surv(train_time, train_event), _surv(time, event),
                               risk[:, keep] if risk.ndim == 2 else risk, times,
                               tied_tol=tied_tol)
  return np.asarray(auc, np.float64), float(mean_auc), times
