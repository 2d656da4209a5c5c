"""Batched unbalanced Sinkhorn (TTA's Together step): ott-jax vs POT vs PyTorch.

    python -m benchmarks.uot --torch-python /work/torchenv/bin/python
    # -> benchmarks/results/uot_<platform>.json

The problem of one TTA training batch: 32 patients x 4096 tokens x (32 prototypes +
a zero-cost dustbin), cost ``-log softmax`` of random logits (temperature 0.5 cosines),
``eps = 0.1``, hard uniform token marginal (``tau_a = 1``), KL-relaxed prototype-side
marginal (``tau_b = gamma / (gamma + eps)``, ``gamma = 1``, the dustbin included, as in
survjax.ot), ``rho = 0.5``. Solvers:

* ``ott_jax``: `survjax.ot.batched_plan` with TTA's default solver settings
  (configs/tta.py: ott's kernel-mode Sinkhorn, over-relaxation 1.55, error checked every 5
  iterations, ott's loop run per patient), jitted; compilation timed apart. Its time
  includes forming the cost from the logits (``-log softmax``), which the others are given.
  It is timed in two rounds, before and after POT and torch, and its p50 is over both (a
  load change during the run does not favour it; each round's p50 and load are kept).
  Three more ott-jax rows show where the speed comes from: ``ott_jax_lse`` (the previous
  default: log domain, no momentum, error every 10 iterations, whole-batch vmap),
  ``ott_jax_kernel_plain`` (kernel mode without momentum, per patient) and
  ``ott_jax_whole_batch`` (TTA's settings but one vmap over the 32 patients instead of a
  loop per patient: the batch iterates until its slowest patient converges, with ott's
  error computed at every iteration).
* ``pot_loop``: POT's ``ot.unbalanced.sinkhorn_unbalanced`` (numpy float64, kernel-domain
  ``method="sinkhorn"``, ``reg_type="entropy"`` as ott's) looped over the patients,
  ``reg_m = (inf, gamma)``; ``pot_loop_float32``: the same on float32 arrays (the precision
  ott-jax and torch use). (POT 0.9.7's ``sinkhorn_stabilized`` with ``reg_m = (inf, .)``
  stops after 3 checks with an all-zero plan here, so it is not used.)
* ``torch_batched``: a batched log-domain Sinkhorn in PyTorch written for this benchmark
  (same updates as ott's: ``f = eps log a - eps LSE((g - C)/eps)``, ``g = tau_b (eps log
  b - eps LSE((f - C)/eps))``), token-marginal error checked every 10 iterations.

Tolerance: every solver stops at the same threshold, 1e-3, on its own criterion (stated
in the JSON under ``tolerance``); since the criteria differ, every plan is then checked
against one float64 reference (POT's solver run to ``stopThr = 1e-12``) with the same
measures: per-patient L1 distance to the reference plan (total mass 1), largest entry
difference, token-marginal L1 error and dustbin mass, and every pair of solvers is
compared entry by entry.

Timing: wall-clock p50 (the goals are on it) and, since the machine is shared, the p50 of
the process CPU time per solve (all threads; ``cpu_p50_ms``, ``cpu_time_ratio_p50``), with
the 1-minute load average before each solver.

Memory: the structure-aware plan (``structure_lambda = 0.1``, 3 majorisation steps, token
features of width 256) compiled for 32 patients at 4096 and 65536 tokens;
``memory_analysis()`` of the compiled executable gives its temporary buffers (the working
memory XLA assigns), which grow linearly in the tokens (the dense ``N x N`` similarity
alone would be 16 GiB per patient at 65536).

POT and torch run in ``--torch-python`` (a Python with torch and POT), this file without
jax there.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time

B, N, K = 32, 4096, 32
EPS, GAMMA, RHO, THRESHOLD, MAX_ITERS = 0.1, 1.0, 0.5, 1e-3, 2000
REF_THRESHOLD = 1e-12
MEMORY_TOKENS, MEMORY_DIM = (4096, 65536), 256
GOALS = {"pot_loop/ott_jax": 5.0, "torch_batched/ott_jax": 1.5}


def _problem(np):
  """Random logits (as TTA's cosines / 0.5) -> cost ``[B, N, K + 1]``, marginals."""
  rng = np.random.default_rng(0)
  x = rng.normal(size=(B, N, 16)).astype(np.float32)
  p = rng.normal(size=(K, 16)).astype(np.float32)
  x /= np.linalg.norm(x, axis=-1, keepdims=True)
  p /= np.linalg.norm(p, axis=-1, keepdims=True)
  logits = x @ p.T / 0.5
  logp = logits - logits.max(-1, keepdims=True)
  logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
  cost = np.concatenate([-logp, np.zeros((B, N, 1), np.float32)], axis=-1)
  a = np.full((N,), 1.0 / N, np.float32)
  b = np.concatenate([np.full((K,), RHO / K), [1.0 - RHO]]).astype(np.float32)
  return logits, cost, a, b


def _summ(times, cpu_times=None):
  import numpy as np
  t = np.asarray(times) * 1e3
  out = {"times_ms": [round(float(v), 3) for v in t], "p50_ms": float(np.percentile(t, 50)),
         "p90_ms": float(np.percentile(t, 90)), "min_ms": float(t.min()),
         "repeats": int(t.size)}
  if cpu_times is not None:
    out["cpu_p50_ms"] = float(np.percentile(np.asarray(cpu_times) * 1e3, 50))
  return out


def _cpu_p50_ms(fn, repeats):
  """p50 of the process CPU time (all threads) of ``fn()``: less sensitive than wall time
  to other processes on a shared machine (a multi-threaded solver pays for every thread)."""
  import numpy as np
  ts = []
  for _ in range(repeats):
    t0 = time.process_time()
    fn()
    ts.append(time.process_time() - t0)
  return float(np.percentile(np.asarray(ts) * 1e3, 50))


def _load():
  return round(os.getloadavg()[0], 2)


def torch_worker(repeats: int, plans_dir: str) -> dict:
  """POT loops, the torch batched solver and the float64 reference (torch interpreter);
  plans are saved to ``plans_dir`` as ``<name>.npy``."""
  import numpy as np
  import ot as pot
  import torch
  torch.set_num_threads(max(1, len(os.sched_getaffinity(0))))
  _, cost, a, b = _problem(np)
  tau_b = GAMMA / (GAMMA + EPS)

  def torch_solve(c, la, lb):
    f = torch.zeros(c.shape[:2])
    g = torch.zeros(c.shape[0], c.shape[2])
    it = 0
    while it < MAX_ITERS:
      g = tau_b * (EPS * lb - EPS * torch.logsumexp((f[:, :, None] - c) / EPS, dim=1))
      row = torch.logsumexp((g[:, None, :] - c) / EPS, dim=2)
      it += 1
      if it % 10 == 0:
        err = (torch.exp(f / EPS + row) - torch.exp(la)).abs().sum(1).max()
        if float(err) < THRESHOLD:
          break
      f = EPS * la - EPS * row
    f = EPS * la - EPS * torch.logsumexp((g[:, None, :] - c) / EPS, dim=2)
    return torch.exp((f[:, :, None] + g[:, None, :] - c) / EPS), it

  c = torch.from_numpy(cost)
  la = torch.log(torch.from_numpy(a))[None].expand(B, N)
  lb = torch.log(torch.from_numpy(b))[None].expand(B, K + 1)
  load = _load()
  plan, iters = torch_solve(c, la, lb)  # warm-up
  times, cpu = [], []
  for _ in range(repeats):
    t0, p0 = time.perf_counter(), time.process_time()
    plan, iters = torch_solve(c, la, lb)
    times.append(time.perf_counter() - t0)
    cpu.append(time.process_time() - p0)
  np.save(os.path.join(plans_dir, "torch_batched.npy"), plan.numpy())
  out = {"torch_batched": {**_summ(times, cpu), "iterations": iters, "load_average_1min": load,
                           "torch": torch.__version__, "threads": torch.get_num_threads()}}

  def pot_all(dtype, thr, itermax):
    plans, its = [], []
    for i in range(B):
      p, log = pot.unbalanced.sinkhorn_unbalanced(
          a.astype(dtype), b.astype(dtype), cost[i].astype(dtype), EPS,
          (math.inf, GAMMA), method="sinkhorn", reg_type="entropy",
          numItermax=itermax, stopThr=thr, log=True)
      plans.append(p)
      its.append(len(log.get("err", [])))
    return np.stack(plans), its

  for name, dtype in (("pot_loop", np.float64), ("pot_loop_float32", np.float32)):
    load = _load()
    pot_all(dtype, THRESHOLD, MAX_ITERS)  # warm-up
    times, cpu = [], []
    for _ in range(max(1, repeats)):
      t0, p0 = time.perf_counter(), time.process_time()
      pplan, its = pot_all(dtype, THRESHOLD, MAX_ITERS)
      times.append(time.perf_counter() - t0)
      cpu.append(time.process_time() - p0)
    np.save(os.path.join(plans_dir, f"{name}.npy"), pplan)
    out[name] = {**_summ(times, cpu), "iterations_per_patient_max": int(max(its)),
                 "iterations_per_patient_min": int(min(its)), "load_average_1min": load,
                 "dtype": np.dtype(dtype).name, "pot": pot.__version__}
  ref, its = pot_all(np.float64, REF_THRESHOLD, 100000)
  np.save(os.path.join(plans_dir, "reference.npy"), ref)
  out["reference"] = {"solver": "POT sinkhorn_unbalanced, float64",
                      "stopThr": REF_THRESHOLD, "iterations_per_patient_max": int(max(its))}
  return out


def _checks(np, plans: dict, ref) -> dict:
  """The same accuracy measures for every solver's plan, in float64."""
  out = {}
  for name, p in plans.items():
    p = np.asarray(p, np.float64)
    out[name] = {
        "l1_to_reference_max": float(np.abs(p - ref).sum((1, 2)).max()),
        "l1_to_reference_mean": float(np.abs(p - ref).sum((1, 2)).mean()),
        "max_abs_diff_to_reference": float(np.abs(p - ref).max()),
        "token_marginal_l1_max": float(np.abs(p.sum(2) - 1.0 / N).sum(1).max()),
        "dustbin_mass_mean": float(p[..., -1].sum(1).mean()),
    }
  names = list(plans)
  out["pairwise_max_abs_diff"] = {
      f"{x}|{y}": float(np.abs(np.asarray(plans[x], np.float64)
                               - np.asarray(plans[y], np.float64)).max())
      for i, x in enumerate(names) for y in names[i + 1:]}
  return out


def _memory(jax, jnp, ot, settings) -> dict:
  """Compiled-executable memory of the structure-aware batched plan vs the tokens."""
  rows = []
  for n in MEMORY_TOKENS:
    fn = jax.jit(lambda l, m, f: ot.batched_plan(
        l, m, RHO, f, epsilon=EPS, gamma=GAMMA, structure_lambda=0.1, outer_iterations=3,
        threshold=THRESHOLD, max_iterations=MAX_ITERS, **settings))
    args = (jax.ShapeDtypeStruct((B, n, K), jnp.float32), jax.ShapeDtypeStruct((B, n), bool),
            jax.ShapeDtypeStruct((B, n, MEMORY_DIM), jnp.float32))
    t0 = time.perf_counter()
    mem = fn.lower(*args).compile().memory_analysis()
    rows.append({"tokens": n, "compile_s": time.perf_counter() - t0,
                 "temp_bytes": int(mem.temp_size_in_bytes),
                 "argument_bytes": int(mem.argument_size_in_bytes),
                 "output_bytes": int(mem.output_size_in_bytes),
                 "dense_similarity_bytes_per_patient": 4 * n * n})
  lo, hi = rows[0], rows[-1]
  return {"patients": B, "feature_dim": MEMORY_DIM, "structure_lambda": 0.1,
          "outer_iterations": 3, "settings": settings, "rows": rows,
          "temp_ratio": hi["temp_bytes"] / lo["temp_bytes"],
          "token_ratio": hi["tokens"] / lo["tokens"],
          "source": "jax.jit(...).lower(...).compile().memory_analysis()"}


def main(argv=None):
  ap = argparse.ArgumentParser()
  ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
  ap.add_argument("--plans-dir", default=None, help=argparse.SUPPRESS)
  ap.add_argument("--repeats", type=int, default=5)
  ap.add_argument("--out", default=None)
  ap.add_argument("--torch-python", default=os.environ.get("SURVJAX_TORCH_PYTHON"))
  args = ap.parse_args(argv)
  if args.worker:
    print(json.dumps(torch_worker(args.repeats, args.plans_dir)))
    return

  import warnings
  warnings.filterwarnings("ignore", category=DeprecationWarning)
  import jax
  import jax.numpy as jnp
  import numpy as np

  from benchmarks import common
  from configs import tta as tta_config
  from survjax import ot

  o = tta_config.get_config().model.ot
  variants = {
      "ott_jax": dict(mode=o.mode, momentum=o.momentum, inner_iterations=o.inner_iterations,
                      patients_per_solve=o.patients_per_solve),
      "ott_jax_lse": dict(mode="lse", momentum=1.0, inner_iterations=10, patients_per_solve=0),
      "ott_jax_kernel_plain": dict(mode="kernel", momentum=1.0,
                                   inner_iterations=o.inner_iterations,
                                   patients_per_solve=o.patients_per_solve),
      "ott_jax_whole_batch": dict(mode=o.mode, momentum=o.momentum,
                                  inner_iterations=o.inner_iterations, patients_per_solve=0),
  }
  logits, cost, a, b = _problem(np)
  lg, mask = jnp.asarray(logits), jnp.ones((B, N), bool)
  result = {
      "problem": {"patients": B, "tokens": N, "prototypes": K, "dustbin": True,
                  "epsilon": EPS, "gamma": GAMMA, "tau_b": GAMMA / (GAMMA + EPS),
                  "rho": RHO, "threshold": THRESHOLD, "max_iterations": MAX_ITERS,
                  "dtype": "float32 (ott-jax, torch, pot_loop_float32), float64 (pot_loop)"},
      "tolerance": {
          "threshold": THRESHOLD,
          "ott_jax": "ott's error <= threshold per patient: L1 norm of the dual gradient "
                     "(token-marginal L1 error + prototype-marginal L1 error against its "
                     "KL-optimal target), checked every `inner_iterations`",
          "pot_loop": "POT's stopThr: mean of the relative sup-norm changes of the two "
                      "scalings between iterations <= threshold, checked every iteration",
          "torch_batched": "token-marginal L1 error <= threshold, checked every 10 "
                           "iterations",
          "checked_against": f"POT float64, stopThr {REF_THRESHOLD} (see `checks`)"},
  }
  plans, compiled_fns = {}, {}
  for name, st in variants.items():
    fn = jax.jit(lambda l, m, st=st: ot.batched_plan(
        l, m, RHO, epsilon=EPS, gamma=GAMMA, threshold=THRESHOLD, max_iterations=MAX_ITERS,
        **st))
    load = _load()
    compiled, compile_s = common.compile_timed(fn, lg, mask)
    stats = common.time_calls(compiled, lg, mask, repeats=args.repeats)
    compiled_fns[name] = compiled
    stats["cpu_p50_ms"] = _cpu_p50_ms(
        lambda: jax.block_until_ready(compiled(lg, mask)), args.repeats)
    plan, converged = compiled(lg, mask)
    # Iterations per patient (the solver inside batched_plan does not return them).
    iters = _ott_iterations(jax, jnp, np, cost, a, b, st)
    plans[name] = np.asarray(plan)
    result[name] = {**stats, "compile_s": compile_s, "settings": st,
                    "converged_all": bool(np.all(converged)),
                    "iterations_per_patient_max": int(iters.max()),
                    "iterations_per_patient_min": int(iters.min()),
                    "load_average_1min": load}
    common.log(f"{name}: p50 {stats['p50_ms']:.0f} ms, {iters.max()} iterations")
  # One vmap over the batch (patients_per_solve 0) at both sizes, so the two programs differ only
  # in the number of tokens.
  result["memory_structure_aware"] = _memory(jax, jnp, ot,
                                             {**variants["ott_jax"], "patients_per_solve": 0})
  result["device"] = common.device_info()
  result["git"] = common.git_state()
  py = common.torch_python(args.torch_python)
  if py:
    common.log(f"running POT and torch in {py}")
    with tempfile.TemporaryDirectory() as tmp:
      res, reason = common.run_json_subprocess(
          [py, os.path.abspath(__file__), "--worker", "--repeats", str(args.repeats),
           "--plans-dir", tmp], 3600)
      if res:
        for name in ("torch_batched", "pot_loop", "pot_loop_float32"):
          plans[name] = np.load(os.path.join(tmp, f"{name}.npy"))
        ref = np.load(os.path.join(tmp, "reference.npy"))
    result.update(res or {"torch_error": reason})
    # TTA's setting is timed again after POT and torch, and its p50 is taken over both
    # rounds, so that a load change during the run does not favour it.
    first = dict(result["ott_jax"])
    load = _load()
    second = common.time_calls(compiled_fns["ott_jax"], lg, mask, repeats=args.repeats)
    result["ott_jax"].update(
        common.summarize([t / 1e3 for t in first["times_ms"] + second["times_ms"]]))
    result["ott_jax"]["rounds"] = [
        {"p50_ms": first["p50_ms"], "load_average_1min": first["load_average_1min"]},
        {"p50_ms": second["p50_ms"], "load_average_1min": load}]
    if res:
      result["checks"] = _checks(np, plans, ref)
      p50 = result["ott_jax"]["p50_ms"]
      result["speedup_p50"] = {
          f"{other}/{name}": result[other]["p50_ms"] / result[name]["p50_ms"]
          for name in variants for other in ("pot_loop", "pot_loop_float32", "torch_batched")}
      pot, pot32, tb = (result[k]["p50_ms"] / p50
                        for k in ("pot_loop", "pot_loop_float32", "torch_batched"))
      result["cpu_time_ratio_p50"] = {
          f"{other}/{name}": result[other]["cpu_p50_ms"] / result[name]["cpu_p50_ms"]
          for name in variants for other in ("pot_loop", "pot_loop_float32", "torch_batched")}
      result["goals"] = {
          "pot_loop/ott_jax >= 5": pot >= GOALS["pot_loop/ott_jax"],
          "pot_loop_float32/ott_jax >= 5": pot32 >= GOALS["pot_loop/ott_jax"],
          "torch_batched/ott_jax >= 1.5": tb >= GOALS["torch_batched/ott_jax"],
          "memory linear in tokens (temp ratio <= 1.25 x token ratio)": (
              result["memory_structure_aware"]["temp_ratio"]
              <= 1.25 * result["memory_structure_aware"]["token_ratio"]),
      }
  else:
    result["torch_error"] = "no --torch-python (or $SURVJAX_TORCH_PYTHON)"
  result["load_average_1min_end"] = _load()
  common.emit(args.out or common.default_out("uot"), result)


def _ott_iterations(jax, jnp, np, cost, a, b, settings):
  """Iterations ott's solver takes per patient with these settings (the solve of
  `survjax.ot.uot_potentials`, through `survjax.ot.ott_solve` to read ott's output; untimed)."""
  from survjax import ot
  st = {k: v for k, v in settings.items() if k != "patients_per_solve"}
  one = lambda c: ot.ott_solve(
      c, jnp.asarray(a), jnp.asarray(b), epsilon=EPS, tau_a=1.0, tau_b=GAMMA / (GAMMA + EPS),
      threshold=THRESHOLD, max_iterations=MAX_ITERS, implicit=False, **st)[0].n_iters
  return np.asarray(jax.jit(jax.vmap(one))(jnp.asarray(cost)))


if __name__ == "__main__":
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  main()
