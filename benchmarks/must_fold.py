"""Where one fold of the main job spends its training time, part by part.

    python -m benchmarks.must_fold   # benchmarks/results/must_fold_<platform>.json

Trains fold 0 of `configs/must.py` (``--variant`` for another) as ``--mode=train`` does,
in a fresh process with the persistent compilation cache off, and sums the wall time of
the trainer's parts: the batch epochs of each stage (the first epoch of a stage includes
compiling its step), the inner-validation scoring after each main epoch, the frozen
feature passes of the feature stages (LDM, unimodal heads) and their scanned chunks, and
XLA's backend compile time (`survjax.compile_clock`); ``feature_passes`` counts the passes run
and those reused by a later stage (`Trainer._cache_features`). ``stages`` gives each
stage's epochs and seconds from the fold's ``metrics.jsonl``. This is what issue 19's
"main job in half the time" has to cut: on a quiet machine the step itself is a
minority of a fold.

``matmul`` sets each part's arithmetic beside its time: the products of every jitted
program the part ran (`common.matmul_flops` of the program's jaxpr, times its calls),
the part's time less its compiling, and the rate that gives against
``matmul_rate_gflop_s``, the measured ``[1024, 1024] x [1024, 1024]`` rate: how far a
part is from the time its products alone would take.
"""

from __future__ import annotations

import argparse
import collections
import json
import tempfile
import time
from pathlib import Path

import jax

from benchmarks import common


# The part of `main`'s table each of the trainer's jitted functions runs in, by its name.
_PART_OF = {"step": "batch_epochs", "predict": "validation", "loss": "validation",
            "features": "feature_passes", "chunk": "feature_stage_chunks"}


class _Programs:
  """The trainer module's ``jax`` with ``jit`` recording each call's abstract arguments:
  `flops` then traces every distinct program once more and counts its products."""

  def __init__(self):
    self._calls = collections.Counter()
    self._programs = {}

  def __getattr__(self, name):
    return getattr(jax, name)

  def jit(self, fn, **kw):
    jitted = jax.jit(fn, **kw)
    static = kw.get("static_argnums", ())
    static = (static,) if isinstance(static, int) else tuple(static)

    def abstract(x):
      return (jax.ShapeDtypeStruct(x.shape, x.dtype, weak_type=getattr(x, "weak_type", False))
              if isinstance(x, jax.Array) else x)

    def call(*args):
      # The key costs one flatten per call (the calls are inside the timed parts); the
      # abstract arguments are built for a new program only.
      leaves, tree = jax.tree.flatten([a for i, a in enumerate(args) if i not in static])
      key = (id(jitted), tuple(id(args[i]) for i in static), tree,
             tuple((getattr(x, "shape", x), str(getattr(x, "dtype", ""))) for x in leaves))
      if key not in self._programs:
        self._programs[key] = (fn.__name__, jitted, tuple(
            a if i in static else jax.tree.map(abstract, a) for i, a in enumerate(args)))
      self._calls[key] += 1
      return jitted(*args)
    return call

  def flops(self) -> dict[str, int]:
    out = collections.Counter()
    for key, (name, jitted, abstract) in self._programs.items():
      out[_PART_OF[name]] += self._calls[key] * common.matmul_flops(
          jitted.trace(*abstract).jaxpr)
    return dict(out)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--variant", default="", help="config variant of configs/must.py")
  p.add_argument("--out", default=None)
  args = p.parse_args(argv)

  from configs.must import get_config
  from survjax.compile_clock import CompileClock
  from survjax.data import load_cohort
  from survjax.evaluate.cv import run_cv
  from survjax.models import get_method
  from survjax.train import trainer as trainer_lib

  seconds = collections.Counter()
  calls = collections.Counter()

  compile_clock = CompileClock()

  compiling = collections.Counter()

  def timed(name, fn, block=False):
    def wrapper(*a, **k):
      t0, c0 = time.perf_counter(), compile_clock.elapsed()["total"]
      out = fn(*a, **k)
      if block:
        jax.block_until_ready(out)
      seconds[name] += time.perf_counter() - t0
      compiling[name] += compile_clock.elapsed()["total"] - c0
      calls[name] += 1
      return out
    return wrapper

  programs = _Programs()
  trainer_lib.jax = programs

  cls = trainer_lib.Trainer
  trainers = []
  fit = timed("fit", cls.fit)

  def fit_recording(self, *a, **k):
    trainers.append(self)
    return fit(self, *a, **k)
  cls.fit = fit_recording
  cls._batch_epoch = timed("batch_epochs", cls._batch_epoch)
  cls.validation_score = timed("validation", cls.validation_score)
  cls._cache_features = timed("feature_passes", cls._cache_features, block=True)
  make_chunk = cls._make_chunk
  cls._make_chunk = lambda self, stage, tx: timed("feature_stage_chunks",
                                                  make_chunk(self, stage, tx), block=True)

  c = get_config(args.variant)
  c.cv.folds = (0,)
  c.progress = False
  cohort = load_cohort(c.data)
  with tempfile.TemporaryDirectory() as tmp:
    c.cv.splits_dir = str(Path(tmp) / "splits")
    t0 = time.perf_counter()
    run_cv(get_method(c), cohort, c, Path(tmp) / "run", mode="train")
    total = time.perf_counter() - t0
    stages = collections.defaultdict(lambda: {"epochs": 0, "seconds": 0.0,
                                              "first_epoch_s": None})
    for line in (Path(tmp) / "run" / "fold_0" / "metrics.jsonl").read_text().splitlines():
      r = json.loads(line)
      s = stages[r["stage"]]
      s["epochs"] += 1
      s["seconds"] = round(s["seconds"] + r["seconds"], 3)
      if s["first_epoch_s"] is None:
        s["first_epoch_s"] = r["seconds"]

  compiled = compile_clock.elapsed()
  seconds["xla_compile"], calls["xla_compile"] = compiled["xla"], compiled["xla_calls"]
  parts = {k: {"seconds": round(v, 2), "calls": calls[k]} for k, v in seconds.items()}
  rate = common.matmul_gflops(1024)
  matmul = {}
  for part, flops in programs.flops().items():
    run_s = seconds[part] - compiling[part]
    matmul[part] = {"gflop": round(flops / 1e9, 2), "run_s": round(run_s, 2),
                    "compile_s": round(compiling[part], 2),
                    "gflop_per_s": round(flops / 1e9 / run_s, 1),
                    "share_of_matmul_rate": round(flops / 1e9 / run_s / rate, 3),
                    "at_matmul_rate_s": round(flops / 1e9 / rate, 2)}
  common.emit(args.out or common.default_out("must_fold"), {
      "benchmark": "must_fold",
      "command": "python -m benchmarks.must_fold"
                 + (f" --variant {args.variant}" if args.variant else ""),
      "git": common.git_state(),
      "device": common.device_info(),
      "setup": {"config": f"configs/must.py{':' + args.variant if args.variant else ''}",
                "fold": 0, "patients": len(cohort), "mode": "train",
                "compilation_cache": "off"},
      "total_s": round(total, 2),
      "parts": parts,
      "feature_passes": dict(trainers[0].feature_passes),
      "stages": dict(stages),
      "matmul_rate_gflop_s": round(rate, 1),
      "matmul": matmul,
  })


if __name__ == "__main__":
  main()
