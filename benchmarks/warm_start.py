"""A config run twice, cold then warm: compile time apart from the rest, by phase.

    python -m benchmarks.warm_start   # benchmarks/results/warm_start_<platform>.json

Runs ``python -m survjax.main --config=configs/must.py:smoke`` (``--config`` for another)
twice in fresh processes sharing an empty persistent compilation cache (a temporary
directory): the first run compiles everything, the second reads its executables from the
cache. Each run's ``results.json`` gives the wall time of training, evaluation and the
predict information of each fold (what ``--mode=predict`` needs: training-patient
cut-offs, out-of-fold statistics, calibration) and the compile time inside them
(`survjax.compile_clock`: tracing, lowering, XLA backend compile or cache read), summed
over folds; ``outside_s`` is the rest of the process's wall time (start-up, the cohort,
reports and plots). Issue 19's goal: the smoke variant's cold
compile at most 60 s on the 2-core CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import common


def _run(config: str, workdir: Path, cache: Path, splits: Path) -> dict:
  cmd = [sys.executable, "-m", "survjax.main", f"--config={config}", f"--workdir={workdir}",
         "--config.progress=False", f"--config.compilation_cache_dir={cache}",
         f"--config.cv.splits_dir={splits}"]
  t0 = time.perf_counter()
  p = subprocess.run(cmd, capture_output=True, text=True,
                     env=dict(os.environ, PYTHONUNBUFFERED="1"))
  wall = time.perf_counter() - t0
  if p.returncode:
    raise SystemExit(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stderr[-3000:]}")
  t = json.loads((workdir / "results.json").read_text())["timing"]
  out = {"wall_s": round(wall, 2)}
  for part in ("train", "eval", "predict_info"):
    out[part] = {"s": t[f"{part}_s_total"], "compile_s": t[f"{part}_compile_s_total"],
                 "persistent_cache_hits": t[f"{part}_persistent_cache_hits"]}
  parts = [out[part] for part in ("train", "eval", "predict_info")]
  out["compile_s"] = round(sum(p["compile_s"] for p in parts), 2)
  out["outside_s"] = round(wall - sum(p["s"] for p in parts), 2)
  return out


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--config", default="configs/must.py:smoke")
  p.add_argument("--out", default=None)
  args = p.parse_args(argv)
  with tempfile.TemporaryDirectory() as tmp:
    tmp = Path(tmp)
    runs = {}
    for name in ("cold", "warm"):
      common.log(f"{name} run of {args.config}")
      runs[name] = _run(args.config, tmp / name, tmp / "xla", tmp / "splits")
      common.log(f"  {runs[name]}")
  common.emit(args.out or common.default_out("warm_start"), {
      "benchmark": "warm_start",
      "command": "python -m benchmarks.warm_start"
                 + (f" --config {args.config}" if args.config != "configs/must.py:smoke" else ""),
      "git": common.git_state(),
      "device": common.device_info(),
      "setup": {"config": args.config, "compilation_cache": "an empty temporary directory"},
      "runs": runs,
      "goal": {"cold_compile_s_at_most": 60.0},
  })


if __name__ == "__main__":
  main()
