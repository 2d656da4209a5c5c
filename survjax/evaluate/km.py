r"""Kaplan-Meier curves of a median risk split and their log-rank test.

Patients are split at the median predicted risk (high risk: ``risk > median``), each group
gets a Kaplan-Meier curve (``sksurv.nonparametric.kaplan_meier_estimator``) and the two
are compared with the log-rank test (``sksurv.compare.compare_survival``):

.. math::

  \chi^2 = \frac{\big(\sum_t (O_t - E_t)\big)^2}{\sum_t V_t}, \quad
  E_t = n_t^{low} \frac{d_t}{n_t}, \quad
  V_t = d_t \frac{n_t^{low}}{n_t} \Big(1 - \frac{n_t^{low}}{n_t}\Big) \frac{n_t - d_t}{n_t - 1},

summed over distinct event times ``t`` (``d_t`` events among ``n_t`` at risk,
``O_t`` events of the low group), with one degree of freedom.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from survjax.errors import InputError
from survjax.evaluate.metrics import _check_risk, _check_time_event
from survjax.io import atomic_save_figure


def _km(time: np.ndarray, event: np.ndarray):
  if time.size == 0:
    return np.zeros(0), np.zeros(0)
  from sksurv.nonparametric import kaplan_meier_estimator
  t, s = kaplan_meier_estimator(event, time.astype(np.float64))
  return np.asarray(t, np.float64), np.asarray(s, np.float64)


def median_split_logrank(time, event, risk) -> dict:
  """Median split of predicted risk, Kaplan-Meier per group, log-rank test.

  Args:
    time: ``[n]`` observed times.
    event: ``[n]`` event indicator (bool or 0/1).
    risk: ``[n]`` predicted risk, higher = earlier event.

  Returns:
    ``dict(threshold, n_high, n_low, chi2, p_value, curves)`` with ``threshold`` the median
    risk, high risk ``risk > threshold`` (so ties at the median go to the low group), and
    ``curves = {"high": (t, S(t)), "low": (t, S(t))}`` the Kaplan-Meier steps at each
    distinct time of the group (``S`` just after ``t``; empty arrays for an empty group).
    A degenerate split (all patients in one group, e.g. all risks equal), no event, or a
    zero log-rank variance gives ``chi2 = p_value = NaN``: there is nothing to test.
  """
  time, event = _check_time_event(time, event)
  risk = _check_risk(risk, time.shape[0])
  if time.size == 0:
    raise InputError("Kaplan-Meier split of 0 patients, expected at least one")
  threshold = float(np.median(risk))
  return split_logrank(time, event, risk > threshold, threshold=threshold)


def split_logrank(time, event, high, threshold: float | None = None) -> dict:
  """Kaplan-Meier per group and the log-rank test of a given split ``high`` (bool ``[n]``),
  e.g. risk groups defined by a cut-off fitted elsewhere (a training cohort). Returns the
  dict of `median_split_logrank` (``threshold`` as given)."""
  time, event = _check_time_event(time, event)
  high = np.asarray(high, bool)
  if high.shape != time.shape:
    raise InputError(f"split has shape {high.shape}, expected {time.shape}")
  n_high = int(high.sum())
  n_low = int(time.size - n_high)
  chi2 = p_value = float("nan")
  if n_high and n_low and event.any():
    from sksurv.compare import compare_survival
    from sksurv.util import Surv
    try:
      chi2, p_value = compare_survival(Surv.from_arrays(event, time.astype(np.float64)), high)
      chi2, p_value = float(chi2), float(p_value)
    except np.linalg.LinAlgError:  # zero variance: no time with an event and >1 at risk
      pass
  return {"threshold": threshold, "n_high": n_high, "n_low": n_low, "chi2": chi2,
          "p_value": p_value,
          "curves": {"high": _km(time[high], event[high]), "low": _km(time[~high], event[~high])},
          "bands": {"high": _km_band(time[high], event[high]),
                    "low": _km_band(time[~high], event[~high])},
          "groups": {"high": (time[high], event[high]), "low": (time[~high], event[~high])}}


def _km_band(time: np.ndarray, event: np.ndarray):
  """Pointwise 95 % band of the Kaplan-Meier curve (log-log, Greenwood), at its times."""
  if time.size == 0 or not event.any():
    return None
  from sksurv.nonparametric import kaplan_meier_estimator
  try:
    _, _, ci = kaplan_meier_estimator(event, time.astype(np.float64), conf_type="log-log")
  except Exception:  # a band is not defined (e.g. a single patient)
    return None
  return np.nan_to_num(np.asarray(ci[0]), nan=0.0), np.nan_to_num(np.asarray(ci[1]), nan=1.0)


def number_at_risk(time: np.ndarray, ticks) -> list[int]:
  """Patients still at risk (``time >= t``) at each tick."""
  time = np.asarray(time, np.float64)
  return [int(np.sum(time >= t)) for t in ticks]


def plot_km(result: dict, path, title: str | None = None) -> Path:
  """Plots the two Kaplan-Meier curves of `median_split_logrank` to a PNG.

  Written atomically (`survjax.io.atomic_save_figure`) with matplotlib's Agg
  canvas (no display, no pyplot state). The log-rank p-value is in the legend title.

  Args:
    result: the dict of `median_split_logrank`.
    path: output ``.png`` path; its directory is created.
    title: figure title.

  Returns:
    ``path`` as a ``Path``.
  """
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  path = Path(path)
  fig = Figure(figsize=(5.5, 4.6), dpi=120)
  FigureCanvasAgg(fig)
  ax = fig.add_subplot()
  fig.subplots_adjust(bottom=0.28)
  for name, color in (("high", "tab:red"), ("low", "tab:blue")):
    t, s = result["curves"][name]
    n = result[f"n_{name}"]
    if n == 0:
      continue
    ax.step(np.r_[0.0, t], np.r_[1.0, s], where="post", color=color,
            label=f"{name} risk (n={n})")
    band = result.get("bands", {}).get(name)
    if band is not None:   # 95 % pointwise band (log-log)
      ax.fill_between(np.r_[0.0, t], np.r_[1.0, band[0]], np.r_[1.0, band[1]], step="post",
                      color=color, alpha=0.15, linewidth=0)
  p = result["p_value"]
  p_text = "n/a (degenerate split)" if not np.isfinite(p) else f"{p:.3g}"
  ax.legend(title=f"log-rank p = {p_text}", loc="best", frameon=False)
  ax.set_xlabel("time")
  ax.set_ylabel("survival probability")
  ax.set_ylim(-0.02, 1.02)
  ax.set_xlim(left=0.0)
  ax.set_title(title if title is not None else f"median risk split, log-rank p = {p_text}",
               fontsize=9)
  groups = result.get("groups")
  if groups:   # number-at-risk table under the axis, at the x ticks
    ticks = [x for x in ax.get_xticks() if x >= 0 and x <= ax.get_xlim()[1]]
    ax.set_xticks(ticks)
    ax.text(0.0, -0.2, "at risk", transform=ax.transAxes, ha="right", va="top", fontsize=7)
    for row, (name, color) in enumerate((("high", "tab:red"), ("low", "tab:blue"))):
      counts = number_at_risk(groups[name][0], ticks)
      for x, c in zip(ticks, counts):
        ax.text(x, -0.27 - 0.07 * row, str(c), transform=ax.get_xaxis_transform(),
                ha="center", va="top", fontsize=7, color=color)
  else:
    fig.tight_layout()
  return atomic_save_figure(fig, path)
