"""One impuTMAE pretraining step (forward, backward, clipped AdamW): JAX vs PyTorch eager.

    PYTHONPATH=. python -m benchmarks.mae_pretrain --torch-python /work/torchenv/bin/python
    PYTHONPATH=. python -m benchmarks.mae_pretrain --torch-python ... --dim 256 --depth 6 \
        --pathology-depth 4 --out benchmarks/results/mae_pretrain_paper_dims_cpu.json

The JAX side is the trainer's own step (`benchmarks.common.make_train_step`) for the
``pretrain`` stage of `survjax.models.imputmae` (``hide_modality = 0``): value_and_grad
of eq. 1-2 over the encoders and the decoder, global-norm clipping, AdamW, one
``jax.jit`` with parameters and optimiser state donated. The PyTorch side
(``--torch-worker``, numpy + torch only, run in the Python that has torch) is the same
encoder-decoder written as a PyTorch user would: per-modality linear patch embedding,
sinusoidal positions, CLS, pre-LN ``nn.TransformerEncoderLayer`` (GELU, no dropout),
MAE argsort masking of 50% of the patches, a multimodal decoder over the concatenated
modalities, per-modality linear heads, MSE on the masked patches, ``clip_grad_norm_``,
AdamW. Shapes are the default config's training batch: 32 patients, RNA and methylation
2048 values in 512-value patches, WSI bags of 16 patch features of 128, every modality
present. The default model is the config's (128-d, 2 encoder layers, decoder 3 layers);
the second command is Table 1's small variant (``:paper_dims``: 256-d, 6 layers for the
vectors, 4 for the WSI, decoder 256-d). Compile time is reported apart. Both sides are
built and warmed up in their own processes, then timed in alternating rounds (``--rounds``
of ``--repeats`` steps each, JAX first in even rounds, torch first in odd ones), so that
each round's ratio sees one state of a shared host: ``torch_over_jax_p50`` is the median
of the rounds' ratios (each round's p50 over its steps), ``jax_faster_rounds`` counts the
rounds JAX won, and ``jax.step`` / ``torch.step`` pool all rounds (p50 / p90 ms).
Results: README (generated from the JSON).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

SHAPES = {"batch": 32, "vector_dim": 2048, "patch": 512, "bag": 16, "bag_dim": 128}
CHAIN = 20   # matmuls per timed call of the matmul probe (amortises the call's dispatch)


def matmul_shapes(dim: int) -> list[tuple[int, int, int]]:
  """``(rows, k, n)`` of the step's main products: 288 rows (32 WSI bags of 8 kept
  patches + CLS) and 864 (the decoder's 32 x 27 tokens), times ``dim x dim`` (attention
  projections) and ``dim x 4 dim`` (the encoders' MLP)."""
  return [(r, dim, n) for r in (288, 864) for n in (dim, 4 * dim)]


def _probe(chain_fn, shapes) -> list[dict]:
  """GFLOP/s of ``chain_fn(m, k, n)`` (a callable running ``CHAIN`` dependent products of
  ``[m, k] x [k, n]`` and ``[m, n] x [n, k]``), median of 30 calls after 5."""
  import numpy as np
  out = []
  for m, k, n in shapes:
    f = chain_fn(m, k, n)
    for _ in range(5):
      f()
    ts = []
    for _ in range(30):
      t0 = time.perf_counter()
      f()
      ts.append(time.perf_counter() - t0)
    out.append({"shape": f"{m}x{k}x{n}",
                "gflops": 2 * m * k * n * CHAIN / float(np.median(ts)) / 1e9})
  return out


def _torch_worker(args) -> None:
  import numpy as np
  import torch
  from torch import nn
  torch.set_num_threads(args.threads)
  torch.manual_seed(0)
  # On a machine with a GPU both sides run on it (JAX takes its default device).
  device = "cuda" if torch.cuda.is_available() else "cpu"
  torch.set_default_device(device)
  sh, d, dd, heads = SHAPES, args.dim, args.dim, 4

  def sincos(n, dim):
    half = dim // 2
    freq = torch.exp(-math.log(10000.0) * torch.arange(half) / half)
    ang = torch.arange(1, n + 1)[:, None] * freq
    return torch.cat([torch.sin(ang), torch.cos(ang)], -1)

  def layer(width, mlp):
    return nn.TransformerEncoderLayer(width, heads, mlp, dropout=0.0, activation="gelu",
                                      batch_first=True, norm_first=True)

  class Encoder(nn.Module):
    def __init__(self, p, depth):
      super().__init__()
      self.embed = nn.Linear(p, d)
      self.cls = nn.Parameter(0.02 * torch.randn(1, 1, d))
      self.layers = nn.ModuleList([layer(d, 4 * d) for _ in range(depth)])
      self.norm = nn.LayerNorm(d)

    def forward(self, x, pos):
      h = self.embed(x) + (pos if pos is not None else 0)
      h = torch.cat([self.cls.expand(len(x), -1, -1), h], 1)
      for lyr in self.layers:
        h = lyr(h)
      return self.norm(h)

  mods = {"rna": (sh["patch"], sh["vector_dim"] // sh["patch"], True),
          "dnam": (sh["patch"], sh["vector_dim"] // sh["patch"], True),
          "pathology": (sh["bag_dim"], sh["bag"], False)}

  class MAE(nn.Module):
    def __init__(self):
      super().__init__()
      self.enc = nn.ModuleDict({m: Encoder(p, args.pathology_depth if m == "pathology"
                                           else args.depth) for m, (p, _, _) in mods.items()})
      self.proj = nn.ModuleDict({m: nn.Linear(d, dd) for m in mods})
      self.mask_token = nn.ParameterDict({m: nn.Parameter(0.02 * torch.randn(1, 1, dd))
                                          for m in mods})
      self.type_embed = nn.ParameterDict({m: nn.Parameter(0.02 * torch.randn(1, 1, dd))
                                          for m in mods})
      self.dec = nn.ModuleList([layer(dd, 2 * dd) for _ in range(args.decoder_depth)])
      self.norm = nn.LayerNorm(dd)
      self.out = nn.ModuleDict({m: nn.Linear(dd, p) for m, (p, _, _) in mods.items()})

    def forward(self, xs):
      seqs, info = [], []
      for m, (p, n, positional) in mods.items():
        x = xs[m]
        b = len(x)
        k = n - n // 2
        ids_shuffle = torch.argsort(torch.rand(b, n), 1)
        ids_restore = torch.argsort(ids_shuffle, 1)
        keep = ids_shuffle[:, :k]
        kept = torch.gather(x, 1, keep[..., None].expand(-1, -1, p))
        pos = sincos(n, d)[keep] if positional else None
        z = self.proj[m](self.enc[m](kept, pos))
        full = torch.cat([z[:, 1:], self.mask_token[m].expand(b, n - k, -1)], 1)
        full = torch.gather(full, 1, ids_restore[..., None].expand(-1, -1, dd))
        if positional:
          full = full + sincos(n, dd)
        seqs.append(torch.cat([z[:, :1], full], 1) + self.type_embed[m])
        info.append((m, n, ids_restore >= k))
      h = torch.cat(seqs, 1)
      for lyr in self.dec:
        h = lyr(h)
      h = self.norm(h)
      loss, start = 0.0, 0
      for m, n, masked in info:
        pred = self.out[m](h[:, start + 1:start + 1 + n])
        err = ((pred - xs[m]) ** 2).mean(-1)
        loss = loss + (err * masked).sum() / masked.sum()
        start += n + 1
      return loss

  model = MAE()
  opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-2)
  rng = np.random.default_rng(0)
  xs = {m: torch.tensor(rng.normal(size=(sh["batch"], n, p)), dtype=torch.float32)
        for m, (p, n, _) in mods.items()}

  def step():
    opt.zero_grad(set_to_none=True)
    loss = model(xs)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    return loss.detach().item()

  for _ in range(args.warmup):
    step()
  meta = {"framework": "torch-eager", "torch_version": torch.__version__, "device": device,
          "threads": args.threads, "params": sum(p.numel() for p in model.parameters())}
  print(json.dumps(meta), flush=True)
  for line in sys.stdin:   # one line per round: time `repeats` steps, answer with the times
    if not line.strip():
      break
    times = []
    for _ in range(args.repeats):
      t0 = time.perf_counter()
      step()
      times.append(time.perf_counter() - t0)
    print(json.dumps({"times_s": times}), flush=True)

  def torch_chain(m, k, n):
    a = torch.randn(m, k)
    b, c = 0.01 * torch.randn(k, n), 0.01 * torch.randn(n, k)

    def f():
      x = a
      for _ in range(CHAIN // 2):
        x = (x @ b) @ c
      if device == "cuda":
        torch.cuda.synchronize()
    return f

  print(json.dumps({"matmul": _probe(torch_chain, matmul_shapes(args.dim))}), flush=True)


def _jax_matmul_probe(dim: int) -> list[dict]:
  import jax
  import jax.numpy as jnp

  def jax_chain(m, k, n):
    a = jnp.ones((m, k))
    b, c = jnp.full((k, n), 0.01), jnp.full((n, k), 0.01)

    def g(x, b, c):
      for _ in range(CHAIN // 2):
        x = (x @ b) @ c
      return x
    f = jax.jit(g).lower(a, b, c).compile()
    return lambda: f(a, b, c).block_until_ready()
  return _probe(jax_chain, matmul_shapes(dim))


def _jax_side(args):
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax
  from flax import nnx

  from benchmarks import common
  from configs.imputmae import get_config
  from survjax.models import get_method

  c = get_config()
  c.model.dim = c.model.decoder.dim = args.dim
  c.model.depth.default = args.depth
  c.model.depth.pathology = args.pathology_depth
  c.model.decoder.depth = args.decoder_depth
  c.model.pretrain.hide_modality = 0.0
  method = get_method(c)
  sh = SHAPES
  info = {"rna": {"kind": "vector", "dim": sh["vector_dim"], "group_sizes": ()},
          "dnam": {"kind": "vector", "dim": sh["vector_dim"], "group_sizes": ()},
          "pathology": {"kind": "bag", "dim": sh["bag_dim"], "group_sizes": ()}}
  model = method.build(info, nnx.Rngs(0))
  rng = np.random.default_rng(0)
  b = sh["batch"]
  ones = np.ones(b, bool)
  batch = {"valid": ones, "labelled": ones, "index": np.arange(b, dtype=np.int32),
           "time": np.ones(b, np.float32), "event": np.zeros(b, np.float32),
           "bin": np.zeros(b, np.int32), "modalities": {
               "rna": {"x": rng.normal(size=(b, sh["vector_dim"])).astype(np.float32),
                       "available": ones},
               "dnam": {"x": rng.normal(size=(b, sh["vector_dim"])).astype(np.float32),
                        "available": ones},
               "pathology": {"x": rng.normal(size=(b, sh["bag"], sh["bag_dim"])).astype(
                   np.float16), "mask": np.ones((b, sh["bag"]), bool), "available": ones}}}
  batch = jax.tree.map(jnp.asarray, batch)
  stage = next(st for st in method.stages() if st.name == "pretrain")
  tx = stage.optimizer
  if not isinstance(tx, optax.GradientTransformation):
    tx = tx(1000)   # the schedule's length does not change the step's cost
  stage = dataclasses.replace(stage, optimizer=tx)
  graphdef, params, rest = nnx.split(model, stage.trainable, ...)
  opt = tx.init(params)
  compiled, compile_s = common.compile_timed(common.make_train_step(stage, graphdef),
                                             params, opt, rest, batch, jax.random.key(0))
  state = {"params": params, "opt": opt, "calls": 0}

  def round_times(n: int) -> list[float]:
    times = []
    for _ in range(n):
      key = jax.random.key(state["calls"])
      state["calls"] += 1
      t0 = time.perf_counter()
      state["params"], state["opt"], loss = compiled(state["params"], state["opt"], rest,
                                                     batch, key)
      jax.block_until_ready((state["params"], state["opt"], loss))
      times.append(time.perf_counter() - t0)
    return times

  round_times(args.warmup)
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else (cost or {})
  return {"framework": "jax-jit", "compile_s": compile_s, "params": n_params,
          "step_gflop": cost.get("flops", 0.0) / 1e9}, round_times


def _paired_rounds(args, jax_round, torch_cmd):
  """Alternating rounds (JAX then torch, then torch then JAX, ...) of ``repeats`` steps
  each, both models built and warm in their processes throughout: the per-round ratios
  see the same state of a shared host. Returns ``(jax_times, torch_meta, torch_times,
  rounds, reason)``."""
  import subprocess
  import numpy as np
  from benchmarks import common
  proc = subprocess.Popen(torch_cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)

  def answer():
    line = proc.stdout.readline()
    if not line:
      proc.wait(timeout=60)
      tail = proc.stderr.read().strip().splitlines()[-1:] or ["(no stderr)"]
      raise RuntimeError(f"torch worker exited {proc.returncode}: {tail[0][:300]}")
    return json.loads(line)

  jax_all, torch_all, rounds = [], [], []
  try:
    meta = answer()
    for k in range(args.rounds):
      order = ("jax", "torch") if k % 2 == 0 else ("torch", "jax")
      got = {}
      for side in order:
        if side == "jax":
          got["jax"] = jax_round(args.repeats)
        else:
          proc.stdin.write("go\n")
          proc.stdin.flush()
          got["torch"] = answer()["times_s"]
        time.sleep(0.2)   # let the side that just ran go idle (torch's OpenMP spins)
      j, t = (1e3 * float(np.median(got[x])) for x in ("jax", "torch"))
      common.log(f"round {k + 1} ({' then '.join(order)}): JAX {j:.1f} ms, torch {t:.1f} ms")
      rounds.append({"order": list(order), "jax_p50_ms": j, "torch_p50_ms": t,
                     "torch_over_jax": t / j})
      jax_all += got["jax"]
      torch_all += got["torch"]
    proc.stdin.write("\n")
    proc.stdin.flush()
    meta["matmul"] = answer()["matmul"]
    proc.wait(timeout=60)
    return jax_all, meta, torch_all, rounds, None
  except (RuntimeError, OSError, ValueError, subprocess.TimeoutExpired) as e:
    proc.kill()
    return jax_all, None, None, rounds, str(e)


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--torch-python", default=None)
  p.add_argument("--torch-worker", action="store_true", help=argparse.SUPPRESS)
  p.add_argument("--dim", type=int, default=128)
  p.add_argument("--depth", type=int, default=2)
  p.add_argument("--pathology-depth", type=int, default=None,
                 help="WSI encoder layers (default: --depth)")
  p.add_argument("--decoder-depth", type=int, default=3)
  p.add_argument("--repeats", type=int, default=8, help="steps per side per round")
  p.add_argument("--rounds", type=int, default=6, help="alternating JAX/torch rounds")
  p.add_argument("--warmup", type=int, default=3)
  p.add_argument("--threads", type=int, default=0)
  p.add_argument("--out", default="benchmarks/results/mae_pretrain_cpu.json")
  args = p.parse_args()
  if args.pathology_depth is None:
    args.pathology_depth = args.depth
  if args.torch_worker:
    _torch_worker(args)
    return
  from benchmarks import common
  args.threads = args.threads or common.num_cpu_threads()
  argv, command = iter(sys.argv[1:]), ["python", "-m", "benchmarks.mae_pretrain",
                                         "--torch-python=..."]
  for a in argv:   # the torch interpreter's path is this machine's, not the command's
    if a == "--torch-python":
      next(argv, None)
    elif not a.startswith("--torch-python="):
      command.append(a)
  result = {"benchmark": "mae_pretrain", "command": " ".join(command), "shapes": SHAPES,
            "model": {"dim": args.dim, "heads": 4, "encoder_depth": args.depth,
                      "pathology_encoder_depth": args.pathology_depth,
                      "decoder_depth": args.decoder_depth},
            "device": common.device_info(), "git": common.git_state()}
  jax_meta, jax_round = _jax_side(args)
  torch_py = common.torch_python(args.torch_python)
  result["torch"] = None
  if torch_py is None:
    result["jax"] = {**jax_meta, "step": common.summarize(jax_round(args.rounds * args.repeats))}
    result["torch_reason"] = "no --torch-python and no $SURVJAX_TORCH_PYTHON"
  else:
    cmd = [torch_py, str(Path(__file__).resolve()), "--torch-worker", "--dim", str(args.dim),
           "--depth", str(args.depth),
           "--pathology-depth", str(args.pathology_depth), "--decoder-depth", str(args.decoder_depth),
           "--repeats", str(args.repeats), "--warmup", str(args.warmup),
           "--threads", str(args.threads)]
    jax_times, torch_meta, torch_times, rounds, reason = _paired_rounds(args, jax_round, cmd)
    if reason is not None:
      jax_times = jax_times or jax_round(args.rounds * args.repeats)
    result["jax"] = {**jax_meta, "step": common.summarize(jax_times)}
    result["torch_reason"] = reason
    if reason is None:
      import numpy as np
      result["torch"] = {**torch_meta, "step": common.summarize(torch_times)}
      result["rounds"] = rounds
      ratios = [r["torch_over_jax"] for r in rounds]
      result["torch_over_jax_p50"] = float(np.median(ratios))
      result["jax_faster_rounds"] = f"{sum(x > 1 for x in ratios)} of {len(ratios)}"
  # The step's products alone, in each framework's own kernels (XLA:CPU: YNNPACK).
  result["jax"]["matmul"] = _jax_matmul_probe(args.dim)
  common.emit(args.out, result)


if __name__ == "__main__":
  sys.exit(main())
