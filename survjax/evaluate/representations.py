"""Statistics of learned per-patient representations over a set of held-out patients.

The decomposition diagnostics of the MUST paper (Sec. 4.4) are cosine similarities taken
per patient on the raw vectors. A part every patient shares (a common offset, which a
LayerNorm bias or a constant solution of a squared-error constraint produces) adds the
same vector to all of them, and pushes those cosines towards 1 (aligned parts) or towards
the offsets' own angle whatever the patient-level parts do. Two statistics separate what
varies between patients from the offset:

    spread(x)          = sum_d Var_i(x_id) / mean_i ||x_i||^2                    in [0, 1]
    cos_centred(a, b)  = mean_i cos(a_i - a_bar, b_i - b_bar),   a_bar = mean_i a_i

``spread`` is the share of the mean square that differs between patients (0: every
patient has the same vector); ``cos_centred`` is the paper's cosine after removing each
vector's mean over the patients, i.e. how the patient-level variations of ``a`` and ``b``
align. Both use the held-out patients' own mean (no labels are involved). The paper's
own, uncentred ``cos(a, b) = mean_i cos(a_i, b_i)`` is reported beside them.
"""

from __future__ import annotations

import numpy as np

__all__ = ["between_patient_spread", "centred_cosine", "mean_cosine",
           "representation_diagnostics"]


def between_patient_spread(x: np.ndarray) -> float:
  """``sum_d Var_i(x_id) / mean_i ||x_i||^2`` of ``x [N, D]`` (0 for an all-zero ``x``)."""
  x = np.asarray(x, np.float64)
  mean_sq = float(np.mean(np.sum(x * x, axis=-1)))
  if mean_sq == 0.0:
    return 0.0
  return float(np.sum(np.var(x, axis=0)) / mean_sq)


def mean_cosine(a: np.ndarray, b: np.ndarray, eps: float = 1e-12) -> float:
  """``mean_i cos(a_i, b_i)`` over the rows of ``a, b [N, D]``.

  A row with a zero vector contributes 0 (its cosine is undefined).
  """
  a = np.asarray(a, np.float64)
  b = np.asarray(b, np.float64)
  if a.shape != b.shape or a.ndim != 2:
    raise ValueError(f"cosines need two [N, D] arrays of one shape, got {a.shape}, "
                     f"{b.shape}")
  norms = np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)
  return float(np.mean(np.sum(a * b, axis=-1) / np.maximum(norms, eps)))


def centred_cosine(a: np.ndarray, b: np.ndarray, eps: float = 1e-12) -> float:
  """``mean_i cos(a_i - mean(a), b_i - mean(b))`` over the rows of ``a, b [N, D]``."""
  a = np.asarray(a, np.float64)
  b = np.asarray(b, np.float64)
  return mean_cosine(a - a.mean(axis=0), b - b.mean(axis=0), eps)


def representation_diagnostics(reps: dict[str, np.ndarray],
                               pairs: tuple[tuple[str, str], ...]) -> dict[str, float]:
  """``cos(<a>,<b>)`` and ``cos_centred(<a>,<b>)`` of every pair, then ``spread(<name>)``
  of every representation.

  Args:
    reps: ``{name: [N, D]}`` over the same N patients.
    pairs: names of ``reps`` whose cosines are reported.
  """
  out = {f"cos({a},{b})": mean_cosine(reps[a], reps[b]) for a, b in pairs}
  out.update({f"cos_centred({a},{b})": centred_cosine(reps[a], reps[b]) for a, b in pairs})
  out.update({f"spread({k})": between_patient_spread(v) for k, v in reps.items()})
  return out
