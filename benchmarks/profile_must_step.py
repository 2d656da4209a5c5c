"""Where MUST's training step spends its time on the CPU: forward against backward, by op.

    python -m benchmarks.profile_must_step   # benchmarks/results/profile_must_step_<platform>.json

MUST's main stage (`configs/must.py`, eq. 16) on a training batch of the main job's shape
(32 patients, bags capped at ``train.max_instances`` = 32 patches of 1024 features):

* ``times``: p50 of the loss alone (forward), of ``jax.value_and_grad`` of it, and of the
  whole step (value_and_grad + the optimiser update, as the trainer runs it), in
  alternating rounds (the machine is shared);
* ``xla_cost``: XLA's FLOP and byte counts of the forward and of value_and_grad;
* ``trace``: one `jax.profiler` trace of value_and_grad, its XLA:CPU thunks summed by
  kind (the fusion kind in the thunk's name: ``ynn_fusion`` = XNNPACK matmuls, ``dot``,
  ``pad_slice_fusion``, ...) and by direction (the HLO's ``op_name`` says ``transpose(..)``
  for the backward pass and ``jvp(..)`` for the forward it linearises), and the slowest
  thunks with their shapes and op names.

Timings on a shared machine are inflated by its load (recorded); the shares are what to
read.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time

import jax
import numpy as np
from flax import nnx

from benchmarks import common


def _p50(fn, *args, repeats: int) -> float:
  times = []
  for i in range(repeats + 2):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    if i >= 2:
      times.append(time.perf_counter() - t0)
  return 1e3 * float(np.median(times))


def _hlo_ops(text: str) -> dict[str, tuple[str, str]]:
  """HLO instruction name -> (op_name metadata, result shape)."""
  out = {}
  for line in text.splitlines():
    m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = (\S+)", line)
    if m:
      op = re.search(r'op_name="([^"]*)"', line)
      out[m.group(1)] = (op.group(1) if op else "", m.group(2))
  return out


def _trace_thunks(fn, args, calls: int) -> list[tuple[str, float]]:
  """(thunk name, microseconds) of every XLA:CPU thunk run in ``calls`` calls of ``fn``."""
  with tempfile.TemporaryDirectory() as d:
    with jax.profiler.trace(d, create_perfetto_trace=True):
      for _ in range(calls):
        jax.block_until_ready(fn(*args))
    files = glob.glob(f"{d}/**/*.trace.json.gz", recursive=True)
    if not files:
      return []
    with gzip.open(files[0]) as f:
      data = json.load(f)
  events = data["traceEvents"] if isinstance(data, dict) else data
  return [(e["name"], float(e["dur"])) for e in events
          if e.get("ph") == "X" and "dur" in e and not e["name"].startswith(("$", "Pjit"))
          and "::" not in e["name"]]


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--out", default=None)
  p.add_argument("--batch", type=int, default=32, help="patients per step")
  p.add_argument("--bag", type=int, default=32, help="patches per bag")
  p.add_argument("--repeats", type=int, default=10)
  p.add_argument("--rounds", type=int, default=2)
  p.add_argument("--variant", default="", help="configs/must.py variant")
  args = p.parse_args(argv)
  args.out = args.out or common.default_out("profile_must_step")
  from configs import must as must_config
  from survjax.models import get_method

  info_dev = common.device_info()
  config = must_config.get_config(args.variant)
  method = get_method(config)
  stage = next(s for s in method.stages() if s.name == "main")
  info, batch = common.synthetic_batch(method, args.batch, args.bag, 1024)
  model = method.build(info, nnx.Rngs(0))
  graphdef, trainable, rest = nnx.split(model, stage.trainable, ...)
  opt_state = stage.optimizer.init(trainable)
  batch = jax.device_put(batch)
  key = jax.random.key(0)

  def loss_of(tr, rest, batch, key):
    return stage.loss_fn(nnx.merge(graphdef, tr, rest), batch, key)[0]

  fwd, fwd_compile = common.compile_timed(jax.jit(loss_of), trainable, rest, batch, key)
  vg, vg_compile = common.compile_timed(jax.jit(jax.value_and_grad(loss_of)), trainable, rest,
                                        batch, key)
  step = common.make_train_step(stage, graphdef)
  step_c, step_compile = common.compile_timed(step, trainable, opt_state, rest, batch, key)
  common.log(f"compiled: forward {fwd_compile:.1f} s, value_and_grad {vg_compile:.1f} s, "
             f"step {step_compile:.1f} s")

  rounds = []
  for _ in range(args.rounds):
    r = {"load_average_1min": os.getloadavg()[0],
         "forward_ms": _p50(fwd, trainable, rest, batch, key, repeats=args.repeats),
         "value_and_grad_ms": _p50(vg, trainable, rest, batch, key, repeats=args.repeats)}
    ts = []
    for i in range(args.repeats + 1):
      t0 = time.perf_counter()
      trainable, opt_state, loss = step_c(trainable, opt_state, rest, batch, jax.random.key(i))
      jax.block_until_ready(loss)
      if i:
        ts.append(time.perf_counter() - t0)
    r["step_ms"] = 1e3 * float(np.median(ts))
    r["backward_over_forward"] = (r["value_and_grad_ms"] - r["forward_ms"]) / r["forward_ms"]
    rounds.append(r)
    common.log(f"forward {r['forward_ms']:.0f} ms, value_and_grad {r['value_and_grad_ms']:.0f} "
               f"ms, step {r['step_ms']:.0f} ms (load {r['load_average_1min']:.1f})")

  cost = {}
  for name, c in (("forward", fwd), ("value_and_grad", vg)):
    ca = c.cost_analysis()
    ca = ca[0] if isinstance(ca, (list, tuple)) else (ca or {})
    cost[name] = {"gflop": ca.get("flops", 0.0) / 1e9,
                  "bytes_accessed_gb": ca.get("bytes accessed", 0.0) / 1e9}

  calls = 5
  ops = _hlo_ops(vg.as_text())
  thunks = _trace_thunks(vg, (trainable, rest, batch, key), calls)
  by_kind, by_dir, by_name = (collections.Counter() for _ in range(3))
  for name, us in thunks:
    op, _ = ops.get(name, ("", ""))
    by_kind[re.sub(r"\.\d+$", "", name)] += us / calls / 1e3
    by_dir["backward (transpose)" if "transpose(" in op else
           ("forward (jvp)" if op else "unattributed")] += us / calls / 1e3
    by_name[name] += us / calls / 1e3
  total = sum(by_kind.values())
  trace = {
      "calls": calls, "total_ms": total,
      "by_direction_ms": dict(by_dir.most_common()),
      "by_kind_ms": dict(by_kind.most_common(20)),
      "slowest": [{"thunk": n, "ms": ms, "shape": ops.get(n, ("", ""))[1],
                   "op_name": ops.get(n, ("", ""))[0]} for n, ms in by_name.most_common(25)],
      "note": "per value_and_grad call; thunks run on 2 threads may overlap, so the sum can "
              "exceed the wall time; forward (jvp) is the forward pass as linearised for the "
              "gradient, not the plain forward of times.forward_ms",
  }
  result = {
      "benchmark": "profile_must_step",
      "command": " ".join(["python", "-m", "benchmarks.profile_must_step",
                           *(argv if argv is not None else sys.argv[1:])]),
      "git": common.git_state(), "device": info_dev,
      "setup": {"config": "configs/must.py" + (f":{args.variant}" if args.variant else ""),
                "stage": "main", "batch": args.batch, "bag": args.bag, "patch_dim": 1024},
      "compile_s": {"forward": fwd_compile, "value_and_grad": vg_compile, "step": step_compile},
      "times": rounds, "xla_cost": cost, "trace": trace,
      "load_average_1min_end": os.getloadavg()[0],
  }
  common.emit(args.out, result)


if __name__ == "__main__":
  sys.exit(main())
