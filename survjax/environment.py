"""What a result depends on besides the code and the config: package versions and the
machine's instruction set.

Two runs of one commit and config give the same bits only when both match. XLA:CPU picks
its kernels by instruction set and release, and numpy picks its SIMD loops at import by
instruction set; training amplifies their last-bit differences into different C-indexes
(the synthetic cohort itself is made immune: `survjax.data.synthetic._censor`).
``scripts/bootstrap.sh`` installs the versions in ``constraints.txt``; every
``results.json`` records `environment()`, so that a rerun can be compared knowing whether
it should match bit for bit.
"""

from __future__ import annotations

import importlib.metadata
import platform

import jax

PACKAGES = ("jax", "jaxlib", "flax", "optax", "numpy", "scipy", "scikit-survival", "ott-jax",
            "orbax-checkpoint", "tensorflow-datasets")
# /proc/cpuinfo flags that change which kernels XLA:CPU and numpy run.
CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "amx_tile")


def _version(name: str) -> str | None:
  try:
    return importlib.metadata.version(name)
  except importlib.metadata.PackageNotFoundError:
    return None


def cpu() -> tuple[str, list[str]]:
  """The CPU's model name (``/proc/cpuinfo``, else `platform.processor`, else "") and
  which of `CPU_FLAGS` it has."""
  model, flags = platform.processor() or "", set()
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        key, _, value = line.partition(":")
        if key.strip() == "model name" and value.strip():
          model = value.strip()
        elif key.strip() == "flags":
          flags = set(value.split())
        if flags and model:
          break
  except OSError:
    pass
  return model, [f for f in CPU_FLAGS if f in flags]


def _numpy_simd() -> list[str] | None:
  """numpy's SIMD dispatch targets that this CPU runs (its private but stable tables)."""
  try:
    from numpy._core._multiarray_umath import __cpu_dispatch__, __cpu_features__
  except ImportError:
    return None
  return [t for t in __cpu_dispatch__ if __cpu_features__.get(t)]


def environment() -> dict:
  """``{"python", "packages": {name: version}, "cpu_model", "cpu_flags", "numpy_simd",
  "devices"}`` of this process."""
  model, flags = cpu()
  dev = jax.devices()[0]
  return {"python": platform.python_version(),
          "packages": {name: _version(name) for name in PACKAGES},
          "cpu_model": model or platform.machine(), "cpu_flags": flags, "numpy_simd": _numpy_simd(),
          "devices": f"{dev.platform}:{dev.device_kind} x{jax.device_count()}"}
