"""The host-side cohort model: patients, outcomes and named modalities.

A `Cohort` holds, per patient, a `case_id`, a follow-up `time`, an `event` flag (True =
death observed, False = censored) and any number of named `Modality` objects. Each
modality carries a per-patient availability flag; a missing modality is represented by
that flag (and zeros in the data), never by NaN.

Modality kinds used across the four methods:

* ``bag``: variable-length bag of feature vectors per patient (pathology patches,
  radiology slices), kept as float16 ``[N_i, D]`` arrays on the host.
* ``tokens``: a tabular block ``[n, C]`` whose columns are grouped into tokens (the six
  genomic families, clinical variables); ``groups`` lists the column indices of each token.
* ``vector``: one long vector ``[n, D]`` per patient (RNA-seq, DNA methylation).
* ``patches``: fixed-size image patches ``[n, M, H, W, C]`` uint8 (impuTMAE's raw WSI
  patches).
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import numpy as np

from survjax.errors import InputError

ModalityKind = Literal["bag", "tokens", "vector", "patches"]


@dataclasses.dataclass
class Modality:
  """One modality of a cohort.

  Attributes:
    kind: "bag", "tokens", "vector" or "patches" (see module docstring).
    available: bool ``[n]``; False where the patient has no data for this modality.
    bags: kind "bag" only: list of ``[N_i, D]`` float16 arrays (``[0, D]`` if missing).
    values: kinds "tokens"/"vector": float32 ``[n, C]``; kind "patches": uint8
      ``[n, M, H, W, C]``. Rows of unavailable patients are zero.
    groups: kind "tokens" only: ``((token_name, column_indices), ...)``.
    columns: optional column names of ``values``.
  """

  kind: ModalityKind
  available: np.ndarray
  bags: list[np.ndarray] | None = None
  values: np.ndarray | None = None
  groups: tuple[tuple[str, tuple[int, ...]], ...] = ()
  columns: tuple[str, ...] = ()

  def __post_init__(self):
    self.available = np.asarray(self.available, dtype=bool)
    if self.kind == "bag":
      if self.bags is None or len(self.bags) != len(self.available):
        raise ValueError("a bag modality needs one bag per patient")
    elif self.kind in ("tokens", "vector", "patches"):
      if self.values is None or len(self.values) != len(self.available):
        raise ValueError(f"a {self.kind} modality needs one row per patient")
      if self.kind == "tokens" and not self.groups:
        self.groups = (("all", tuple(range(self.values.shape[1]))),)
    else:
      raise ValueError(f"unknown modality kind {self.kind!r}")

  @property
  def dim(self) -> int:
    """Feature dimension: D of a bag's vectors, C of a tabular block."""
    if self.kind == "bag":
      return int(self.bags[0].shape[1])
    return int(self.values.shape[1])

  @property
  def group_sizes(self) -> tuple[int, ...]:
    return tuple(len(cols) for _, cols in self.groups)

  def lengths(self) -> np.ndarray:
    """Bag lengths ``[n]`` (0 where missing); ones for non-bag kinds."""
    if self.kind == "bag":
      return np.array([len(b) for b in self.bags], dtype=np.int64)
    return self.available.astype(np.int64)

  def subset(self, idx: np.ndarray) -> "Modality":
    return dataclasses.replace(
        self,
        available=self.available[idx],
        bags=None if self.bags is None else [self.bags[i] for i in idx],
        values=None if self.values is None else self.values[idx],
    )


@dataclasses.dataclass
class Cohort:
  """Patients, outcomes and modalities, all host-side numpy.

  Attributes:
    name: dataset name, written to ``results.json``.
    case_ids: str ``[n]``, unique.
    time: float64 ``[n]``, > 0 (months or any unit, consistently); NaN for a patient
      without a survival label (self-supervised stages may use them; splits, survival
      losses and metrics never see them).
    event: bool ``[n]``; True = event observed (False where unlabelled).
    modalities: name -> `Modality`.
    true_risk: optional known ground truth (synthetic cohorts): scenario name ->
      float ``[n]`` oracle log-hazard, e.g. ``{"full": ..., "missing_genomics": ...}``.
    reconstruction_floor: optional known ground truth (synthetic cohorts): modality ->
      float ``[n]``, each patient's smallest achievable mean squared error of any
      reconstruction of that modality's entries in its raw units (the generator's noise
      around what the latent factors determine; `survjax.data.synthetic`).
  """

  name: str
  case_ids: np.ndarray
  time: np.ndarray
  event: np.ndarray
  modalities: dict[str, Modality]
  true_risk: dict[str, np.ndarray] | None = None
  reconstruction_floor: dict[str, np.ndarray] | None = None

  def __post_init__(self):
    self.case_ids = np.asarray(self.case_ids).astype(str)
    self.time = np.asarray(self.time, dtype=np.float64)
    self.event = np.asarray(self.event).astype(bool)

  def __len__(self) -> int:
    return len(self.case_ids)

  @property
  def labelled(self) -> np.ndarray:
    """Boolean ``[n]``: patients with a survival label (a time, and an event flag)."""
    return ~np.isnan(self.time)

  def subset(self, idx) -> "Cohort":
    idx = np.asarray(idx)
    return Cohort(
        name=self.name,
        case_ids=self.case_ids[idx],
        time=self.time[idx],
        event=self.event[idx],
        modalities={k: m.subset(idx) for k, m in self.modalities.items()},
        true_risk=None if self.true_risk is None else {
            k: v[idx] for k, v in self.true_risk.items()},
        reconstruction_floor=None if self.reconstruction_floor is None else {
            k: v[idx] for k, v in self.reconstruction_floor.items()},
    )

  def complete(self, names=None) -> np.ndarray:
    """Boolean ``[n]``: patients with every modality in ``names`` (default all)."""
    names = list(self.modalities) if names is None else list(names)
    ok = np.ones(len(self), dtype=bool)
    for name in names:
      ok &= self.modalities[name].available
    return ok

  def validate(self, source: str = "cohort") -> None:
    """Raises `InputError` on the first problem found, naming the patient."""
    n = len(self)
    if n == 0:
      raise InputError("no patients", path=source)
    for arr, what in ((self.time, "time"), (self.event, "event")):
      if arr.shape != (n,):
        raise InputError(f"{what} has shape {arr.shape}, expected ({n},)", path=source)
    ids, counts = np.unique(self.case_ids, return_counts=True)
    if (counts > 1).any():
      raise InputError("duplicate case id, expected one entry per case", path=source,
                       case_id=ids[counts > 1][0])
    # Batches carry times in float32: a time past its range would become inf there.
    with np.errstate(over="ignore"):
      in_float32 = np.isfinite(np.asarray(self.time, np.float32))
    bad = self.labelled & (~np.isfinite(self.time) | ~in_float32 | (self.time <= 0))
    if bad.any():
      i = int(np.argmax(bad))
      raise InputError(f"survival time {float(self.time[i])!r}, expected a finite number > 0 "
                       "(within float32's range)", path=source, case_id=self.case_ids[i])
    bad = ~self.labelled & self.event
    if bad.any():
      raise InputError("event without a survival time, expected both or neither",
                       path=source, case_id=self.case_ids[int(np.argmax(bad))])
    if not self.labelled.any():
      raise InputError("no patient has a survival label (time, event)", path=source)
    for name, mod in self.modalities.items():
      if len(mod.available) != n:
        raise InputError(f"modality {name!r} has {len(mod.available)} patients, expected {n}",
                         path=source)
      if mod.kind == "bag":
        dim = None
        for i, bag in enumerate(mod.bags):
          if not mod.available[i]:
            continue
          if bag.ndim != 2 or len(bag) == 0:
            raise InputError(f"{name} bag has shape {bag.shape}, expected [N>0, D]",
                             path=source, case_id=self.case_ids[i])
          dim = bag.shape[1] if dim is None else dim
          if bag.shape[1] != dim:
            raise InputError(f"{name} feature dimension {bag.shape[1]}, expected {dim}",
                             path=source, case_id=self.case_ids[i])
          if not np.isfinite(bag).all():
            raise InputError(f"{name} features contain NaN or inf", path=source,
                             case_id=self.case_ids[i])
      else:
        vals = mod.values[mod.available]
        if vals.size and not np.isfinite(vals.astype(np.float32)).all():
          i = int(np.flatnonzero(mod.available)[
              np.argmax(~np.isfinite(vals.reshape(len(vals), -1)).all(axis=1))])
          raise InputError(f"{name} values contain NaN or inf", path=source,
                           case_id=self.case_ids[i])

  def summary(self) -> str:
    """A few lines for the log: patients, events, censoring, availability, bag lengths."""
    n = len(self)
    lab = self.labelled
    t, e = self.time[lab], self.event[lab]
    unlabelled = f" ({n - int(lab.sum())} without a survival label)" if not lab.all() else ""
    lines = [f"cohort {self.name}: {n} patients{unlabelled}, {int(e.sum())} events, "
             f"censoring {100 * (1 - e.mean()):.1f}%, "
             f"time median {np.median(t):.1f} (range {t.min():.1f}-{t.max():.1f})"]
    for name, mod in self.modalities.items():
      line = f"  {name} ({mod.kind}, dim {mod.dim}): available {int(mod.available.sum())}/{n}"
      if mod.kind == "bag" and mod.available.any():
        q = np.quantile(mod.lengths()[mod.available], [0.0, 0.25, 0.5, 0.75, 1.0])
        line += " | bag length min/q25/median/q75/max " + "/".join(str(int(v)) for v in q)
      elif mod.kind == "tokens":
        sizes = list(mod.group_sizes)
        if len(sizes) <= 12:
          line += f" | {len(sizes)} tokens of sizes {sizes}"
        else:
          line += (f" | {len(sizes)} tokens of sizes min/median/max {min(sizes)}/"
                   f"{int(np.median(sizes))}/{max(sizes)}")
      lines.append(line)
    return "\n".join(lines)
