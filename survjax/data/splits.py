"""Patient-level stratified K-fold splits, saved to disk and reused.

Folds are stratified on (event, time quartile) so that every fold sees events across the
follow-up range. They are written once per dataset to ``<splits_dir>/<dataset>/``
as ``splits_<k>.csv`` in the MCAT/CLAM layout (an index column, then ``train`` and
``val`` columns of case ids, ragged), and every later run, whatever the method, reads the
same files: methods are compared on identical folds, and folds can be shared with tools
that read that layout.

Beside them, ``cohort.json`` records the fingerprint of the cohort the folds were made for
(`cohort_fingerprint`: case ids, times, events) and the number of folds and seed. Folds
are refused for a cohort with another fingerprint or a run asking for another partition
(one "bad input" line naming both), so a changed generator, data file or ``cv.num_folds``
never silently reuses or overwrites old folds. Split files a user drops in without ``cohort.json``
impose their folds as they are. Only labelled patients are split.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np
from sklearn.model_selection import StratifiedKFold

from survjax.errors import InputError
from survjax.io import atomic_write_text


def cohort_fingerprint(case_ids, time, event) -> str:
  """12 hex digits of a SHA-256 over the sorted (case id, time, event) triples."""
  rows = sorted(zip(np.asarray(case_ids).astype(str).tolist(),
                    np.asarray(time, np.float64).tolist(), np.asarray(event, bool).tolist()))
  text = "\n".join(f"{c}\t{t!r}\t{int(e)}" for c, t, e in rows)
  return hashlib.sha256(text.encode()).hexdigest()[:12]


def folds_fingerprint(case_ids, folds) -> str:
  """12 hex digits of a SHA-256 over each fold's sorted held-out case ids."""
  case_ids = np.asarray(case_ids).astype(str)
  text = "\n".join(",".join(sorted(case_ids[va].tolist())) for _, va in folds)
  return hashlib.sha256(text.encode()).hexdigest()[:12]


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
  with warnings.catch_warnings():
    # "The least populated class in y has only m members": with fewer events than folds
    # some fold gets none, which `check_folds_have_events` reports as an input error.
    warnings.filterwarnings("ignore", message="The least populated class", category=UserWarning)
    return [(np.sort(tr), np.sort(va)) for tr, va in skf.split(np.zeros(len(time)), strata)]


def check_folds_have_events(folds, event, *, where, time=None,
                            num_folds: int | None = None) -> None:
  """Every fold needs an event among its training and its held-out patients.

  A C-index of held-out patients without an event (or without a comparable pair) is
  undefined, and a fold trained without an event learns nothing, so such a fold is an
  input error, raised before any split file or result is written.

  Args:
    folds: ``[(train_idx, val_idx), ...]``.
    event: bool ``[n]``.
    where: ``k -> path`` of fold ``k``'s split file (named in the error).
    time: optional float ``[n]``; if given, each test fold must also hold a comparable
      pair (Harrell's C-index is defined).
    num_folds: the configured number of folds (for the hint).

  Raises:
    InputError: naming the fold, its split file and the counts.
  """
  event = np.asarray(event, bool)
  time = None if time is None else np.asarray(time, np.float64)
  for k, (tr, va) in enumerate(folds):
    for part, idx in (("test (val)", va), ("training", tr)):
      if not event[idx].any():
        total = int(event.sum())
        hint = ("the cohort has no events at all, expected some uncensored patients"
                if total == 0 else
                f"the cohort has {total} events for {num_folds or len(folds)} folds, "
                "expected at least one per fold (set cv.num_folds lower)")
        raise InputError(f"fold {k} has no events among its {len(idx)} {part} patients "
                         f"(all censored); {hint}", path=where(k))
    if time is not None and not has_comparable_pair(time[va], event[va]):
      raise InputError(f"fold {k}: its {len(va)} test (val) patients have no comparable pair "
                       "(no one outlives an observed event), so its C-index is undefined; "
                       "expected more patients per fold (fewer folds, cv.num_folds)",
                       path=where(k))


def has_comparable_pair(time, event) -> bool:
  """Harrell's definition: an event at t_i and someone else with t_j > t_i (or a
  censoring at t_j = t_i)."""
  if not event.any():
    return False
  t0 = time[event].min()
  return bool((time > t0).any() or ((time == t0) & ~event).any())


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
  except (UnicodeDecodeError, csv.Error) as e:
    raise InputError(f"cannot read split file ({e}), expected a UTF-8 CSV", path=path) from None
  if not rows or "train" not in rows[0] or "val" not in rows[0]:
    raise InputError("expected columns 'train' and 'val' of case ids", path=path)
  train = [r["train"] for r in rows if r["train"] not in ("", None)]
  val = [r["val"] for r in rows if r["val"] not in ("", None)]
  return train, val


def load_or_make_folds(case_ids, time, event, *, num_folds: int, seed: int,
                       splits_dir: str | os.PathLike | None, dataset: str, check=None):
  """Folds as index arrays; read from ``splits_dir/dataset`` if present, else made and saved.

  New folds are written to a temporary folder that is then renamed into place, so a
  killed run never leaves a partial set, and existing split files are never overwritten.

  Raises:
    InputError: the folder's ``cohort.json`` records another cohort fingerprint, or
      another number of folds or split seed; the folder holds split files other than
      ``splits_0 .. splits_{num_folds - 1}``.
    InputError: a split file names an unknown case, a case appears twice in a column, in
      both train and val of one fold or in two folds' val, the folds do not cover the
      cohort, or a fold has no events among its training or its held-out patients
      (checked before any split file is written).
    InputError: from ``check(folds)``, the caller's own check of the folds, also called
      before any split file is written.
  """
  case_ids = np.asarray(case_ids).astype(str)
  position = {c: i for i, c in enumerate(case_ids)}
  folder = None if splits_dir is None else Path(splits_dir) / dataset
  files = [] if folder is None else [folder / f"splits_{k}.csv" for k in range(num_folds)]
  fingerprint = cohort_fingerprint(case_ids, time, event)
  if folder is not None:
    _check_folder(folder, files, fingerprint, num_folds, seed)
  if files and all(f.exists() for f in files):
    folds = []
    for f in files:
      train, val = read_splits_csv(f)
      for cid in train + val:
        if cid not in position:
          raise InputError("unknown case id in split file, expected a case of the cohort",
                           path=f, case_id=cid)
      for part, ids in (("train", train), ("val", val)):
        if len(set(ids)) < len(ids):
          twice = next(c for c in ids if ids.count(c) > 1)
          raise InputError(f"case listed twice in the {part} column", path=f, case_id=twice)
      both = set(train) & set(val)
      if both:
        raise InputError("case in both train and val", path=f, case_id=sorted(both)[0])
      folds.append((np.sort([position[c] for c in train]), np.sort([position[c] for c in val])))
    covered = np.zeros(len(case_ids), bool)
    for f, (_, va) in zip(files, folds):
      if covered[va].any():   # held out twice: two out-of-fold risks for one patient
        raise InputError("case held out (val) in two split files, expected each case in "
                         "exactly one fold's val column", path=f,
                         case_id=case_ids[va[np.argmax(covered[va])]])
      covered[va] = True
    if not covered.all():
      raise InputError("split files do not cover the cohort (delete them to remake)",
                       path=folder, case_id=case_ids[np.argmin(covered)])
    check_folds_have_events(folds, event, where=lambda k: files[k], time=time,
                            num_folds=num_folds)
    if check is not None:
      check(folds)
    return folds
  # New folds: errors name the split file that would have been written (it is not).
  where = ((lambda k: f"{files[k]} (not written)") if files else
           (lambda k: f"cv fold {k} (cv.splits_dir unset)"))
  if len(case_ids) < 2 * num_folds:
    raise InputError(f"{len(case_ids)} patients for {num_folds} folds, expected at least "
                     f"{2 * num_folds} (cv.num_folds)", path=where(0))
  try:
    folds = make_folds(time, event, num_folds, seed)
  except ValueError as e:  # sklearn: too few patients per stratum for the folds
    raise InputError(f"cannot split {len(case_ids)} patients into {num_folds} folds "
                     f"({e}), expected more patients or fewer folds (cv.num_folds)",
                     path=where(0)) from None
  # Before writing.
  check_folds_have_events(folds, event, where=where, time=time, num_folds=num_folds)
  if check is not None:
    check(folds)
  if folder is not None:
    _write_folder(folder, files, folds, case_ids, json.dumps(
        {"fingerprint": fingerprint, "n_patients": int(len(case_ids)),
         "num_folds": num_folds, "seed": seed}, indent=1) + "\n")
  return folds


def _check_folder(folder: Path, files, fingerprint: str, num_folds: int, seed: int) -> None:
  """Refuses a split folder made for another cohort or partition (see `load_or_make_folds`)."""
  record = folder / "cohort.json"
  if record.exists():
    try:
      made = json.loads(record.read_text())
    except (ValueError, OSError) as e:
      raise InputError(f"cannot read the split folder's record ({e}), expected the JSON "
                       "this run wrote: delete the folder to remake it", path=record) from None
    if not isinstance(made, dict):
      raise InputError("expected a JSON object (delete the folder to remake it)", path=record)
    if made.get("fingerprint") != fingerprint:
      raise InputError(f"split files were made for cohort {made.get('fingerprint')}, this "
                       f"cohort is {fingerprint} (its case ids, times or events differ); "
                       "expected folds for this cohort: delete the folder or set "
                       "cv.splits_dir", path=record)
    if (made.get("num_folds", num_folds), made.get("seed", seed)) != (num_folds, seed):
      raise InputError(f"split files here are {made.get('num_folds')} folds drawn with seed "
                       f"{made.get('seed')}, this run asks for cv.num_folds={num_folds}, "
                       f"cv.seed={seed}; expected the same partition (runs compared on a "
                       "cohort share its folds): set those, or another cv.splits_dir",
                       path=record)
  present = sorted(p.name for p in folder.glob("splits_*.csv")) if folder.is_dir() else []
  if present and present != sorted(f.name for f in files):
    raise InputError(f"the folder holds {len(present)} split files ({', '.join(present[:6])}"
                     f"{', ...' if len(present) > 6 else ''}), this run asks for "
                     f"cv.num_folds={num_folds} (splits_0 to splits_{num_folds - 1}); "
                     "expected the same number of folds, or another cv.splits_dir",
                     path=folder)


def _write_folder(folder: Path, files, folds, case_ids, record: str) -> None:
  """Writes the split files and ``cohort.json`` into a temporary sibling folder, then
  renames it into place. Another process that got there first (every process of a
  multi-process run makes the same folds) keeps its copy."""
  folder.parent.mkdir(parents=True, exist_ok=True)
  tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.tmp-"))
  try:
    for f, (tr, va) in zip(files, folds):
      write_splits_csv(tmp / f.name, list(case_ids[tr]), list(case_ids[va]))
    atomic_write_text(tmp / "cohort.json", record)
    try:
      if folder.is_dir() and not any(folder.iterdir()):
        folder.rmdir()   # an empty folder (made by hand, or left behind) is taken over
      os.rename(tmp, folder)
    except OSError:
      if not all(f.exists() for f in files):
        raise
  finally:
    if tmp.exists():
      shutil.rmtree(tmp, ignore_errors=True)


def inner_validation(train_idx, time, event, fraction: float, seed: int):
  """Carves a stratified validation part out of a fold's training patients.

  Stratified on event x (time above/below the median of the training patients): in
  each stratum a ``fraction`` of the patients, drawn with ``seed``, become validation.

  Returns:
    ``(fit_idx, val_idx)``, sorted; ``val_idx`` empty when ``fraction`` is 0.
  """
  train_idx = np.sort(np.asarray(train_idx))
  if fraction <= 0:
    return train_idx, train_idx[:0]
  if not 0 < fraction < 1:
    raise InputError(f"validation fraction {fraction} is out of range, expected 0 <= f < 1",
                     path="config.cv.val_fraction")
  t = np.asarray(time, np.float64)[train_idx]
  e = np.asarray(event, bool)[train_idx]
  strata = 2 * e.astype(int) + (t > np.median(t)).astype(int)
  rng = np.random.default_rng([seed, 104729])
  val = []
  for s in np.unique(strata):
    members = train_idx[strata == s]
    take = int(round(fraction * len(members)))
    val.extend(rng.permutation(members)[:take].tolist())
  val = np.sort(np.asarray(val, dtype=train_idx.dtype))
  return np.setdiff1d(train_idx, val), val
