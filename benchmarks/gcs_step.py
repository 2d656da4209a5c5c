"""PARACHUTE training step with and without Gradient Curvature Steering: JAX vs PyTorch eager.

    python -m benchmarks.gcs_step --torch-python /work/torchenv/bin/python
    # -> benchmarks/results/gcs_step_cpu.json

One step = forward, Cox loss, (GCS: feature gradient + P Hutchinson Hessian-vector
products), backward and AdamW update, batch of 32 patients (64 radiology slices of 64
dims, a 128-d pathology embedding), 64-d model. JAX: the method's own loss
(`survjax.models.parachute`), jitted; compile timed apart. PyTorch eager: the same
shapes and layers, GCS as in the public code (``autograd.grad(create_graph=True)``, one
double backward per probe, then ``f.backward(steered)`` and a detached hazard pass).
p50/p90 in milliseconds; torch runs in ``--torch-python`` when it is not importable here.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

B, N, DR, DP, D = 32, 64, 64, 128, 64
PROBES = (0, 1, 4, 16)   # 0 = no GCS


def _torch_worker(repeats: int, threads: int) -> dict:
  import time

  import torch
  from torch import nn
  torch.set_num_threads(threads)
  torch.manual_seed(0)

  def cross(d):
    return nn.ModuleDict(dict(nq=nn.LayerNorm(d), nk=nn.LayerNorm(d), nv=nn.LayerNorm(d),
                              att=nn.MultiheadAttention(d, 4, batch_first=True),
                              nf=nn.LayerNorm(d), ffn=nn.Sequential(
                                  nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))))

  def block(m, q, k, v):
    h = q + m["att"](m["nq"](q), m["nk"](k), m["nv"](v), need_weights=False)[0]
    return h + m["ffn"](m["nf"](h))

  class Net(nn.Module):
    def __init__(self):
      super().__init__()
      self.rad = nn.ModuleList([nn.Conv1d(DR, D, 3, padding=1), nn.Conv1d(D, D, 3, padding=1)])
      self.rnorm = nn.ModuleList([nn.LayerNorm(D), nn.LayerNorm(D)])
      self.fc_in = nn.Linear(DP, D)
      self.blocks = nn.ModuleList([nn.Sequential(nn.LayerNorm(D), nn.GELU(), nn.Linear(D, D))
                                   for _ in range(2)])
      self.pnorm = nn.LayerNorm(D)
      self.dce = nn.Sequential(nn.Linear(2, 32), nn.GELU(), nn.Linear(32, D))
      self.mhca = nn.ModuleList([cross(D) for _ in range(4)])
      self.onorm = nn.LayerNorm(D)
      self.hazard = nn.Sequential(nn.Linear(D, D), nn.ReLU(), nn.Linear(D, D), nn.ReLU(),
                                  nn.Linear(D, 1))

    def fuse(self, xr, mask, xp):
      h = xr.transpose(1, 2)
      for conv, norm in zip(self.rad, self.rnorm):
        h = norm(torch.relu(conv(h)).transpose(1, 2)).transpose(1, 2) * mask[:, None]
      hx = h.sum(-1) / mask.sum(-1, keepdim=True)
      hy = self.fc_in(xp)
      for blk in self.blocks:
        hy = hy + blk(hy)
      hy = self.pnorm(hy)
      s = torch.einsum("bi,bj->bij", nn.functional.normalize(hx, dim=1),
                       nn.functional.normalize(hy, dim=1)).flatten(1)
      e = self.dce(torch.stack([s.topk(16).values.mean(-1), (-s).topk(16).values.mean(-1)], -1))
      x, y, e = hx[:, None], hy[:, None], e[:, None]
      fv = block(self.mhca[0], x, y, x + y)
      fk = block(self.mhca[1], x, y, y)
      fq = block(self.mhca[2], y, x, x)
      return self.onorm(block(self.mhca[3], fq, fk, fv + e)[:, 0])

  def cox(risk, t, ev):
    order = torch.argsort(t, descending=True)
    r, e = risk[order], ev[order]
    return -((r - torch.logcumsumexp(r, 0)) * e).sum() / e.sum()

  net = Net()
  opt = torch.optim.AdamW(net.parameters(), 1e-3, weight_decay=1e-4)
  g = torch.Generator().manual_seed(0)
  xr, xp = torch.randn(B, N, DR, generator=g), torch.randn(B, DP, generator=g)
  mask = (torch.arange(N)[None] < torch.randint(8, N + 1, (B, 1), generator=g)).float()
  t, ev = torch.rand(B, generator=g), (torch.rand(B, generator=g) < 0.5).float()
  ev[0] = 1.0
  miss = (torch.rand(B, generator=g) < 0.3).float()

  def step(probes):
    opt.zero_grad()
    f = net.fuse(xr, mask, xp)
    loss = cox(net.hazard(f)[:, 0], t, ev)
    if not probes:
      loss.backward()
    else:
      gf = torch.autograd.grad(loss, f, create_graph=True)[0]
      c = 0.0
      for p in range(probes):
        r = torch.randint(0, 2, gf.shape, generator=g).float() * 2 - 1
        hv = torch.autograd.grad((gf * r).sum(), f, retain_graph=True)[0]
        c = c + (hv * r).sum(-1) / probes
      gd, cd = gf.detach(), c.detach()
      w = torch.sigmoid(cd + gd.norm(dim=1) + miss)
      steered = (1 - w[:, None]) * gd + w[:, None] * gd / (1 + cd.clamp(min=0)[:, None])
      f.backward(gradient=steered)
      cox(net.hazard(f.detach())[:, 0], t, ev).backward()
    opt.step()

  out = {"torch_version": torch.__version__, "threads": threads}
  for probes in PROBES:
    for _ in range(2):
      step(probes)
    times = []
    for _ in range(repeats):
      t0 = time.perf_counter()
      step(probes)
      times.append(time.perf_counter() - t0)
    times.sort()
    out[f"probes_{probes}"] = {"p50_ms": 1e3 * times[len(times) // 2],
                               "p90_ms": 1e3 * times[int(0.9 * (len(times) - 1))]}
  return out


def _jax_run(repeats: int) -> dict:
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax
  from flax import nnx

  from benchmarks.common import compile_timed, time_calls
  from configs import parachute as parachute_config
  from survjax.models import get_method

  info = {"radiology": {"kind": "bag", "dim": DR, "group_sizes": None},
          "pathology": {"kind": "vector", "dim": DP, "group_sizes": None}}
  rng = np.random.default_rng(0)
  lengths = rng.integers(8, N + 1, B)
  batch = {"valid": np.ones(B, bool), "labelled": np.ones(B, bool),
           "time": rng.random(B).astype(np.float32),
           "event": (rng.random(B) < 0.5).astype(np.float32),
           "modalities": {
               "radiology": {"x": rng.normal(size=(B, N, DR)).astype(np.float16),
                             "mask": np.arange(N)[None] < lengths[:, None],
                             "available": np.ones(B, bool)},
               "pathology": {"x": rng.normal(size=(B, DP)).astype(np.float32),
                             "available": np.ones(B, bool)}}}
  batch["event"][0] = 1.0
  batch = jax.tree.map(jnp.asarray, batch)
  out = {}
  for probes in PROBES:
    c = parachute_config.get_config("" if probes else "no_gcs")
    c.model.dim = D
    c.model.gcs.num_probes = max(probes, 1)
    method = get_method(c)
    graphdef, state = nnx.split(method.build(info, nnx.Rngs(0)))
    params = nnx.state(nnx.merge(graphdef, state), nnx.Param)
    tx = optax.adamw(1e-3, weight_decay=1e-4)
    loss_fn = method.stages()[0].loss_fn

    def step(params, opt_state, key, loss_fn=loss_fn, graphdef=graphdef, tx=tx):
      def f(p):
        return loss_fn(nnx.merge(graphdef, p), batch, key)[0]
      loss, grads = jax.value_and_grad(f)(params)
      updates, opt_state = tx.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state, loss

    opt_state = tx.init(params)
    compiled, compile_s = compile_timed(step, params, opt_state, jax.random.key(0))
    res = time_calls(compiled, repeats=repeats, warmup=2,
                     make_args=lambda i: (params, opt_state, jax.random.key(i)))
    out[f"probes_{probes}"] = dict(res, compile_s=compile_s)
  return out


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--out", default="benchmarks/results/gcs_step_cpu.json")
  p.add_argument("--repeats", type=int, default=30)
  p.add_argument("--torch-python", default=os.environ.get("SURVJAX_TORCH_PYTHON"))
  p.add_argument("--torch-worker", action="store_true", help=argparse.SUPPRESS)
  p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
  args = p.parse_args(argv)
  if args.torch_worker:
    print(json.dumps(_torch_worker(args.repeats, args.threads)))
    return
  from benchmarks.common import device_info, git_state, write_json
  result = {"benchmark": "gcs_step", "shapes": dict(batch=B, slices=N, radiology_dim=DR,
                                                     pathology_dim=DP, dim=D),
            "device": device_info(), "git": git_state(), "jax": _jax_run(args.repeats)}
  py = args.torch_python or sys.executable
  proc = subprocess.run([py, __file__, "--torch-worker", "--repeats", str(args.repeats),
                         "--threads", str(args.threads)], capture_output=True, text=True,
                        timeout=1800)
  if proc.returncode == 0:
    result["torch_eager"] = json.loads(proc.stdout.strip().splitlines()[-1])
  else:
    result["torch_eager"] = {"error": (proc.stderr.strip().splitlines() or ["?"])[-1]}
  write_json(args.out, result)
  print(json.dumps(result, indent=1))


if __name__ == "__main__":
  main()
