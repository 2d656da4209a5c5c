"""Patient-level stratified K-fold splits, saved to disk and reused.

Folds are stratified on (event, time quartile) so that every fold sees events across the
follow-up range. They are written once per dataset to ``<splits_dir>/<dataset>/``
as ``splits_<k>.csv`` in the MCAT/CLAM layout (an index column, then ``train`` and
``val`` columns of case ids, ragged), and every later run, whatever the method, reads the
same files: methods are compared on identical folds, and folds can be shared with tools
that read that layout.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np
from sklearn.model_selection import StratifiedKFold

from survjax.errors import InputError
from survjax.io import atomic_write_text


def make_folds(time, event, num_folds: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
  """Returns ``[(train_idx, val_idx), ...]`` stratified on event x time quartile."""
  time = np.asarray(time, np.float64)
  event = np.asarray(event, bool)
  quart = np.searchsorted(np.quantile(time, [0.25, 0.5, 0.75]), time, side="right")
  strata = quart * 2 + event.astype(int)
  # Merge strata too small to spread over the folds into their event-only stratum.
  counts = np.bincount(strata, minlength=8)
  strata = np.where(counts[strata] < num_folds, event.astype(int), strata)
  skf = StratifiedKFold(n_splits=num_folds, shuffle=True, random_state=seed)
  return [(np.sort(tr), np.sort(va)) for tr, va in skf.split(np.zeros(len(time)), strata)]


def write_splits_csv(path, train_ids, val_ids) -> None:
  """One ``splits_<k>.csv`` file: index, train, val (ragged, empty cells padded)."""
  n = max(len(train_ids), len(val_ids))
  rows = [["", "train", "val"]]
  for i in range(n):
    rows.append([str(i), train_ids[i] if i < len(train_ids) else "",
                 val_ids[i] if i < len(val_ids) else ""])
  import io
  buf = io.StringIO()
  csv.writer(buf, lineterminator="\n").writerows(rows)
  atomic_write_text(path, buf.getvalue())


def read_splits_csv(path) -> tuple[list[str], list[str]]:
  """Reads a ``splits_<k>.csv`` (CLAM/MCAT layout) into (train ids, val ids)."""
  try:
    with open(path, newline="") as f:
      rows = list(csv.DictReader(f))
  except OSError as e:
    raise InputError(f"cannot read split file ({e.strerror})", path=path) from None
  if not rows or "train" not in rows[0] or "val" not in rows[0]:
    raise InputError("expected columns 'train' and 'val' of case ids", path=path)
  train = [r["train"] for r in rows if r["train"] not in ("", None)]
  val = [r["val"] for r in rows if r["val"] not in ("", None)]
  return train, val


def load_or_make_folds(case_ids, time, event, *, num_folds: int, seed: int,
                       splits_dir: str | os.PathLike | None, dataset: str):
  """Folds as index arrays; read from ``splits_dir/dataset`` if present, else made and saved.

  Raises:
    InputError: a split file names an unknown case, a case appears in both train and val
      of one fold, or the folds do not cover the cohort.
  """
  case_ids = np.asarray(case_ids).astype(str)
  position = {c: i for i, c in enumerate(case_ids)}
  folder = None if splits_dir is None else Path(splits_dir) / dataset
  files = [] if folder is None else [folder / f"splits_{k}.csv" for k in range(num_folds)]
  if files and all(f.exists() for f in files):
    folds = []
    for f in files:
      train, val = read_splits_csv(f)
      for cid in train + val:
        if cid not in position:
          raise InputError("unknown case id in split file, expected a case of the cohort",
                           path=f, case_id=cid)
      both = set(train) & set(val)
      if both:
        raise InputError("case in both train and val", path=f, case_id=sorted(both)[0])
      folds.append((np.sort([position[c] for c in train]), np.sort([position[c] for c in val])))
    covered = np.zeros(len(case_ids), bool)
    for _, va in folds:
      covered[va] = True
    if not covered.all():
      raise InputError("split files do not cover the cohort (delete them to remake)",
                       path=folder, case_id=case_ids[np.argmin(covered)])
    return folds
  folds = make_folds(time, event, num_folds, seed)
  if folder is not None:
    for f, (tr, va) in zip(files, folds):
      write_splits_csv(f, list(case_ids[tr]), list(case_ids[va]))
  return folds
