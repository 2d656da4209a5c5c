"""A run directory holds one configuration's run, and one process at a time.

At its first start a run directory records, in ``run.json``, the training-relevant part of
the config (everything but where output and logs go, the evaluation settings, the device
mesh and the folds subset) and the fingerprints of its cohort and splits. A later start
(a resume, ``--mode=eval``, more folds) under a different one is refused with the
differing keys named, unless the user asks for ``--restart``, which moves the old run
aside (``<workdir>.old-<time>``), never deletes it. A directory that holds nothing
trained yet (a start that stopped on bad input, or before its first checkpoint) takes the
new configuration instead. ``run.lock`` holds the process id of
the run in progress; a second run on the same directory stops with one line naming it,
and a lock whose process is gone is taken over.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from pathlib import Path

from survjax.errors import InputError
from survjax.io import atomic_write_json

# Config keys that do not change what training computes.
_NOT_TRAINING = ("progress", "tensorboard_dir", "compilation_cache_dir", "eval.", "mesh.",
                 "cv.folds", "train.checkpoint_every_s", "tune.")


def _flatten(d: dict, prefix: str = "") -> dict:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = json.loads(json.dumps(v, default=str))
  return out


def training_config(config) -> dict:
  """The config's training-relevant keys, flattened (``"model.stage2.lr": 2e-4``)."""
  flat = _flatten(config.to_dict() if hasattr(config, "to_dict") else dict(config))
  return {k: v for k, v in flat.items()
          if not any(k == p or (p.endswith(".") and k.startswith(p)) for p in _NOT_TRAINING)}


def check_writable(workdir: Path) -> None:
  try:
    workdir.mkdir(parents=True, exist_ok=True)
    probe = workdir / f".write-test-{os.getpid()}"
    probe.write_text("")
    probe.unlink()
  except OSError as e:
    raise InputError(f"cannot write the run directory ({e.strerror}), expected a writable "
                     "--workdir", path=workdir) from None


def check_creatable(path: Path, flag: str) -> None:
  """That ``path`` is a directory that exists or can be created, without creating it (an
  output folder is made when its files are written, so a run that stops on bad input
  leaves none)."""
  path = Path(path).absolute()
  ancestor = path
  while not ancestor.exists():
    ancestor = ancestor.parent
  if not ancestor.is_dir() or not os.access(ancestor, os.W_OK | os.X_OK):
    raise InputError(f"cannot write there ({ancestor} is not a writable directory), expected "
                     f"a writable {flag}", path=path)


def restart(workdir: Path) -> Path | None:
  """Moves an existing run directory aside; returns where it went."""
  if not workdir.exists() or not any(workdir.iterdir()):
    return None
  aside = workdir.with_name(f"{workdir.name}.old-{time.strftime('%Y%m%d-%H%M%S')}")
  workdir.rename(aside)
  return aside


def _opt_in_default(key: str, value) -> bool:
  """Whether ``key`` is a synthetic-cohort knob (``data.synthetic.*``) at its
  `SyntheticSpec` default. New knobs are opt-in (tests hash the default cohorts), so a
  run recorded before a knob existed made the same cohort as the default does now."""
  if not key.startswith("data.synthetic."):
    return False
  import dataclasses
  from survjax.data.synthetic import SyntheticSpec
  defaults = {f.name: f.default for f in dataclasses.fields(SyntheticSpec)}
  name = key[len("data.synthetic."):]
  return name in defaults and json.loads(json.dumps(defaults[name])) == value


def check_or_record(workdir: Path, config, fingerprints: dict) -> None:
  """Records the run's identity at its first start; refuses a different one later."""
  path = workdir / "run.json"
  current = {"training_config": training_config(config), **fingerprints}

  def record():
    atomic_write_json(path, {**current, "created": time.strftime("%Y-%m-%d %H:%M:%S")})
  if not path.exists():
    return record()
  recorded = json.loads(path.read_text())
  diffs = []
  for key in ("cohort_fingerprint", "splits_fingerprint"):
    if recorded.get(key) != current[key]:
      diffs.append(f"{key} {recorded.get(key)} -> {current[key]}")
  old, new = recorded.get("training_config", {}), current["training_config"]
  for key in sorted(set(old) | set(new)):
    if key not in old and _opt_in_default(key, new.get(key)):
      continue   # a generator knob added since, at the default that changes nothing
    if old.get(key, "<absent>") != new.get(key, "<absent>"):
      diffs.append(f"{key} {old.get(key, '<absent>')} -> {new.get(key, '<absent>')}")
  if diffs and not holds_work(workdir):
    # A start that stopped on bad input (or before its first checkpoint) left run.json
    # and nothing trained: the corrected command starts here, nothing can mix.
    return record()
  if diffs:
    shown = "; ".join(diffs[:4]) + (f"; and {len(diffs) - 4} more" if len(diffs) > 4 else "")
    raise InputError(f"the run here was made with another configuration ({shown}); expected "
                     "the same one to resume or re-evaluate, or --restart to start afresh "
                     "(the old run is moved aside)", path=workdir)


def holds_work(workdir: Path) -> bool:
  """Whether anything trained or evaluated lives in ``workdir``: a saved checkpoint step,
  a fold's result, the run's results or a tune."""
  if any((workdir / name).exists() for name in ("results.json", "tune.json")):
    return True
  for path in workdir.rglob("*"):
    if path.name == "result.json" or (path.parent.name == "checkpoints" and path.is_dir()
                                      and path.name.isdigit()):
      return True
  return False


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


@contextlib.contextmanager
def locked(workdir: Path):
  """Holds ``workdir/run.lock`` for the block; a live holder is an `InputError`."""
  lock = workdir / "run.lock"
  me = {"pid": os.getpid(), "host": socket.gethostname()}
  for _ in range(2):
    try:
      fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
      try:
        holder = json.loads(lock.read_text() or "{}")
      except (OSError, ValueError):
        holder = {}
      pid, host = holder.get("pid"), holder.get("host")
      if isinstance(pid, int) and host == me["host"] and not _alive(pid):
        lock.unlink(missing_ok=True)   # stale: its process is gone
        continue
      if not holder:   # being written by a process that has just taken it
        time.sleep(0.2)
        holder = json.loads(lock.read_text() or "{}") if lock.exists() else {}
      raise InputError(f"another run (process {holder.get('pid', '?')} on "
                       f"{holder.get('host', '?')}) is using this run directory; expected one "
                       "run per directory at a time (remove run.lock if that process is gone)",
                       path=workdir) from None
    with os.fdopen(fd, "w") as f:
      f.write(json.dumps(me))
    break
  try:
    yield
  finally:
    lock.unlink(missing_ok=True)
