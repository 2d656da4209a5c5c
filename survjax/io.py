"""Atomic writes: a killed run never leaves a half-written result behind."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path


def atomic_write_bytes(path, data: bytes) -> None:
  """Writes to a temporary file in the same directory, fsyncs, then renames over ``path``."""
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise


def atomic_write_text(path, text: str) -> None:
  atomic_write_bytes(path, text.encode())


def atomic_save_figure(fig, path, **savefig_kw) -> Path:
  """Saves a matplotlib figure as PNG through `atomic_write_bytes`; returns the path."""
  import io
  buf = io.BytesIO()
  fig.savefig(buf, format="png", **savefig_kw)
  atomic_write_bytes(path, buf.getvalue())
  return Path(path)


def atomic_write_json(path, obj) -> None:
  atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_default) + "\n")


def _default(x):
  import numpy as np
  if isinstance(x, np.generic):
    return x.item()
  if isinstance(x, np.ndarray):
    return x.tolist()
  raise TypeError(f"not JSON serialisable: {type(x)}")
