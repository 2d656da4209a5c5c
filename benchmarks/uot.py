"""Batched unbalanced Sinkhorn (TTA's Together step): ott-jax vs POT vs PyTorch.

    python -m benchmarks.uot --torch-python /work/torchenv/bin/python
    # -> benchmarks/results/uot_<platform>.json

The problem of one TTA training batch: 32 patients x 4096 tokens x (32 prototypes +
a zero-cost dustbin), cost ``-log softmax`` of random logits (temperature 0.5 cosines),
``eps = 0.1``, hard uniform token marginal (``tau_a = 1``), KL-relaxed prototype marginal
(``tau_b = gamma / (gamma + eps)``, ``gamma = 1``), ``rho = 0.5``. Three solvers:

* ``ott_jax``: `survjax.ot.batched_plan` (ott-jax log-domain Sinkhorn, ``jax.vmap`` over
  patients), jitted; compilation timed apart from the runs.
* ``pot_loop``: POT's ``ot.unbalanced.sinkhorn_unbalanced`` (numpy float64, kernel-domain
  ``method="sinkhorn"``, ``reg_type="entropy"`` as ott's) looped over the patients,
  ``reg_m = (inf, gamma)``. (POT 0.9.7's ``sinkhorn_stabilized`` with ``reg_m = (inf, .)``
  stops after 3 checks with an all-zero plan here, so it is not used.)
* ``torch_batched``: a batched log-domain Sinkhorn in PyTorch written for this benchmark
  (same updates as ott's: ``f = eps log a - eps LSE((g - C)/eps)``, ``g = tau_b (eps log
  b - eps LSE((f - C)/eps))``), marginal error checked every 10 iterations.

Same stopping threshold (1e-3) for all three, on the token-marginal L1 error (ott, torch)
or POT's own criterion (relative change of the scalings: POT has no other); iteration
counts are reported. POT and torch run in ``--torch-python`` (a Python with torch and POT),
this file without jax there.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

B, N, K = 32, 4096, 32
EPS, GAMMA, RHO, THRESHOLD, MAX_ITERS = 0.1, 1.0, 0.5, 1e-3, 2000


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


def _summ(times):
  import numpy as np
  t = np.asarray(times) * 1e3
  return {"times_ms": [round(float(v), 3) for v in t], "p50_ms": float(np.percentile(t, 50)),
          "p90_ms": float(np.percentile(t, 90)), "repeats": int(t.size)}


def torch_worker(repeats: int) -> dict:
  """POT loop and the torch batched solver (runs in the torch interpreter)."""
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
  plan, iters = torch_solve(c, la, lb)  # warm-up
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    plan, iters = torch_solve(c, la, lb)
    times.append(time.perf_counter() - t0)
  torch_res = {**_summ(times), "iterations": iters,
               "row_marginal_l1_max": float((plan.sum(2) - 1.0 / N).abs().sum(1).max()),
               "dustbin_mass_mean": float(plan[..., -1].sum(1).mean()),
               "torch": torch.__version__, "threads": torch.get_num_threads()}

  def pot_all():
    plans, its = [], []
    for i in range(B):
      p, log = pot.unbalanced.sinkhorn_unbalanced(
          a.astype(np.float64), b.astype(np.float64), cost[i].astype(np.float64), EPS,
          (math.inf, GAMMA), method="sinkhorn", reg_type="entropy",
          numItermax=MAX_ITERS, stopThr=THRESHOLD, log=True)
      plans.append(p)
      its.append(len(log.get("err", [])))
    return np.stack(plans), its

  times = []
  for _ in range(max(1, repeats // 3)):
    t0 = time.perf_counter()
    pplan, its = pot_all()
    times.append(time.perf_counter() - t0)
  pot_res = {**_summ(times), "error_checks_per_patient_max": int(max(its)),
             "row_marginal_l1_max": float(np.abs(pplan.sum(2) - 1.0 / N).sum(1).max()),
             "dustbin_mass_mean": float(pplan[..., -1].sum(1).mean()),
             "max_abs_diff_vs_torch": float(np.abs(pplan - plan.numpy()).max()),
             "pot": pot.__version__}
  return {"pot_loop": pot_res, "torch_batched": torch_res}


def main(argv=None):
  ap = argparse.ArgumentParser()
  ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
  ap.add_argument("--repeats", type=int, default=5)
  ap.add_argument("--out", default=None)
  ap.add_argument("--torch-python", default=os.environ.get("SURVJAX_TORCH_PYTHON"))
  args = ap.parse_args(argv)
  if args.worker:
    print(json.dumps(torch_worker(args.repeats)))
    return

  import warnings
  warnings.filterwarnings("ignore", category=DeprecationWarning)
  import jax
  import jax.numpy as jnp
  import numpy as np

  from benchmarks import common
  from survjax import ot

  logits, cost, a, b = _problem(np)
  mask = jnp.ones((B, N), bool)
  fn = jax.jit(lambda l, m: ot.batched_plan(l, m, RHO, epsilon=EPS, gamma=GAMMA,
                                            threshold=THRESHOLD, max_iterations=MAX_ITERS))
  compiled, compile_s = common.compile_timed(fn, jnp.asarray(logits), mask)
  stats = common.time_calls(compiled, jnp.asarray(logits), mask, repeats=args.repeats)
  plan, converged = compiled(jnp.asarray(logits), mask)
  plan = np.asarray(plan)
  result = {
      "problem": {"patients": B, "tokens": N, "prototypes": K, "dustbin": True,
                  "epsilon": EPS, "gamma": GAMMA, "tau_b": GAMMA / (GAMMA + EPS),
                  "rho": RHO, "threshold": THRESHOLD, "max_iterations": MAX_ITERS},
      "ott_jax": {**stats, "compile_s": compile_s, "converged_all": bool(np.all(converged)),
                  "row_marginal_l1_max": float(np.abs(plan.sum(2) - 1.0 / N).sum(1).max()),
                  "dustbin_mass_mean": float(plan[..., -1].sum(1).mean())},
      "device": common.device_info(),
      "git": common.git_state(),
  }
  py = common.torch_python(args.torch_python)
  if py:
    common.log(f"running POT and torch in {py}")
    res, reason = common.run_json_subprocess(
        [py, os.path.abspath(__file__), "--worker", "--repeats", str(args.repeats)], 3600)
    result.update(res or {"torch_error": reason})
    if res:
      tb = res["torch_batched"]
      # Same problem, so the torch plan should match ott's to the solvers' tolerance.
      result["speedup_p50"] = {"pot_loop/ott_jax": res["pot_loop"]["p50_ms"] / stats["p50_ms"],
                               "torch_batched/ott_jax": tb["p50_ms"] / stats["p50_ms"]}
  else:
    result["torch_error"] = "no --torch-python (or $SURVJAX_TORCH_PYTHON)"
  common.emit(args.out or common.default_out("uot"), result)


if __name__ == "__main__":
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  main()
