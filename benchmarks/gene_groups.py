"""Training step of the genomic group tokenizer against the number of gene groups.

    PYTHONPATH=. python -m benchmarks.gene_groups                 # ~10 min on 2 cores
    PYTHONPATH=. python -m benchmarks.gene_groups --quick --out /tmp/g.json   # ~1 min

One JSON (default ``benchmarks/results/gene_groups_<platform>.json``). For 6, 50, 331 and
1000 gene groups (and 600 groups of one column: one token per gene of an RNA panel, the
case that did not compile in 10 minutes), a training step of

    tokens = GroupTokenizer(x)            [B, G, dim]   (hidden 256, dim 256, dropout 0.25)
    risk   = w . mean_g(tokens)           [B]
    loss   = mean((risk - y)^2)

(``value_and_grad`` + AdamW, one ``jax.jit`` with parameters and optimiser state donated,
as the trainer runs a step), batch ``--batch`` (32), with

* ``stacked``: `survjax.nn.genomic.GroupTokenizer` (groups stacked: one einsum per size
  bucket for layer 1, one for layer 2);
* ``per_group``: the implementation it replaced, one `SNN` per group in a Python loop
  (copied below), so XLA sees one subgraph per group.

Group sizes: 6 groups = the embedded cohort's gene families (48, 64, 40, 32, 56, 24
columns); the other counts draw sizes uniformly in [1, 64] (seed 0), as pathway
signatures of varied length. Each (implementation, groups) runs in a fresh subprocess
with a wall-clock budget (``--budget``, default 300 s: construction + compile + steps);
a run past it is killed and reported as not finished, and the per-group implementation
is not tried at larger counts once one has not finished (``skipped`` says so).

Per row: construction time (parameter init), compile time (``lower().compile()``), step
time p50/p90 (one warm-up, then up to ``--repeats`` steps within 20 s, at least 2), peak
host memory of the process (VmHWM: after construction, after compiling, during the
steps; method in ``memory_method``) and XLA's ``memory_analysis`` of the step.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks import common

FULL_GROUPS = (6, 50, 331, 1000)
QUICK_GROUPS = (6, 50)
MUST_FAMILIES = (48, 64, 40, 32, 56, 24)


def group_sizes(num: int, ones: bool = False) -> tuple[int, ...]:
  """The row's column counts (see the module docstring)."""
  if ones:
    return (1,) * num
  if num == len(MUST_FAMILIES):
    return MUST_FAMILIES
  return tuple(int(s) for s in np.random.default_rng(0).integers(1, 65, num))


def _per_group_tokenizer():
  """The GroupTokenizer before the groups were stacked: one SNN per group."""
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from survjax.nn.core import split_key
  from survjax.nn.genomic import SNN

  class PerGroupTokenizer(nnx.Module):

    def __init__(self, group_sizes, dim, *, rngs, hidden=256, dropout=0.25):
      self.group_sizes = tuple(group_sizes)
      self.encoders = nnx.List([
          SNN(size, hidden, 2, dropout, rngs=rngs, out_dim=dim) for size in group_sizes])

    def __call__(self, x, key=None):
      keys = split_key(key, len(self.group_sizes))
      tokens, start = [], 0
      for size, enc, k in zip(self.group_sizes, self.encoders, keys):
        tokens.append(enc(x[..., start:start + size], key=k))
        start += size
      return jnp.stack(tokens, axis=-2)

  del jax
  return PerGroupTokenizer


def worker(spec: dict) -> dict:
  """One measurement in this (fresh) process."""
  import jax
  import jax.numpy as jnp
  import optax
  from flax import nnx

  from survjax.nn.genomic import GroupTokenizer

  sizes, dim, batch = tuple(spec["sizes"]), spec["dim"], spec["batch"]
  cls = GroupTokenizer if spec["impl"] == "stacked" else _per_group_tokenizer()
  mem_start = common.memory_mb()
  t0 = time.perf_counter()
  tok = cls(sizes, dim, rngs=nnx.Rngs(0), hidden=spec["hidden"])
  head = jax.random.normal(jax.random.key(1), (dim,)) / np.sqrt(dim)
  jax.block_until_ready(nnx.state(tok))
  construct_s = time.perf_counter() - t0
  graphdef, params = nnx.split(tok)
  tx = optax.adamw(1e-4, weight_decay=1e-5)
  opt_state = tx.init(params)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((batch, sum(sizes)), np.float32))
  y = jnp.asarray(rng.standard_normal((batch,), np.float32))
  mem_built = common.memory_mb()

  def step(params, opt_state, x, y, key):
    def loss_of(p):
      tokens = nnx.merge(graphdef, p)(x, key=key)
      return jnp.mean((jnp.mean(tokens, axis=-2) @ head - y) ** 2)

    loss, grads = jax.value_and_grad(loss_of)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  jitted = jax.jit(step, donate_argnums=(0, 1))
  t0 = time.perf_counter()
  lowered = jitted.lower(params, opt_state, x, y, jax.random.key(0))
  lower_s = time.perf_counter() - t0
  compiled = lowered.compile()
  compile_s = time.perf_counter() - t0
  mem_compiled = common.memory_mb()
  common.reset_peak_memory()
  times, t_start = [], time.perf_counter()
  for i in range(1 + spec["repeats"]):
    t1 = time.perf_counter()
    params, opt_state, loss = compiled(params, opt_state, x, y, jax.random.key(i))
    jax.block_until_ready((params, opt_state, loss))
    if i:
      times.append(time.perf_counter() - t1)
    if len(times) >= 2 and time.perf_counter() - t_start > spec["step_seconds"]:
      break
  mem_run = common.memory_mb()
  n_params = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(params))
  hlo_lines = lowered.as_text().count("\n")
  analysis = None
  try:
    m = compiled.memory_analysis()
    analysis = {k.replace("_in_bytes", "_mb"): getattr(m, k) / 2**20
                for k in ("temp_size_in_bytes", "argument_size_in_bytes",
                          "output_size_in_bytes") if hasattr(m, k)}
  except Exception:  # noqa: BLE001 - not every backend implements it
    pass
  return {
      "impl": spec["impl"],
      "construct_s": construct_s,
      "trace_lower_s": lower_s,
      "compile_s": compile_s,
      "step": common.summarize(times),
      "last_loss": float(loss),
      "params": n_params,
      "stablehlo_lines": hlo_lines,
      "memory_mb": {"start_rss": mem_start.get("rss_mb"),
                    "peak_after_construction": mem_built.get("peak_mb"),
                    "peak_after_compile": mem_compiled.get("peak_mb"),
                    "peak_during_steps": mem_run.get("peak_mb")},
      "xla_memory_analysis": analysis,
  }


def _measure(spec: dict, budget: float) -> dict:
  cmd = [sys.executable, "-m", "benchmarks.gene_groups", "--worker", json.dumps(spec)]
  env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent))
  t0 = time.perf_counter()
  res, reason = common.run_json_subprocess(cmd, budget, env=env)
  wall = time.perf_counter() - t0
  if res is None:
    return {"impl": spec["impl"], "finished": False, "reason": reason, "wall_s": wall}
  res.update(finished=True, wall_s=wall)
  return res


def _line(n, sizes, r) -> str:
  if not r.get("finished"):
    return f"  {n:5d} groups ({sum(sizes)} cols) {r['impl']:9s}: {r.get('reason')}"
  return (f"  {n:5d} groups ({sum(sizes)} cols) {r['impl']:9s}: compile {r['compile_s']:7.2f} s, "
          f"step p50 {r['step']['p50_ms']:8.1f} ms, peak {r['memory_mb']['peak_after_compile']:6.0f}"
          f" MB, construct {r['construct_s']:.1f} s")


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--out", default=None,
                 help="JSON path (default benchmarks/results/gene_groups_<platform>.json)")
  p.add_argument("--quick", action="store_true", help="6 and 50 groups, small widths")
  p.add_argument("--groups", default=None, help="comma-separated group counts")
  p.add_argument("--ones", default=None,
                 help="comma-separated counts of one-column groups (default 600)")
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--hidden", type=int, default=None, help="SNN hidden width (256)")
  p.add_argument("--dim", type=int, default=None, help="token width (256)")
  p.add_argument("--repeats", type=int, default=None, help="timed steps (10, quick 3)")
  p.add_argument("--budget", type=float, default=None,
                 help="seconds per (implementation, groups) run (300, quick 60)")
  p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.worker:
    print(json.dumps(worker(json.loads(args.worker)), default=common._json_default))
    return 0

  q = args.quick
  groups = tuple(int(g) for g in args.groups.split(",") if g) if args.groups else (
      QUICK_GROUPS if q else FULL_GROUPS)
  ones = tuple(int(g) for g in args.ones.split(",") if g) if args.ones is not None else (
      () if q else (600,))
  hidden = args.hidden or (32 if q else 256)
  dim = args.dim or (32 if q else 256)
  repeats = args.repeats or (3 if q else 10)
  budget = args.budget or (60.0 if q else 300.0)
  out_path = args.out or common.default_out("gene_groups")
  t_run = time.perf_counter()
  info = common.device_info()
  common.log(f"device: {info['device_kind']} ({info['platform']}), {info['cpu_model']}, "
             f"{info['cpu_threads']} threads, load {info['load_average_1min']}")
  matmul_start = common.matmul_gflops(1024, repeats=10)
  common.log(f"float32 matmul: {matmul_start:.0f} GFLOP/s (1024^3)")

  rows, skipped, old_failed_at = [], [], None
  cases = [(n, False) for n in groups] + [(n, True) for n in ones]
  for n, one in sorted(cases, key=lambda c: (c[0], c[1])):
    sizes = group_sizes(n, one)
    row = {"groups": n, "columns": int(sum(sizes)), "one_column_groups": one,
           "distinct_sizes": len(set(sizes)), "max_size": max(sizes)}
    spec = dict(sizes=sizes, dim=dim, hidden=hidden, batch=args.batch, repeats=repeats,
                step_seconds=5.0 if q else 20.0)
    row["stacked"] = _measure(dict(spec, impl="stacked"), budget)
    common.log(_line(n, sizes, row["stacked"]))
    if old_failed_at is not None and n > old_failed_at:
      row["per_group"] = {"impl": "per_group", "finished": False,
                          "reason": f"skipped: did not finish within {budget:.0f} s at "
                                    f"{old_failed_at} groups"}
      skipped.append(f"per_group at {n} groups ({sum(sizes)} columns)")
    else:
      row["per_group"] = _measure(dict(spec, impl="per_group"), budget)
      if not row["per_group"]["finished"]:
        old_failed_at = n if old_failed_at is None else min(old_failed_at, n)
    common.log(_line(n, sizes, row["per_group"]))
    s, o = row["stacked"], row["per_group"]
    if s.get("finished") and o.get("finished"):
      row["per_group_over_stacked"] = {
          "compile": o["compile_s"] / s["compile_s"],
          "step_p50": o["step"]["p50_ms"] / s["step"]["p50_ms"],
          "peak_after_compile_mb": (o["memory_mb"]["peak_after_compile"]
                                    / s["memory_mb"]["peak_after_compile"])}
    rows.append(row)
  matmul_end = common.matmul_gflops(1024, repeats=10)
  result = {
      "benchmark": "gene_groups",
      "mode": "quick" if q else "full",
      "command": " ".join([Path(sys.executable).name, "-m", "benchmarks.gene_groups",
                           *(argv if argv is not None else sys.argv[1:])]),
      "device": info,
      "git": common.git_state(),
      "matmul_gflops_per_s": {"1024x1024x1024_start": matmul_start,
                              "1024x1024x1024_end": matmul_end},
      "setup": {"batch": args.batch, "hidden": hidden, "dim": dim, "dropout": 0.25,
                "optimizer": "adamw", "repeats": repeats, "budget_s": budget,
                "sizes": "6 groups: the embedded cohort's gene families; others uniform "
                         "in [1, 64] (numpy default_rng(0)); one_column_groups: all 1"},
      "rows": rows,
      "skipped": skipped,
      "memory_method": common.MEMORY_METHOD.replace(
          "before the input exists", "with the inputs and optimiser state") +
          " peak_after_compile includes construction; peak_during_steps is read after "
          "resetting the peak once compiling is done.",
      "total_s": time.perf_counter() - t_run,
      "load_average_1min_end": os.getloadavg()[0],
      "note": "shared 2-core machine: compare the two implementations within a row",
  }
  common.emit(out_path, result)
  return 0


if __name__ == "__main__":
  sys.exit(main())
