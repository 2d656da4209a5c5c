"""Fixed-shape batches from a host-side `Cohort`.

A batch is a dict pytree of numpy arrays whose shapes depend only on the batch size and
on a bucket size per bag modality, so a run compiles each step once per bucket:

.. code-block:: text

  valid   bool [B]        False for the padding patients that fill the last batch
  index   int32 [B]       patient position in the cohort (-1 for padding)
  labelled bool [B]       False for padding and for patients without a survival label
  time    float32 [B]     follow-up time (1 where unlabelled)
  event   float32 [B]     1 = event observed (0 where unlabelled)
  bin     int32 [B]       discrete time bin (0 when no bins were fitted)
  modalities:
    <bag name>    {"x": float16 [B, N, D], "mask": bool [B, N], "available": bool [B]}
    <tokens/vector name> {"x": float32 [B, C], "available": bool [B]}
    <patches name> {"x": uint8 [B, M, H, W, C], "available": bool [B]}

Bags are padded to the smallest bucket that holds the longest (possibly subsampled) bag
of the batch. The default buckets are powers of 4, which are perfect squares
(64 = 8^2, 256 = 16^2, ... 262144 = 512^2), so TransMIL's PPEG square never needs
wrap-around padding for a full bucket. Training may subsample a fixed number of instances
per bag (``max_instances``), which bounds the shape to one bucket.

Missing modalities are represented by ``available = False`` and a data fill (zeros by
default); a scenario hides a modality for every patient the same way (``hide``), so a
model can never read what a scenario withholds.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator

import numpy as np

from survjax.data.cohort import Cohort

DEFAULT_BUCKETS = tuple(4 ** k for k in range(3, 10))  # 64 ... 262144


@dataclasses.dataclass(frozen=True)
class BatchSpec:
  """Static batch layout.

  Attributes:
    batch_size: patients per batch (a multiple of the device count when sharded).
    buckets: allowed padded bag lengths, increasing.
    max_instances: cap on instances per bag; longer bags are subsampled without
      replacement (randomly when an rng is given, evenly spaced otherwise). None = no cap.
  """

  batch_size: int
  buckets: tuple[int, ...] = DEFAULT_BUCKETS
  max_instances: int | None = None

  def bucket_for(self, length: int) -> int:
    """The padded length for a longest bag of ``length``: the smallest bucket that holds
    it, capped at ``max_instances`` (so a subsampled training batch has exactly one
    shape, ``max_instances``, rather than the next power of 4)."""
    for b in self.buckets:
      if length <= b:
        if self.max_instances is not None and length <= self.max_instances:
          return min(b, self.max_instances)
        return b
    raise ValueError(f"bag of {length} instances exceeds the largest bucket {self.buckets[-1]}; "
                     "add a bucket or set max_instances")


def _take_instances(bag: np.ndarray, cap: int | None, rng) -> np.ndarray:
  if cap is None or len(bag) <= cap:
    return bag
  if rng is None:
    sel = np.linspace(0, len(bag) - 1, cap).round().astype(np.int64)
  else:
    sel = np.sort(rng.choice(len(bag), size=cap, replace=False))
  return bag[sel]


def make_batch(cohort: Cohort, idx, spec: BatchSpec, *, bins: np.ndarray | None = None,
               rng: np.random.Generator | None = None, hide=(), fill: float = 0.0,
               min_bucket: dict[str, int] | None = None) -> dict:
  """Builds one batch for the patients ``idx`` (at most ``spec.batch_size`` of them).

  Args:
    cohort: the cohort.
    idx: patient positions in ``cohort``.
    spec: batch layout.
    bins: optional int ``[len(cohort)]`` discrete time bins.
    rng: numpy generator for instance subsampling (training); None = deterministic.
    hide: modality names withheld from every patient (a missing-modality scenario).
    fill: value written into hidden or missing data (0; tests use NaN to prove a model
      never reads it).
    min_bucket: optional per-modality lower bound on the padded length.
  """
  idx = np.asarray(idx, np.int64)
  b = spec.batch_size
  if len(idx) > b:
    raise ValueError(f"{len(idx)} patients for a batch of {b}")
  k = len(idx)
  out = {
      "valid": np.zeros(b, bool),
      "labelled": np.zeros(b, bool),
      "index": np.full(b, -1, np.int32),
      "time": np.ones(b, np.float32),
      "event": np.zeros(b, np.float32),
      "bin": np.zeros(b, np.int32),
  }
  out["valid"][:k] = True
  out["index"][:k] = idx
  labelled = cohort.labelled[idx]
  out["labelled"][:k] = labelled
  out["time"][:k] = np.where(labelled, cohort.time[idx], 1.0)
  out["event"][:k] = cohort.event[idx] & labelled
  if bins is not None:
    out["bin"][:k] = np.where(labelled, bins[idx], 0)
  mods = {}
  hide = set(hide)
  for name, mod in cohort.modalities.items():
    avail = np.zeros(b, bool)
    avail[:k] = mod.available[idx] & (name not in hide)
    if mod.kind == "bag":
      taken = [_take_instances(mod.bags[i], spec.max_instances, rng) if avail[j] else None
               for j, i in enumerate(idx)]
      longest = max([len(t) for t in taken if t is not None], default=1)
      n = spec.bucket_for(max(longest, (min_bucket or {}).get(name, 1)))
      x = np.full((b, n, mod.dim), fill, np.float16)
      mask = np.zeros((b, n), bool)
      for j, t in enumerate(taken):
        if t is not None:
          x[j, :len(t)] = t
          mask[j, :len(t)] = True
      mods[name] = {"x": x, "mask": mask, "available": avail}
    else:
      vals = mod.values
      x = np.full((b,) + vals.shape[1:], fill, vals.dtype if vals.dtype == np.uint8 else np.float32)
      x[:k][avail[:k]] = vals[idx][avail[:k]]
      mods[name] = {"x": x, "available": avail}
  out["modalities"] = mods
  return out


def iterate_batches(cohort: Cohort, idx, spec: BatchSpec, *, bins=None,
                    shuffle_rng: np.random.Generator | None = None,
                    sample_rng: np.random.Generator | None = None, hide=(), fill=0.0,
                    drop_last: bool = False, sort_by_length: bool = False) -> Iterator[dict]:
  """Yields the batches covering ``idx`` (shuffled when ``shuffle_rng`` is given).

  ``sort_by_length`` groups bags of similar length (evaluation), so fewer batches need a
  large bucket; results are matched back to patients through ``batch["index"]``. Only the
  bags a batch shows count: the order (and so which patients share a batch and its random
  draws) never depends on a hidden modality.
  """
  idx = np.asarray(idx, np.int64)
  if shuffle_rng is not None:
    idx = shuffle_rng.permutation(idx)
  elif sort_by_length:
    longest = np.zeros(len(idx), np.int64)
    for name, mod in cohort.modalities.items():
      if mod.kind == "bag" and name not in hide:
        longest = np.maximum(longest, mod.lengths()[idx])
    idx = idx[np.argsort(longest, kind="stable")]
  stop = len(idx) - (len(idx) % spec.batch_size if drop_last else 0)
  for start in range(0, stop, spec.batch_size):
    chunk = idx[start:start + spec.batch_size]
    if len(chunk):
      yield make_batch(cohort, chunk, spec, bins=bins, rng=sample_rng, hide=hide, fill=fill)


def num_batches(n: int, batch_size: int, drop_last: bool = False) -> int:
  return n // batch_size if drop_last else -(-n // batch_size)
