"""Data-parallel scaling of a training step over 1, 2, 4 and 8 devices.

    PYTHONPATH=. python -m benchmarks.scaling                      # MUST stage 2
    PYTHONPATH=. python -m benchmarks.scaling --quick --out /tmp/s.json   # ABMIL, ~30 s

The step is the trainer's (`benchmarks.common.make_train_step`: value_and_grad of the
stage loss, the stage's optax update, one ``jax.jit`` over ``(graphdef, state)`` with the
trainable and optimiser states donated), on a 1-D ``"data"`` mesh of the first ``d``
devices (`survjax.train.sharding.make_mesh`): parameters and optimiser state replicated
(`replicate`), the batch split along its patient axis (`shard_batch`); XLA inserts the
gradient all-reduce. Model: MUST's stage-2 ("main") step by default, or the gated-ABMIL
baseline (``--model abmil``, the ``--quick`` default: a small model that compiles in a
second or two). Bags of ``--bag`` patches (default 256, MUST's ``train.max_instances``)
of ``--patch-dim`` features, every patch real.

* strong scaling: global batch fixed (``--global-batch``, default 32, MUST's batch);
  ``speedup = t_1 / t_d``, ``efficiency = speedup / d``;
* weak scaling: per-device batch fixed (``--per-device-batch``, default 4);
  ``efficiency = t_1 / t_d``.

On CPU the devices are XLA's fake host devices (``jax_num_cpu_devices``, set before any
JAX call; ``--cpu-devices``, default 8): they share the machine's cores, so CPU numbers
measure the cost of partitioning and collectives, not a speed-up. The script runs
unchanged on GPUs/TPUs, where ``d`` real devices are used (counts above the device count
are skipped).
"""

from __future__ import annotations

import argparse
import os
import sys
import time


def _parse(argv):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--out", default=None,
                 help="JSON path (default benchmarks/results/scaling_<platform>.json)")
  p.add_argument("--quick", action="store_true", help="small ABMIL model, tiny batch")
  p.add_argument("--model", choices=("must", "abmil"), default=None,
                 help="training step to scale (default must, quick abmil)")
  p.add_argument("--devices", default="1,2,4,8", help="comma-separated device counts")
  p.add_argument("--cpu-devices", type=int, default=8, help="fake CPU devices (CPU only)")
  p.add_argument("--global-batch", type=int, default=None, help="strong scaling (32, quick 8)")
  p.add_argument("--per-device-batch", type=int, default=None, help="weak scaling (4, quick 1)")
  p.add_argument("--bag", type=int, default=None, help="patches per bag (256, quick 64)")
  p.add_argument("--patch-dim", type=int, default=None, help="patch features (1024, quick 64)")
  p.add_argument("--repeats", type=int, default=None, help="timed steps (10, quick 5)")
  p.add_argument("--max-seconds", type=float, default=None,
                 help="time budget of the timed steps of one configuration (30, quick 5)")
  return p.parse_args(argv)


def main(argv=None):
  args = _parse(argv)
  import jax
  cpu_devices_note = None
  try:  # before any JAX computation; only the CPU backend reads it
    jax.config.update("jax_num_cpu_devices", args.cpu_devices)
  except RuntimeError as e:  # the backend already started in this process
    cpu_devices_note = f"jax_num_cpu_devices not applied: {e}"
  import numpy as np
  from flax import nnx

  from benchmarks import common
  from survjax.models import get_method
  from survjax.train import sharding

  q = args.quick
  model_name = args.model or ("abmil" if q else "must")
  global_batch = args.global_batch or (8 if q else 32)
  per_device = args.per_device_batch or (1 if q else 4)
  bag = args.bag or (64 if q else 256)
  patch_dim = args.patch_dim or (64 if q else 1024)
  repeats = args.repeats or (5 if q else 10)
  max_seconds = args.max_seconds or (5.0 if q else 30.0)
  out_path = args.out or common.default_out("scaling")

  info = common.device_info()
  n_dev = jax.device_count()
  counts = [int(x) for x in args.devices.split(",") if x]
  used = [d for d in counts if d <= n_dev]
  common.log(f"device: {info['device_kind']} x {n_dev} ({info['platform']}), "
             f"{info['cpu_model']}, {info['cpu_threads']} CPU threads, load "
             f"{info['load_average_1min']}; device counts {used}")

  if model_name == "must":
    from configs import must as cfg_module
  else:
    from configs import abmil as cfg_module
  config = cfg_module.get_config("smoke" if q else "")
  method = get_method(config)
  stage = next((s for s in method.stages() if s.name == "main"), method.stages()[0])
  binfo, _ = common.synthetic_batch(method, 1, 16, patch_dim)
  model = method.build(binfo, nnx.Rngs(0))
  graphdef, trainable0, rest0 = nnx.split(model, stage.trainable, ...)
  host_trainable = jax.tree.map(np.asarray, trainable0)
  host_rest = jax.tree.map(np.asarray, rest0)
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(host_trainable))
  step = common.make_train_step(stage, graphdef)
  measured: dict[tuple[int, int], dict] = {}

  def measure(d: int, gb: int) -> dict:
    if (d, gb) in measured:
      return measured[(d, gb)]
    mesh = sharding.make_mesh(d)
    trainable = sharding.replicate(host_trainable, mesh)
    rest = sharding.replicate(host_rest, mesh)
    opt_state = sharding.replicate(
        jax.tree.map(np.asarray, stage.optimizer.init(host_trainable)), mesh)
    _, batch = common.synthetic_batch(method, gb, bag, patch_dim)
    batch = sharding.shard_batch(batch, mesh)
    compiled, compile_s = common.compile_timed(step, trainable, opt_state, rest, batch,
                                               jax.random.key(0))
    stats, trainable, opt_state = common.time_train_steps(
        compiled, trainable, opt_state, rest, batch, repeats=repeats, warmup=1,
        max_seconds=max_seconds)
    row = dict(stats, num_devices=d, global_batch=gb, per_device_batch=gb // d,
               compile_s=compile_s, patients_per_s=gb / (stats["p50_ms"] * 1e-3))
    common.log(f"  d={d} global batch {gb:3d}: step p50 {stats['p50_ms']:8.1f} ms "
               f"(p90 {stats['p90_ms']:.1f}), {row['patients_per_s']:7.1f} patients/s, "
               f"compile {compile_s:.1f} s")
    measured[(d, gb)] = row
    return row

  t_run = time.perf_counter()
  strong, weak, skipped = [], [], []
  common.log(f"strong scaling (global batch {global_batch}):")
  for d in used:
    if global_batch % d:
      skipped.append({"num_devices": d, "kind": "strong",
                      "reason": f"global batch {global_batch} not divisible by {d}"})
      continue
    strong.append(dict(measure(d, global_batch)))
  common.log(f"weak scaling ({per_device} per device):")
  for d in used:
    weak.append(dict(measure(d, per_device * d)))
  for d in counts:
    if d > n_dev:
      skipped.append({"num_devices": d, "reason": f"only {n_dev} devices"})
  for r in strong:  # relative to the smallest device count measured (normally 1)
    r["speedup"] = strong[0]["p50_ms"] / r["p50_ms"]
    r["efficiency"] = r["speedup"] * strong[0]["num_devices"] / r["num_devices"]
  for r in weak:
    r["efficiency"] = weak[0]["p50_ms"] / r["p50_ms"]

  is_cpu = jax.default_backend() == "cpu"
  result = {
      "benchmark": "scaling",
      "mode": "quick" if q else "full",
      "device": info,
      "git": common.git_state(),
      "model": {
          "name": model_name,
          "step": (f"{stage.name} stage of configs/{model_name}.py"
                   f"{':smoke' if q else ''}: value_and_grad of the stage loss + the "
                   "stage's optax update, jitted over (graphdef, state), donated"),
          "trainable_params": n_params, "bag": bag, "patch_dim": patch_dim,
          "input_dtype": "float16"},
      "sharding": "1-D 'data' mesh (survjax.train.sharding.make_mesh); params and optimiser "
                  "state replicated; batch split along patients (shard_batch)",
      "strong": strong,
      "weak": weak,
      "strong_global_batch": global_batch,
      "weak_per_device_batch": per_device,
      "skipped": skipped,
      "cpu_fake_devices": args.cpu_devices if is_cpu else None,
      "note": ("CPU: the devices are XLA fake host devices sharing "
               f"{info['cpu_threads']} cores, so these numbers measure the overhead of "
               "partitioning and collectives, not a speed-up" if is_cpu else
               "real accelerator devices"),
      "total_s": time.perf_counter() - t_run,
      "load_average_1min_end": os.getloadavg()[0],
  }
  if cpu_devices_note:
    result["cpu_devices_note"] = cpu_devices_note
  common.emit(out_path, result)
  return 0


if __name__ == "__main__":
  sys.exit(main())
