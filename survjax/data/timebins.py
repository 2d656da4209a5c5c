"""Discretisation of follow-up time into K bins for discrete-time survival models."""

from __future__ import annotations

import numpy as np

from survjax.errors import InputError


def fit_time_bins(time: np.ndarray, event: np.ndarray, num_bins: int) -> np.ndarray:
  """Inner bin edges from quantiles of the *uncensored* times (training fold only).

  As in MUST supp. 6.2 and the MCAT/SurvPath code (``pd.qcut`` on uncensored times):
  the K intervals ``[0, e_1), [e_1, e_2), ..., [e_{K-1}, inf)`` hold equally many
  uncensored training patients; censored patients fall into the bin of their time.

  Returns:
    float64 ``[K-1]`` increasing inner edges.
  """
  t = np.asarray(time, np.float64)[np.asarray(event, bool)]
  if t.size < num_bins:
    raise InputError(f"{t.size} uncensored patients in the training fold, expected at least "
                     f"{num_bins} to fit {num_bins} time bins")
  qs = np.linspace(0.0, 1.0, num_bins + 1)[1:-1]
  return np.quantile(t, qs)


def assign_time_bins(time: np.ndarray, edges: np.ndarray) -> np.ndarray:
  """Bin index ``k = #{edges <= t}`` in ``[0, K-1]`` (MUST: k_i = max{k: tau_k <= t_i})."""
  return np.searchsorted(edges, np.asarray(time, np.float64), side="right").astype(np.int32)
