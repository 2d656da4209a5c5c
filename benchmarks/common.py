"""Shared helpers for the benchmarks: timing, machine facts and JSON output.

Conventions: compile time is measured apart (``jit(f).lower(*args).compile()``), then the
compiled executable is timed over repeats with ``block_until_ready``; we report p50 and
p90 (and min/mean) in milliseconds. Results are plain JSON with the device named.
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def num_cpu_threads() -> int:
  """CPU cores available to this process (XLA:CPU's intra-op pool uses one per core)."""
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # not on Linux
    return os.cpu_count() or 1


def device_info() -> dict[str, Any]:
  """Names the machine: JAX backend and device kind, CPU model, core count, versions."""
  dev = jax.devices()[0]
  cpu_model = platform.processor() or ""
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          cpu_model = line.split(":", 1)[1].strip()
          break
  except OSError:
    pass
  return {
      "device_kind": dev.device_kind,
      "platform": dev.platform,
      "num_devices": jax.device_count(),
      "cpu_model": cpu_model,
      "cpu_threads": num_cpu_threads(),
      "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
      "jax_version": jax.__version__,
      "python": platform.python_version(),
  }


def summarize(times_s: Sequence[float]) -> dict[str, float]:
  """p50/p90/min/mean in milliseconds of a list of wall times in seconds."""
  t = np.asarray(times_s, np.float64) * 1e3
  return {
      "times_ms": [round(float(x), 3) for x in t],
      "p50_ms": float(np.percentile(t, 50)),
      "p90_ms": float(np.percentile(t, 90)),
      "min_ms": float(t.min()),
      "mean_ms": float(t.mean()),
      "repeats": int(t.size),
  }


def compile_timed(fn: Callable, *args, **kwargs):
  """Lowers and compiles ``fn`` (jitted or not) for these arguments.

  Returns:
    ``(compiled, compile_seconds)``; ``compiled`` is called with the same arguments.
  """
  jitted = fn if hasattr(fn, "lower") else jax.jit(fn)
  t0 = time.perf_counter()
  compiled = jitted.lower(*args, **kwargs).compile()
  return compiled, time.perf_counter() - t0


def time_calls(
    fn: Callable, *args, repeats: int, warmup: int = 1,
    make_args: Callable[[int], tuple] | None = None) -> dict[str, float]:
  """Times ``fn(*args)`` (or ``fn(*make_args(i))``) with ``jax.block_until_ready``.

  Args:
    fn: the (compiled) function.
    *args: its arguments, when ``make_args`` is not given.
    repeats: timed calls.
    warmup: untimed calls first.
    make_args: builds the arguments of call ``i`` (e.g. a fresh key), outside the timing.

  Returns:
    `summarize` of the timed calls.
  """
  times = []
  for i in range(warmup + repeats):
    a = make_args(i) if make_args is not None else args
    jax.block_until_ready(a)
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*a))
    if i >= warmup:
      times.append(time.perf_counter() - t0)
  return summarize(times)


def matmul_gflops(n: int = 1024, repeats: int = 20, m: int | None = None) -> float:
  """Measured float32 matmul rate ``2 m n n / t`` (GFLOP/s, p50) of ``[m, n] @ [n, n]``."""
  m = n if m is None else m
  ka, kb = jax.random.split(jax.random.key(0))
  a = jax.random.normal(ka, (m, n), jnp.float32)
  b = jax.random.normal(kb, (n, n), jnp.float32)
  compiled, _ = compile_timed(lambda x, y: x @ y, a, b)
  stats = time_calls(compiled, a, b, repeats=repeats, warmup=2)
  return 2.0 * m * n * n / (stats["p50_ms"] * 1e-3) / 1e9


def write_json(path: str | os.PathLike, obj: Any) -> Path:
  """Writes ``obj`` as indented JSON atomically (temporary file + rename)."""
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
  try:
    with os.fdopen(fd, "w") as f:
      json.dump(obj, f, indent=2, sort_keys=False, default=_json_default)
      f.write("\n")
    os.replace(tmp, path)
  except BaseException:
    Path(tmp).unlink(missing_ok=True)
    raise
  return path


def _json_default(x):
  if isinstance(x, (np.floating, np.integer)):
    return x.item()
  if isinstance(x, (np.ndarray, jax.Array)):
    return np.asarray(x).tolist()
  raise TypeError(f"not JSON serialisable: {type(x)}")
