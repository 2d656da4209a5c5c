"""The persistent XLA compilation cache of the CLI: on by default in
``~/.cache/survjax/xla``, reused by a second run, off with ``compilation_cache_dir=none``.

Every run here has HOME pointed at ``tmp_path``, so nothing is written to the real
``~/.cache``. Counts of cache files are asserted, never timings.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# The smallest CLI run that trains and evaluates: SNN baseline, 40 patients, one fold.
_TINY = [f"--config={REPO}/configs/snn.py:smoke", "--config.data.synthetic.n_patients=40",
         "--config.cv.num_folds=2", "--config.cv.folds=(0,)", "--config.model.epochs=1",
         "--config.eval.latency=False", "--config.progress=False"]


def _run(tmp_path, home, name, *extra):
  env = dict(os.environ, HOME=str(home), JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
  env.pop("SURVJAX_COMPILATION_CACHE_DIR", None)  # the default, not the suite's "none"
  env.pop("XDG_CACHE_HOME", None)
  p = subprocess.run([sys.executable, "-m", "survjax.main", *_TINY, *extra,
                      f"--workdir={tmp_path / name}",
                      f"--config.cv.splits_dir={tmp_path / 'splits'}"],
                     cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert p.returncode == 0, p.stderr[-3000:]
  return json.loads((tmp_path / name / "results.json").read_text())


def _entries(cache):
  return {f.name for f in cache.iterdir() if f.name.endswith("-cache")}


def test_compilation_cache_created_reused_and_off(tmp_path):
  home = tmp_path / "home"
  home.mkdir()
  cache = home / ".cache" / "survjax" / "xla"

  first = _run(tmp_path, home, "run1")
  assert first["timing"]["train_persistent_cache_hits"] == 0   # an empty cache
  assert 0 < first["timing"]["train_compile_s_total"] <= first["timing"]["train_s_total"]
  assert 0 < first["timing"]["eval_compile_s_total"] <= first["timing"]["eval_s_total"]
  assert (0 <= first["timing"]["predict_info_compile_s_total"]
          <= first["timing"]["predict_info_s_total"])
  assert first["timing"]["predict_info_s_total"] > 0
  assert cache.is_dir()
  assert first["config"]["compilation_cache_dir"] == str(cache)  # results.json names it
  entries = _entries(cache)
  assert any(e.startswith("jit_step-") for e in entries), sorted(entries)  # the train step

  # The same config again: every executable comes from the cache, nothing new is written.
  second = _run(tmp_path, home, "run2")
  assert second["config"]["compilation_cache_dir"] == str(cache)
  assert _entries(cache) == entries
  assert second["timing"]["train_persistent_cache_hits"] > 0
  assert second["timing"]["eval_persistent_cache_hits"] > 0
  assert second["scenarios"]["full"]["per_fold"] == first["scenarios"]["full"]["per_fold"]

  # Off: no cache directory (matplotlib may still make its own under HOME).
  home_off = tmp_path / "home_off"
  home_off.mkdir()
  off = _run(tmp_path, home_off, "run3", "--config.compilation_cache_dir=none")
  assert off["config"]["compilation_cache_dir"] == ""
  assert not (home_off / ".cache" / "survjax").exists()


def test_compile_clock_counts_compiling_not_running():
  """A new jitted function's first call is traced, lowered and compiled (each part > 0);
  calling it again compiles nothing, so the clock does not move."""
  import jax
  import jax.numpy as jnp
  from survjax.compile_clock import CompileClock

  f = jax.jit(lambda x: jnp.sin(x) @ x.T + 1.0)
  x = jnp.ones((8, 8))
  clock = CompileClock()
  jax.block_until_ready(f(x))
  first = clock.elapsed()
  assert first["trace"] > 0 and first["lower"] > 0 and first["xla"] > 0, first
  assert first["total"] == first["trace"] + first["lower"] + first["xla"]
  assert first["persistent_cache_hits"] == 0
  assert first["xla_calls"] == 1   # the one program
  for _ in range(3):
    jax.block_until_ready(f(x))
  assert clock.elapsed() == first
