"""Latency and throughput of MUST's DDIM sampler (JAX), with a PyTorch-eager comparison.

    python -m benchmarks.sampling_latency  # benchmarks/results/sampling_latency_<platform>.json
    python -m benchmarks.sampling_latency --out /tmp/s.json --quick   # about a minute

What is measured (MUST suppl. 7.2: 4-layer transformer on 256-d latents, 50 DDIM steps,
5 samples per patient, averaged):

* ``jax.batch1``: one patient, the whole sampler as one jitted function (one
  ``lax.scan`` over the steps, 5 samples batched): compile time apart, then p50/p90 over
  repeats taken in two sessions, before the sweep and after the torch run (the machine
  is shared; pooling both keeps the JAX/torch ratio honest under drifting load).
* ``jax.batch1_unroll_variants`` (``--unroll-variants``): batch 1 again with the scan
  unrolled (several steps per loop iteration), which matters on a GPU.
* ``jax.batch1_python_loop``: for contrast, a Python loop over the 50 steps around a
  jitted denoiser step (what the one-scan design avoids).
* ``jax.sweep``: patients per second over batch sizes 1 .. 4096 (``--quick`` stops at 16;
  sizes whose estimated time exceeds the ``--max-seconds`` budget are skipped and listed),
  and the achieved GFLOP/s against the measured float32 matmul rate of the machine
  (1024^3 matmuls on CPU, 8192^3 on a GPU, at the backend's default float32 precision,
  measured at the start and at the end; the higher is the reference).
  Batches above 1280 rows (256 patients) are evaluated in chunks (`make_sampler`'s
  ``chunk_rows="auto"`` on CPU).
* ``torch``: the same denoiser and sampler in eager PyTorch
  (`benchmarks/torch_reference.py`): 5 samples batched, and one sample at a time (the
  paper's description), with the same weights; ``check_max_abs_diff`` compares its
  deterministic samples with JAX's on the same initial noise. Runs in-process when torch
  imports, else via ``--torch-python`` (default ``$SURVJAX_TORCH_PYTHON``); else
  ``"torch": null`` with the reason. torch gets as many threads as XLA:CPU uses (one per
  available core).

FLOPs are counted analytically (`denoiser_flops`): 2 m n k per matmul (weights and
attention products), elementwise work (LayerNorm, softmax, GELU, the DDIM update) not
counted; XLA's own count for one denoiser call is recorded beside it as a cross-check.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from benchmarks import common
from survjax.diffusion.ddim import AUTO_CPU_CHUNK_ROWS, ddim_step_table, make_sampler
from survjax.diffusion.denoiser import ConditionalDenoiser
from survjax.diffusion.schedules import linear_schedule

CONFIG = {"dim": 256, "num_layers": 4, "num_heads": 8, "mlp_ratio": 4, "num_cond_tokens": 2,
          "num_steps": 50, "num_samples": 5, "eta": 0.0, "T": 1000, "schedule": "linear"}
FULL_SWEEP = (1, 4, 16, 64, 256, 1024, 4096)
QUICK_SWEEP = (1, 4, 16)


def denoiser_flops(dim=256, num_layers=4, mlp_ratio=4, num_cond_tokens=2) -> dict:
  """Matmul FLOPs of one `ConditionalDenoiser` call for one latent (2 per multiply-add).

  With ``L = 1 + K`` tokens, ``D = dim``, ``h = mlp_ratio``:

      time MLP            2 * 2 D^2
      layer (not last)    2 L D (3D) + 2 L D D + 2 * 2 L D (h D)  [qkv, proj, MLP]
                          + 2 * 2 L^2 D                          [Q K^T and A V]
      last layer          2 L D (3D) + 2 D D + 2 * 2 D (h D) + 2 * 2 L D
                          (keys/values for all tokens, the rest for the z token only)
      read-out            2 D^2

  For MUST's sizes (D = 256, 4 layers, h = 4, K = 2) this is 16.94 MFLOP.
  """
  d, l, h = dim, 1 + num_cond_tokens, mlp_ratio
  time_mlp = 4 * d * d
  layer = 6 * l * d * d + 2 * l * d * d + 4 * l * h * d * d + 4 * l * l * d
  last = 6 * l * d * d + 2 * d * d + 4 * h * d * d + 4 * l * d
  readout = 2 * d * d
  total = time_mlp + (num_layers - 1) * layer + last + readout
  return {"per_call_per_latent": total, "time_mlp": time_mlp, "layer": layer,
          "last_layer": last, "readout": readout}


def export_torch_params(model: ConditionalDenoiser) -> dict[str, np.ndarray]:
  """The denoiser's weights in the torch ``state_dict`` layout of torch_reference.py."""
  out = {}

  def lin(name, m):
    out[f"{name}.weight"] = np.asarray(m.kernel[...]).T.copy()
    out[f"{name}.bias"] = np.asarray(m.bias[...])

  def ln(name, m):
    out[f"{name}.weight"] = np.asarray(m.scale[...])
    out[f"{name}.bias"] = np.asarray(m.bias[...])

  lin("time_fc1", model.time_fc1)
  lin("time_fc2", model.time_fc2)
  out["type_embed"] = np.asarray(model.type_embed[...])
  for i, layer in enumerate(model.layers):
    ln(f"layers.{i}.ln1", layer.ln1)
    lin(f"layers.{i}.qkv", layer.qkv)
    lin(f"layers.{i}.proj", layer.proj)
    ln(f"layers.{i}.ln2", layer.ln2)
    lin(f"layers.{i}.fc1", layer.fc1)
    lin(f"layers.{i}.fc2", layer.fc2)
  ln("ln_out", model.ln_out)
  lin("out", model.out)
  return out


def _python_loop_sampler(graphdef, schedule, num_steps, num_samples):
  """Python loop over the steps around one jitted DDIM step (for contrast only)."""
  tau, r, c = ddim_step_table(schedule, num_steps, 0.0)[:3]
  tau, r, c = np.asarray(tau), np.asarray(r), np.asarray(c)

  @jax.jit
  def step(state, z, t, r_i, c_i, cond_rep):
    eps = nnx.merge(graphdef, state)(z, jnp.full((z.shape[0],), t, jnp.int32), cond_rep)
    return r_i * z + c_i * eps

  def sample(state, cond, key):
    b, d = cond.shape[0], cond.shape[-1]
    cond_rep = jnp.repeat(cond, num_samples, axis=0)
    z = jax.random.normal(jax.random.split(key)[0], (b * num_samples, d))
    for i in range(num_steps):
      z = step(state, z, tau[i], r[i], c[i], cond_rep)
    return z.reshape(b, num_samples, d)

  return sample


def _run_torch(params: dict, args, threads: int) -> tuple[dict | None, str | None]:
  """Runs torch_reference in-process, or in ``--torch-python``; (result, reason).

  On a GPU backend torch runs on CUDA too, over the same sweep as JAX (its eager loop is
  launch-bound there, not compute-bound, so large batches are cheap).
  """
  gpu = jax.default_backend() == "gpu"
  sweep = list(QUICK_SWEEP[:2] if args.quick else (FULL_SWEEP if gpu else (1, 4, 16, 64)))
  kw = dict(threads=threads, repeats=args.torch_repeats,
            one_at_a_time_repeats=2 if args.quick else 3, batch_sizes=sweep,
            max_seconds=20.0 if args.quick else 90.0, device="cuda" if gpu else "cpu")
  if importlib.util.find_spec("torch") is not None:
    try:
      from benchmarks import torch_reference
      res = torch_reference.run(params, **kw)
      res["mode"] = "in-process"
      return res, None
    except Exception as e:  # noqa: BLE001
      return None, f"in-process torch failed: {type(e).__name__}: {e}"
  py = args.torch_python
  if not py:
    return None, ("torch is not importable here and no --torch-python (or "
                  "SURVJAX_TORCH_PYTHON) was given")
  if not Path(py).exists():
    return None, f"--torch-python {py} does not exist"
  with tempfile.TemporaryDirectory() as tmp:
    npz = Path(tmp) / "params.npz"
    np.savez(npz, **params)
    cmd = [py, str(Path(__file__).with_name("torch_reference.py")), "--params", str(npz),
           "--threads", str(threads), "--repeats", str(kw["repeats"]),
           "--one-at-a-time-repeats", str(kw["one_at_a_time_repeats"]),
           "--batch-sizes", ",".join(map(str, sweep)), "--max-seconds",
           str(kw["max_seconds"]), "--device", kw["device"]]
    env = dict(os.environ)
    env.pop("OMP_WAIT_POLICY", None)
    if args.torch_omp_wait_policy:   # '' leaves OpenMP's own default (spin, then sleep)
      env["OMP_WAIT_POLICY"] = args.torch_omp_wait_policy
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, env=env)
  if proc.returncode != 0:
    tail = proc.stderr.strip().splitlines()[-1:] or ["(no stderr)"]
    return None, f"{py} torch_reference.py exited {proc.returncode}: {tail[0]}"
  res = json.loads(proc.stdout.strip().splitlines()[-1])
  res["mode"] = f"subprocess: {py}"
  res["omp_wait_policy"] = args.torch_omp_wait_policy
  return res, None


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--out", default=None,
                 help="JSON path (default benchmarks/results/sampling_latency_<platform>.json)")
  p.add_argument("--quick", action="store_true", help="short sweep and fewer repeats")
  p.add_argument("--batch-sizes", default=None, help="comma-separated sweep (patients)")
  p.add_argument("--max-seconds", type=float, default=None,
                 help="time budget of the JAX sweep (default 300, quick 40)")
  p.add_argument("--repeats", type=int, default=None, help="batch-1 repeats (30, quick 10)")
  p.add_argument("--torch-repeats", type=int, default=None)
  p.add_argument("--torch-python", default=os.environ.get("SURVJAX_TORCH_PYTHON"))
  p.add_argument("--no-torch", action="store_true")
  p.add_argument("--torch-omp-wait-policy", default="PASSIVE",
                 help="OMP_WAIT_POLICY of the torch subprocess (PASSIVE: OpenMP's default "
                      "spinning made torch's 2 threads 30-250x slower on a loaded 2-core "
                      "machine, but PASSIVE slows its small products on a quiet one; '' "
                      "for OpenMP's own default)")
  p.add_argument("--unroll", type=int, default=1,
                 help="steps per scan iteration of the sampler (50 = fully unrolled)")
  p.add_argument("--unroll-variants", default="",
                 help="comma-separated unroll values also timed at batch 1, e.g. 5,10,50")
  p.add_argument("--precision", default="float32", choices=("float32", "bfloat16"),
                 help="the denoiser's matmul precision (make_sampler's precision)")
  p.add_argument("--kernel", default="xla", choices=("xla", "pallas"),
                 help="make_sampler's kernel: the XLA scan or the fused Pallas loop (GPU; "
                      "interpreted, hence slow, on the CPU)")
  args = p.parse_args(argv)
  args.out = args.out or common.default_out("sampling_latency")
  quick = args.quick
  sweep_sizes = ([int(x) for x in args.batch_sizes.split(",")] if args.batch_sizes
                 else list(QUICK_SWEEP if quick else FULL_SWEEP))
  budget = args.max_seconds or (40.0 if quick else 300.0)
  repeats = args.repeats or (10 if quick else 30)
  args.torch_repeats = args.torch_repeats or (5 if quick else 10)
  threads = common.num_cpu_threads()
  t_run = time.perf_counter()

  info = common.device_info()
  common.log(f"device: {info['device_kind']} ({info['platform']}), {info['cpu_model']}, "
             f"{threads} threads, load {info['load_average_1min']}")
  # A GPU needs a large product to reach its rate (1024^3 is launch-bound there).
  mm_n = 8192 if info["platform"] == "gpu" else 1024
  matmul_start = common.matmul_gflops(mm_n, repeats=10 if quick else 20)
  matmul_small = common.matmul_gflops(256, repeats=50, m=15)
  # The sampler's shapes alone (rows of one call at batch 1, 16, 64), kernel rate only.
  chained = {f"{m}x256x256_chained20": common.matmul_gflops(256, repeats=30, m=m, chain=20)
             for m in (15, 240, 960)}
  common.log(f"float32 matmul (default precision): {matmul_start:.0f} GFLOP/s ({mm_n}^3), "
             f"{matmul_small:.0f} GFLOP/s ([15,256]x[256,256], the batch-1 shape)")

  c = CONFIG
  model = ConditionalDenoiser(c["dim"], c["num_layers"], c["num_heads"], c["mlp_ratio"],
                              c["num_cond_tokens"], rngs=nnx.Rngs(0))
  # A trained read-out is not zero; random small weights make the samples non-trivial.
  model.out.kernel[...] = 0.02 * jax.random.normal(jax.random.key(1), (c["dim"], c["dim"]))
  graphdef, state = nnx.split(model)
  schedule = linear_schedule(c["T"])
  sampler = make_sampler(graphdef, schedule=schedule, num_steps=c["num_steps"],
                         eta=c["eta"], num_samples=c["num_samples"], chunk_rows="auto",
                         unroll=args.unroll, precision=args.precision, kernel=args.kernel)
  c = {**c, "chunk_rows": AUTO_CPU_CHUNK_ROWS if jax.default_backend() == "cpu" else None,
       "unroll": args.unroll, "precision": args.precision, "kernel": args.kernel}
  matmul_bf16 = (common.matmul_gflops(mm_n, repeats=10 if quick else 20, dtype="bfloat16")
                 if args.precision == "bfloat16" else None)
  if matmul_bf16 is not None:
    common.log(f"bfloat16 matmul (float32 accumulation): {matmul_bf16:.0f} GFLOP/s")
  flops = denoiser_flops(c["dim"], c["num_layers"], c["mlp_ratio"], c["num_cond_tokens"])
  per_patient_flops = flops["per_call_per_latent"] * c["num_steps"] * c["num_samples"]

  m = c["num_samples"]
  xla_fwd = jax.jit(lambda st, z, t, cd: nnx.merge(graphdef, st)(z, t, cd)).lower(
      state, jnp.zeros((m, c["dim"])), jnp.zeros((m,), jnp.int32),
      jnp.zeros((m, c["num_cond_tokens"], c["dim"]))).compile()
  cost = xla_fwd.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else (cost or {})
  xla_flops = cost.get("flops")
  flop_info = {
      **flops, "per_patient": per_patient_flops,
      "xla_cost_analysis_per_call_per_latent": None if xla_flops is None else xla_flops / m,
      "method": "analytic: 2*m*n*k per matmul (weights, QK^T, AV); elementwise ops not "
                "counted. XLA's count (cost_analysis of one denoiser call) includes them."}
  xla_txt = "n/a" if xla_flops is None else f"{xla_flops / m / 1e6:.2f}"
  common.log(f"denoiser: {flops['per_call_per_latent'] / 1e6:.2f} MFLOP per latent per call "
             f"(XLA: {xla_txt}); "
             f"{per_patient_flops / 1e9:.2f} GFLOP per patient")

  def cond_for(b, i=0):
    return jax.random.normal(jax.random.key(1000 + i), (b, c["num_cond_tokens"], c["dim"]))

  # -- batch 1 latency
  cond1 = cond_for(1)
  try:
    compiled, compile_s = common.compile_timed(sampler, state, cond1, jax.random.key(0))
  except Exception as e:  # noqa: BLE001 -- e.g. a Pallas lowering this backend lacks
    if args.kernel == "xla":
      raise
    reason = f"{type(e).__name__}: {str(e).splitlines()[0][:500] if str(e) else ''}"
    common.log(f"kernel {args.kernel} failed to compile: {reason}")
    common.emit(args.out, {
        "benchmark": "sampling_latency", "mode": "quick" if quick else "full",
        "command": shlex.join([Path(sys.executable).name, "-m", "benchmarks.sampling_latency",
                              *(argv if argv is not None else sys.argv[1:])]),
        "git": common.git_state(), "device": info, "config": c,
        "error": f"the {args.kernel} sampler did not compile: {reason}"})
    return 1
  batch1_args = lambda i: (state, cond1, jax.random.key(i))  # noqa: E731
  batch1_first = common.time_calls(compiled, repeats=repeats, warmup=2,
                                   make_args=batch1_args)
  batch1 = dict(batch1_first, compile_s=compile_s)
  batch1["gflops_per_s"] = per_patient_flops / (batch1["p50_ms"] * 1e-3) / 1e9
  common.log(f"JAX batch 1 (one scan): p50 {batch1['p50_ms']:.1f} ms, p90 "
             f"{batch1['p90_ms']:.1f} ms, compile {compile_s:.2f} s, "
             f"{batch1['gflops_per_s']:.0f} GFLOP/s")

  unroll_variants = []
  for u in (int(x) for x in args.unroll_variants.split(",") if x):
    s_u = make_sampler(graphdef, schedule=schedule, num_steps=c["num_steps"], eta=c["eta"],
                       num_samples=c["num_samples"], chunk_rows="auto", unroll=u)
    comp_u, cs_u = common.compile_timed(s_u, state, cond1, jax.random.key(0))
    st_u = common.time_calls(comp_u, repeats=repeats, warmup=2, make_args=batch1_args)
    unroll_variants.append(dict(st_u, unroll=u, compile_s=cs_u))
    common.log(f"JAX batch 1, unroll {u}: p50 {st_u['p50_ms']:.2f} ms, p90 "
               f"{st_u['p90_ms']:.2f} ms, compile {cs_u:.2f} s")

  loop = _python_loop_sampler(graphdef, schedule, c["num_steps"], c["num_samples"])
  t0 = time.perf_counter()
  jax.block_until_ready(loop(state, cond1, jax.random.key(0)))
  loop_first_s = time.perf_counter() - t0
  batch1_loop = common.time_calls(
      loop, repeats=max(5, repeats // 3), warmup=1,
      make_args=lambda i: (state, cond1, jax.random.key(i)))
  batch1_loop["first_call_s_incl_compile"] = loop_first_s
  common.log(f"JAX batch 1 (Python loop around a jitted step): p50 "
             f"{batch1_loop['p50_ms']:.1f} ms")

  # -- throughput sweep
  sweep, skipped = [], []
  t_sweep = time.perf_counter()
  per_patient_s = batch1["p50_ms"] * 1e-3
  for b in sweep_sizes:
    est_run = per_patient_s * b
    n_rep = 10 if est_run < 0.5 else (5 if est_run < 5 else 3)
    est = est_run * (n_rep + 1) + 2.0
    elapsed = time.perf_counter() - t_sweep
    if elapsed + est > budget:
      skipped.append({"batch": b, "reason": f"estimated {est:.0f} s (at "
                      f"{per_patient_s * 1e3:.1f} ms/patient) would exceed the {budget:.0f} "
                      f"s sweep budget ({elapsed:.0f} s used)"})
      common.log(f"  skip batch {b}: {skipped[-1]['reason']}")
      continue
    cond = cond_for(b)
    comp, cs = common.compile_timed(sampler, state, cond, jax.random.key(0))
    stats = common.time_calls(comp, repeats=n_rep, warmup=1,
                              make_args=lambda i, cond=cond: (state, cond, jax.random.key(i)))
    stats.update(
        batch=b, compile_s=cs, patients_per_s=b / (stats["p50_ms"] * 1e-3),
        ms_per_patient=stats["p50_ms"] / b,
        gflops_per_s=per_patient_flops * b / (stats["p50_ms"] * 1e-3) / 1e9)
    stats["pct_of_matmul_rate"] = 100 * stats["gflops_per_s"] / matmul_start
    per_patient_s = stats["p50_ms"] * 1e-3 / b
    sweep.append(stats)
    common.log(f"  batch {b:5d}: p50 {stats['p50_ms']:9.1f} ms, {stats['patients_per_s']:8.1f} "
               f"patients/s, {stats['gflops_per_s']:6.0f} GFLOP/s "
               f"({stats['pct_of_matmul_rate']:.0f}% of the start matmul rate), compile "
               f"{cs:.2f} s")


  # -- torch
  torch_res, torch_reason, ratios = None, None, None
  if args.no_torch:
    torch_reason = "--no-torch"
  else:
    params = export_torch_params(model)
    z_init = jax.random.normal(jax.random.key(7), (1, c["num_samples"], c["dim"]))
    params["check/cond"] = np.asarray(cond1)
    params["check/z_init"] = np.asarray(z_init)
    load_before = os.getloadavg()[0]
    torch_res, torch_reason = _run_torch(params, args, threads)
    if torch_res is not None:
      torch_res["load_average_1min_before_after"] = [load_before, os.getloadavg()[0]]
    # Second session of the batch-1 timing, pooled with the first (drifting load).
    batch1_second = common.time_calls(compiled, repeats=repeats, warmup=1,
                                      make_args=batch1_args)
    batch1 = dict(common.summarize(
        np.asarray(batch1_first["times_ms"] + batch1_second["times_ms"]) * 1e-3),
        compile_s=compile_s,
        session_p50_ms=[batch1_first["p50_ms"], batch1_second["p50_ms"]])
    batch1["gflops_per_s"] = per_patient_flops / (batch1["p50_ms"] * 1e-3) / 1e9
    common.log(f"JAX batch 1 (one scan), both sessions: p50 {batch1['p50_ms']:.1f} ms "
               f"(sessions {batch1_first['p50_ms']:.1f}, {batch1_second['p50_ms']:.1f})")
    if torch_res is not None:
      _, jax_samples = sampler(state, cond1, jax.random.key(0), jnp.array(z_init))
      check = np.asarray(torch_res.pop("check_samples"), np.float32)
      torch_res["check_max_abs_diff"] = float(np.abs(check - np.asarray(jax_samples)).max())
      torch_res["check_max_abs_value"] = float(np.abs(check).max())
      torch_res["check_max_rel_diff"] = (torch_res["check_max_abs_diff"]
                                         / torch_res["check_max_abs_value"])
      jb = batch1["p50_ms"]
      ratios = {
          "torch_batched_over_jax_scan": torch_res["batch1_batched"]["p50_ms"] / jb,
          "torch_one_at_a_time_over_jax_scan":
              torch_res["batch1_one_at_a_time"]["p50_ms"] / jb,
          "jax_python_loop_over_jax_scan": batch1_loop["p50_ms"] / jb,
          "throughput_jax_over_torch_batched": {
              str(t["batch"]): next(s["patients_per_s"] for s in sweep
                                    if s["batch"] == t["batch"]) / t["patients_per_s"]
              for t in torch_res["sweep"] if any(s["batch"] == t["batch"] for s in sweep)},
      }
      common.log(f"torch {torch_res['torch_version']} ({torch_res['threads']} threads, "
                 f"{torch_res['mode']}): batch 1 batched p50 "
                 f"{torch_res['batch1_batched']['p50_ms']:.1f} ms, one at a time p50 "
                 f"{torch_res['batch1_one_at_a_time']['p50_ms']:.1f} ms; samples agree with "
                 f"JAX to {torch_res['check_max_abs_diff']:.1e} (relative "
                 f"{torch_res['check_max_rel_diff']:.1e})")
      common.log(f"ratios: torch batched / JAX = {ratios['torch_batched_over_jax_scan']:.2f}, "
                 f"torch one-at-a-time / JAX = "
                 f"{ratios['torch_one_at_a_time_over_jax_scan']:.2f}, JAX Python loop / scan = "
                 f"{ratios['jax_python_loop_over_jax_scan']:.2f}")
  if torch_reason:
    common.log(f"torch: not run ({torch_reason})")

  matmul_end = common.matmul_gflops(mm_n, repeats=10 if quick else 20)
  matmul = max(matmul_start, matmul_end)
  for st in sweep:
    st["pct_of_matmul_rate"] = 100 * st["gflops_per_s"] / matmul
    if matmul_bf16:
      st["pct_of_bf16_matmul_rate"] = 100 * st["gflops_per_s"] / matmul_bf16
  peak = max(sweep, key=lambda s: s["gflops_per_s"]) if sweep else None
  if peak is not None:
    common.log(f"float32 matmul at the end: {matmul_end:.0f} GFLOP/s; peak sampler throughput "
               f"{peak['gflops_per_s']:.0f} GFLOP/s at batch {peak['batch']} = "
               f"{peak['pct_of_matmul_rate']:.0f}% of {matmul:.0f}")

  result = {
      "benchmark": "sampling_latency",
      "mode": "quick" if quick else "full",
      "command": shlex.join([Path(sys.executable).name, "-m", "benchmarks.sampling_latency",
                            *(argv if argv is not None else sys.argv[1:])]),
      "git": common.git_state(),
      "device": info,
      "config": c,
      "flops": flop_info,
      "matmul_gflops_per_s": {f"{mm_n}x{mm_n}x{mm_n}_start": matmul_start,
                              f"{mm_n}x{mm_n}x{mm_n}_end": matmul_end, "reference": matmul,
                              "15x256x256": matmul_small,
                              **chained,
                              "precision": jax.config.jax_default_matmul_precision
                              or "default (TF32 for float32 on NVIDIA Ampere and later)",
                              f"{mm_n}x{mm_n}x{mm_n}_bfloat16": matmul_bf16},
      "jax": {"batch1": batch1, "batch1_python_loop": batch1_loop,
              "batch1_unroll_variants": unroll_variants, "sweep": sweep,
              "sweep_skipped": skipped, "sweep_budget_s": budget,
              "note": "compile_s near 0 means a cache hit (that shape was compiled before); "
                      "GFLOP/s uses the analytic count",
              "peak": None if peak is None else {
                  "batch": peak["batch"], "gflops_per_s": peak["gflops_per_s"],
                  "patients_per_s": peak["patients_per_s"],
                  "pct_of_matmul_rate": peak["pct_of_matmul_rate"],
                  "pct_of_bf16_matmul_rate": peak.get("pct_of_bf16_matmul_rate")}},
      "torch": torch_res,
      "ratios": ratios,
      "total_s": time.perf_counter() - t_run,
      "load_average_1min_end": os.getloadavg()[0],
      "note": ("compare ratios measured in one run; on a shared CPU, torch eager (OpenMP) "
               "degrades sharply when another process takes a core"),
  }
  if torch_res is None:
    result["torch_unavailable_reason"] = torch_reason
  common.emit(args.out, result)


if __name__ == "__main__":
  sys.exit(main())
