"""Seconds this process spends compiling, apart from running.

JAX reports each top-level trace, each lowering to StableHLO and each XLA backend compile
(or persistent-cache read, which replaces it) through `jax.monitoring`; a `CompileClock`
sums the ones that happen after it starts, so that a run can report its compile time
apart from its wall time (a second run of a config with the persistent cache on compiles
nothing and pays tracing and lowering only).
"""

from __future__ import annotations

import threading

import jax

# jax._src.dispatch's event names, by the part of compiling they time.
PARTS = {"/jax/core/compile/jaxpr_trace_duration": "trace",
         "/jax/core/compile/jaxpr_to_mlir_module_duration": "lower",
         "/jax/core/compile/backend_compile_duration": "xla"}
_CACHE_HIT = "/jax/compilation_cache/cache_hits"

_lock = threading.Lock()
_totals = {part: 0.0 for part in PARTS.values()}
_totals["xla_calls"] = 0
_totals["persistent_cache_hits"] = 0
_listening = False


def _on_duration(event: str, duration: float, **_) -> None:
  part = PARTS.get(event)
  if part is not None:
    with _lock:
      _totals[part] += duration
      _totals["xla_calls"] += part == "xla"


def _on_event(event: str, **_) -> None:
  if event == _CACHE_HIT:
    with _lock:
      _totals["persistent_cache_hits"] += 1


def _listen() -> None:
  global _listening
  with _lock:
    if _listening:
      return
    _listening = True
  jax.monitoring.register_event_duration_secs_listener(_on_duration)
  jax.monitoring.register_event_listener(_on_event)


class CompileClock:
  """Compile seconds since the clock started: ``trace``, ``lower`` and ``xla`` (backend
  compile or persistent-cache read), their sum ``total``, and the counts ``xla_calls``
  (programs compiled or read) and ``persistent_cache_hits``. Counts every thread of the
  process."""

  def __init__(self):
    _listen()
    self._start = self._now()

  @staticmethod
  def _now() -> dict:
    with _lock:
      return dict(_totals)

  def elapsed(self) -> dict:
    now = self._now()
    out = {k: now[k] - self._start[k] for k in now}
    out["total"] = sum(out[p] for p in PARTS.values())
    return out

  def rounded(self, digits: int = 2) -> dict:
    """`elapsed` with the seconds rounded, for results files."""
    return {k: v if isinstance(v, int) else round(v, digits)
            for k, v in self.elapsed().items()}
