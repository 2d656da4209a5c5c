"""Shared helpers for the benchmarks: timing, machine facts and JSON output.

Conventions: compile time is measured apart (``jit(f).lower(*args).compile()``), then the
compiled executable is timed over repeats with ``block_until_ready``; we report p50 and
p90 (and min/mean) in milliseconds. Results are plain JSON with the device named.
"""

from __future__ import annotations

import json
import math
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from survjax import environment


def num_cpu_threads() -> int:
  """CPU cores available to this process (XLA:CPU's intra-op pool uses one per core)."""
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # not on Linux
    return os.cpu_count() or 1


def device_info() -> dict[str, Any]:
  """Names the machine: JAX backend and device kind, CPU model, core count, versions."""
  dev = jax.devices()[0]
  cpu_model = environment.cpu()[0]
  return {
      "device_kind": dev.device_kind,
      "platform": dev.platform,
      "num_devices": jax.device_count(),
      "cpu_model": cpu_model,
      "cpu_threads": num_cpu_threads(),
      "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
      "jax_version": jax.__version__,
      "python": platform.python_version(),
      "xla_flags": os.environ.get("XLA_FLAGS", ""),
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


def matmul_gflops(n: int = 1024, repeats: int = 20, m: int | None = None,
                  dtype: str = "float32", chain: int = 1) -> float:
  """Measured matmul rate ``2 m n n / t`` (GFLOP/s, p50) of ``[m, n] @ [n, n]``: float32
  operands, or with ``dtype="bfloat16"`` bfloat16 operands and float32 accumulation (what
  the ``precision="bfloat16"`` option of the samplers and MIL forwards computes). With
  ``chain > 1``, one call runs ``chain`` dependent products (``x <- x @ b``), so a small
  shape's rate is its kernel's, not the call's dispatch."""
  m = n if m is None else m
  ka, kb = jax.random.split(jax.random.key(0))
  a = jax.random.normal(ka, (m, n), jnp.float32).astype(dtype)
  b = (jax.random.normal(kb, (n, n), jnp.float32) / n ** 0.5).astype(dtype)

  def products(x, y):
    for _ in range(chain):
      x = jnp.matmul(x, y, preferred_element_type=jnp.float32).astype(dtype)
    return x

  compiled, _ = compile_timed(products, a, b)
  stats = time_calls(compiled, a, b, repeats=repeats, warmup=2)
  return 2.0 * m * n * n * chain / (stats["p50_ms"] * 1e-3) / 1e9


def matmul_flops(jaxpr) -> int:
  """Floating-point operations of the products in a (closed) jaxpr: ``2 * size(out) * K``
  for each ``dot_general`` (``K`` its contracted size), a ``scan`` body's times its
  ``length``, the costliest branch of a ``cond``; a ``while`` body (trip count unknown)
  once. Work no output depends on is dropped first (as XLA drops it). Other operations
  are not counted: at a matmul rate, this is the time the products alone would take
  (XLA's own cost analysis counts a loop body once)."""
  from jax._src.interpreters import partial_eval as pe  # the DCE jit itself runs
  jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
  jaxpr, _ = pe.dce_jaxpr(jaxpr, [True] * len(jaxpr.outvars))
  return _products(jaxpr)


def _products(jaxpr) -> int:
  jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
  total = 0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == "dot_general":
      (contract, _), _ = eqn.params["dimension_numbers"]
      lhs, out = eqn.invars[0].aval, eqn.outvars[0].aval
      total += 2 * math.prod(out.shape) * math.prod(lhs.shape[d] for d in contract)
      continue
    if name == "cond":
      total += max(_products(b) for b in eqn.params["branches"])
      continue
    times = eqn.params["length"] if name == "scan" else 1
    for value in eqn.params.values():
      for sub in value if isinstance(value, (tuple, list)) else (value,):
        if hasattr(sub, "eqns") or hasattr(getattr(sub, "jaxpr", None), "eqns"):
          total += times * _products(sub)
  return total


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


# ---- output, logging, subprocesses ---------------------------------------------------------


def default_out(name: str) -> str:
  """``benchmarks/results/<name>_<platform>.json`` (platform of the default JAX backend)."""
  return str(Path("benchmarks") / "results" / f"{name}_{jax.default_backend()}.json")


def log(*args) -> None:
  """Progress lines go to stderr, so that stdout carries only the result JSON."""
  print(*args, file=sys.stderr, flush=True)


def emit(path: str | os.PathLike, obj: Any) -> Path:
  """Writes the result JSON atomically and prints it to stdout."""
  out = write_json(path, obj)
  json.dump(obj, sys.stdout, indent=2, default=_json_default)
  sys.stdout.write("\n")
  sys.stdout.flush()
  log(f"wrote {out}")
  return out


def torch_python(arg: str | None) -> str | None:
  """The Python that has torch: ``--torch-python`` or ``$SURVJAX_TORCH_PYTHON``."""
  return arg or os.environ.get("SURVJAX_TORCH_PYTHON") or None


def run_json_subprocess(cmd: Sequence[str], timeout: float,
                        env: dict | None = None) -> tuple[dict | None, str | None]:
  """Runs ``cmd`` and parses the last stdout line as JSON; returns ``(result, reason)``.

  ``reason`` says why there is no result (non-zero exit with the last stderr line,
  killed by a signal, e.g. out of memory, or a timeout).
  """
  import subprocess
  try:
    proc = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout, env=env)
  except subprocess.TimeoutExpired:
    return None, f"timed out after {timeout:.0f} s"
  if proc.returncode != 0:
    tail = proc.stderr.strip().splitlines()[-1:] or ["(no stderr)"]
    how = (f"killed by signal {-proc.returncode}" if proc.returncode < 0
           else f"exited {proc.returncode}")
    return None, f"{how}: {tail[0][:300]}"
  lines = proc.stdout.strip().splitlines()
  if not lines:
    return None, "no output"
  return json.loads(lines[-1]), None


def git_state() -> dict[str, Any]:
  """Commit of this checkout and its modified tracked files (results may depend on them)."""
  import subprocess
  root = Path(__file__).resolve().parent.parent

  def git(*a):
    return subprocess.run(["git", *a], cwd=root, capture_output=True, text=True,
                          timeout=20).stdout
  try:
    head = git("rev-parse", "HEAD").strip()
    dirty = [line[3:] for line in git("status", "--porcelain", "--untracked-files=no")
             .splitlines() if line.strip()]
  except (OSError, subprocess.SubprocessError):
    return {}
  return {"commit": head, "modified_tracked_files": dirty}


# ---- host memory ---------------------------------------------------------------------------

MEMORY_METHOD = (
    "Linux /proc/self/status: VmHWM (peak resident set) and VmRSS of a fresh process per "
    "measurement; ru_maxrss where /proc is missing. baseline = peak RSS after imports and "
    "model construction, before the input exists; peak_over_baseline = peak - baseline "
    "(input, compilation and forward temporaries). 'run' figures are read after resetting "
    "the peak (echo 5 > /proc/self/clear_refs) once compilation and warm-up are done.")


def memory_mb() -> dict[str, float]:
  """Current (``rss_mb``) and peak (``peak_mb``) resident memory of this process, in MiB."""
  out = {}
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith(("VmHWM:", "VmRSS:")):
          key = "peak_mb" if line.startswith("VmHWM") else "rss_mb"
          out[key] = int(line.split()[1]) / 1024.0
  except OSError:
    pass
  if "peak_mb" not in out:
    import resource
    out["peak_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
  return out


def reset_peak_memory() -> bool:
  """Resets VmHWM to the current RSS (Linux >= 4.0); False where that is not possible."""
  try:
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")
    return True
  except OSError:
    return False


def loglog_slope(sizes: Sequence[float], values: Sequence[float]) -> float | None:
  """Least-squares slope of ``log(value)`` on ``log(size)`` (1 = linear growth)."""
  pts = [(math.log(s), math.log(v)) for s, v in zip(sizes, values) if v and v > 0]
  if len(pts) < 2:
    return None
  x, y = np.array(pts).T
  return float(np.polyfit(x, y, 1)[0])


# ---- training steps ------------------------------------------------------------------------


def make_train_step(stage, graphdef):
  """The trainer's step for ``stage``: one jitted, donating pure function.

  ``step(trainable, opt_state, rest, batch, key) -> (trainable', opt_state', loss)``:
  value_and_grad of ``stage.loss_fn`` over the trainable state, then the stage's optax
  update, jitted over ``(graphdef, state)`` with ``trainable`` and ``opt_state`` donated
  (as `survjax.train.trainer.Trainer`).
  """
  import optax
  from flax import nnx
  tx = stage.optimizer

  def step(trainable, opt_state, rest, batch, key):
    def loss_of(tr):
      return stage.loss_fn(nnx.merge(graphdef, tr, rest), batch, key)

    (loss, _), grads = jax.value_and_grad(loss_of, has_aux=True)(trainable)
    updates, opt_state = tx.update(grads, opt_state, trainable)
    return optax.apply_updates(trainable, updates), opt_state, loss

  return jax.jit(step, donate_argnums=(0, 1))


def time_train_steps(compiled, trainable, opt_state, rest, batch, *, repeats: int,
                     warmup: int = 1, max_seconds: float | None = None):
  """Times a donating step, feeding its state back; returns ``(summary, trainable, opt)``.

  Stops early (after at least 2 timed steps) once ``max_seconds`` have been spent.
  """
  times, t_start = [], time.perf_counter()
  for i in range(warmup + repeats):
    key = jax.random.key(i)
    t0 = time.perf_counter()
    trainable, opt_state, loss = compiled(trainable, opt_state, rest, batch, key)
    jax.block_until_ready((trainable, opt_state, loss))
    if i >= warmup:
      times.append(time.perf_counter() - t0)
    if (max_seconds is not None and len(times) >= 2
        and time.perf_counter() - t_start > max_seconds):
      break
  stats = summarize(times)
  stats["last_loss"] = float(loss)
  return stats, trainable, opt_state


def synthetic_batch(method, batch_size: int, bag: int, patch_dim: int, seed: int = 0):
  """A training batch (`make_batch` layout) of ``batch_size`` patients with ``bag``-patch bags.

  Everything but the pathology bags comes from a small embedded synthetic cohort (so the
  genomics tokens, times, events and bins are those the trainer sees); each patient's
  pathology bag is replaced by ``bag`` random float16 patches of width ``patch_dim``, all
  real (mask True). Returns ``(info, batch)`` with ``info`` as `survjax.method.cohort_info`.
  """
  from survjax.data.batching import BatchSpec, make_batch
  from survjax.data.synthetic import SyntheticSpec, make_synthetic_cohort
  from survjax.method import cohort_info
  n = max(8, batch_size)
  cohort = make_synthetic_cohort(SyntheticSpec(n_patients=n, seed=seed, patch_dim=patch_dim,
                                               bag_min=8, bag_max=16))
  info = cohort_info(cohort, method.modalities)
  bins = np.arange(n, dtype=np.int32) % max(int(getattr(method, "num_bins", 1)), 1)
  batch = make_batch(cohort, np.arange(batch_size), BatchSpec(batch_size=batch_size,
                                                              buckets=(16,)), bins=bins)
  rng = np.random.default_rng(seed)
  if "pathology" in batch["modalities"]:
    batch["modalities"]["pathology"]["x"] = rng.standard_normal(
        (batch_size, bag, patch_dim), dtype=np.float32).astype(np.float16)
    batch["modalities"]["pathology"]["mask"] = np.ones((batch_size, bag), bool)
  return info, batch
