"""MUST's denoiser and DDIM sampler written as a PyTorch user would (eager), for comparison.

A standalone script (numpy + torch only, no survjax import) so that it runs in any Python
that has torch, e.g. a CPU-only venv beside the 3.12 one:

    python3 -m venv /tmp/torchvenv && /tmp/torchvenv/bin/pip install torch numpy
    /tmp/torchvenv/bin/python benchmarks/torch_reference.py --threads 2 [--params P.npz]

It prints one JSON object. `benchmarks/sampling_latency.py` runs it in-process when torch
imports there, otherwise as a subprocess (``--torch-python``).

The architecture and FLOPs are those of `survjax.diffusion.denoiser.ConditionalDenoiser`
(same tokens, pre-LN layers, tanh-GELU MLP, LayerNorm eps 1e-6, last layer computing only
the z position, zero-initialised read-out); attention uses
``torch.nn.functional.scaled_dot_product_attention``. The sampler is the usual Python loop
over the 50 DDIM steps under ``torch.inference_mode()``, timed two ways:

* ``batched``: the 5 samples of a patient (and the patients) in one batch;
* ``one_at_a_time``: the paper's description taken literally, one sample at a time
  (5 x 50 denoiser calls on a batch of one).

With ``--params`` (an ``.npz`` of weights in the torch ``state_dict`` layout, plus
``check/cond`` and ``check/z_init``) the weights are loaded and the deterministic
(eta = 0) samples of that input are returned, so the caller can check that both
implementations compute the same function.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

LN_EPS = 1e-6


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0):
  half = dim // 2
  freqs = torch.exp(-math.log(max_period)
                    * torch.arange(half, dtype=torch.float32, device=t.device) / half)
  args = t.float()[:, None] * freqs[None]
  emb = torch.cat([torch.sin(args), torch.cos(args)], dim=-1)
  if dim % 2:
    emb = F.pad(emb, (0, 1))
  return emb


class Layer(nn.Module):
  """Pre-LN transformer layer."""

  def __init__(self, dim, num_heads, mlp_ratio):
    super().__init__()
    self.num_heads = num_heads
    self.ln1 = nn.LayerNorm(dim, eps=LN_EPS)
    self.qkv = nn.Linear(dim, 3 * dim)
    self.proj = nn.Linear(dim, dim)
    self.ln2 = nn.LayerNorm(dim, eps=LN_EPS)
    self.fc1 = nn.Linear(dim, mlp_ratio * dim)
    self.fc2 = nn.Linear(mlp_ratio * dim, dim)

  def forward(self, x, first_only=False):
    b, l, d = x.shape
    h = self.num_heads
    qkv = self.qkv(self.ln1(x)).reshape(b, l, 3, h, d // h).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]  # [B, H, L, d_h]
    if first_only:
      q, x = q[:, :, :1], x[:, :1]
    out = F.scaled_dot_product_attention(q, k, v)
    x = x + self.proj(out.transpose(1, 2).reshape(b, q.shape[2], d))
    return x + self.fc2(F.gelu(self.fc1(self.ln2(x)), approximate="tanh"))


class Denoiser(nn.Module):
  """Transformer epsilon-predictor: tokens [z + e(t), cond_k + type_k]."""

  def __init__(self, dim=256, num_layers=4, num_heads=8, mlp_ratio=4, num_cond_tokens=2):
    super().__init__()
    self.dim = dim
    self.time_fc1 = nn.Linear(dim, dim)
    self.time_fc2 = nn.Linear(dim, dim)
    self.type_embed = nn.Parameter(0.02 * torch.randn(num_cond_tokens, dim))
    self.layers = nn.ModuleList(
        [Layer(dim, num_heads, mlp_ratio) for _ in range(num_layers)])
    self.ln_out = nn.LayerNorm(dim, eps=LN_EPS)
    self.out = nn.Linear(dim, dim)
    nn.init.zeros_(self.out.weight)
    nn.init.zeros_(self.out.bias)

  def forward(self, z, t, cond):
    temb = self.time_fc2(F.silu(self.time_fc1(timestep_embedding(t, self.dim))))
    x = torch.cat([(z + temb)[:, None], cond + self.type_embed[None]], dim=1)
    for i, layer in enumerate(self.layers):
      x = layer(x, first_only=(i == len(self.layers) - 1))
    return self.out(self.ln_out(x[:, 0]))


def linear_alphas_cumprod(T=1000, beta_start=1e-4, beta_end=0.02):  # noqa: N803
  betas = np.linspace(beta_start, beta_end, T, dtype=np.float64)
  return np.cumprod(1.0 - betas)


@torch.inference_mode()
def ddim_sample(model, cond, alphas_cumprod, num_steps=50, eta=0.0, num_samples=5,
                z_init=None, generator=None):
  """DDIM (Song et al. 2021) with a Python loop over the steps; samples batched.

  Returns (mean [B, D], samples [B, S, D]).
  """
  b, dim = cond.shape[0], cond.shape[-1]
  T = len(alphas_cumprod)  # noqa: N806
  skip = T // num_steps
  seq = list(range(0, T, skip))[:num_steps]
  cond = cond.repeat_interleave(num_samples, dim=0)
  if z_init is None:
    z = torch.randn(b * num_samples, dim, generator=generator, device=cond.device)
  else:
    z = z_init.reshape(b * num_samples, dim).clone()
  for t in reversed(seq):
    a_t = float(alphas_cumprod[t])
    a_prev = float(alphas_cumprod[t - skip]) if t - skip >= 0 else 1.0
    eps = model(z, torch.full((z.shape[0],), t, dtype=torch.long, device=z.device), cond)
    z0 = (z - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)
    sigma = eta * math.sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))
    z = math.sqrt(a_prev) * z0 + math.sqrt(max(1 - a_prev - sigma**2, 0.0)) * eps
    if eta > 0:
      z = z + sigma * torch.randn(z.shape, generator=generator, device=z.device)
  samples = z.reshape(b, num_samples, dim)
  return samples.mean(1), samples


@torch.inference_mode()
def ddim_sample_one_at_a_time(model, cond, alphas_cumprod, num_steps=50, eta=0.0,
                              num_samples=5, generator=None):
  """The same, one patient and one sample at a time (num_samples x num_steps calls)."""
  out = []
  for p in range(cond.shape[0]):
    per = [ddim_sample(model, cond[p:p + 1], alphas_cumprod, num_steps, eta, 1,
                       generator=generator)[1][0, 0] for _ in range(num_samples)]
    out.append(torch.stack(per))
  samples = torch.stack(out)
  return samples.mean(1), samples


def _time(fn, repeats, warmup=1, device="cpu"):
  """Wall times of ``fn()``; on CUDA each call ends with a device synchronisation."""
  sync = torch.cuda.synchronize if str(device).startswith("cuda") else (lambda: None)
  times = []
  for i in range(warmup + repeats):
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    if i >= warmup:
      times.append(time.perf_counter() - t0)
  t = np.asarray(times) * 1e3
  return {"p50_ms": float(np.percentile(t, 50)), "p90_ms": float(np.percentile(t, 90)),
          "min_ms": float(t.min()), "mean_ms": float(t.mean()), "repeats": int(t.size)}


def run(params=None, *, threads=None, repeats=10, one_at_a_time_repeats=3,
        batch_sizes=(1,), max_seconds=60.0, num_steps=50, num_samples=5, dim=256,
        num_layers=4, num_heads=8, mlp_ratio=4, num_cond_tokens=2, device="cpu"):
  """Times the torch sampler; returns a JSON-able dict.

  Args:
    params: optional dict of numpy arrays: the state_dict (torch layout) plus
      ``check/cond`` ``[B, K, D]`` and ``check/z_init`` ``[B, S, D]``.
    threads: ``torch.set_num_threads`` (default: torch's own choice).
    repeats: timed repeats of the batched sampler at batch 1.
    one_at_a_time_repeats: timed repeats of the one-sample-at-a-time sampler.
    batch_sizes: patients per call for the throughput sweep (batched sampler).
    max_seconds: time budget of the sweep; larger batches are skipped past it.
    num_steps, num_samples, dim, num_layers, num_heads, mlp_ratio, num_cond_tokens:
      the sampler and denoiser configuration.
    device: ``"cpu"`` or ``"cuda"``. On CUDA, float32 matmuls may use TF32
      (``torch.set_float32_matmul_precision("high")``), which is what JAX's default
      precision does for float32 on Ampere and Hopper; recorded as ``matmul_precision``.
  """
  if threads:
    torch.set_num_threads(int(threads))
  cuda = str(device).startswith("cuda")
  if cuda:
    torch.set_float32_matmul_precision("high")
  torch.manual_seed(0)
  model = Denoiser(dim, num_layers, num_heads, mlp_ratio, num_cond_tokens).eval()
  result = {"torch_version": torch.__version__, "threads": torch.get_num_threads(),
            "python": sys.version.split()[0], "device": str(device),
            "matmul_precision": torch.get_float32_matmul_precision()}
  if cuda:
    result["device_name"] = torch.cuda.get_device_name()
  check = None
  if params is not None:
    sd = {k: torch.from_numpy(np.array(v, copy=True)) for k, v in params.items()
          if not k.startswith("check/")}
    model.load_state_dict(sd, strict=True)
    if "check/cond" in params:
      check = (torch.from_numpy(np.array(params["check/cond"], np.float32)),
               torch.from_numpy(np.array(params["check/z_init"], np.float32)))
  else:
    nn.init.normal_(model.out.weight, std=0.02)
  model = model.to(device)
  ab = linear_alphas_cumprod()
  gen = torch.Generator(device=device).manual_seed(0)
  cond1 = torch.randn(1, num_cond_tokens, dim, generator=gen, device=device)

  if check is not None:
    _, s = ddim_sample(model, check[0].to(device), ab, num_steps, 0.0, check[1].shape[1],
                       z_init=check[1].to(device))
    result["check_samples"] = s.cpu().numpy().tolist()

  result["batch1_batched"] = _time(
      lambda: ddim_sample(model, cond1, ab, num_steps, 0.0, num_samples, generator=gen),
      repeats, device=device)
  result["batch1_one_at_a_time"] = _time(
      lambda: ddim_sample_one_at_a_time(model, cond1, ab, num_steps, 0.0, num_samples,
                                        generator=gen), one_at_a_time_repeats, device=device)
  sweep, skipped = [], []
  t_start = time.perf_counter()
  per_patient_s = result["batch1_batched"]["p50_ms"] * 1e-3
  for b in batch_sizes:
    n_rep = 3
    est = per_patient_s * b * (n_rep + 1)
    if time.perf_counter() - t_start + est > max_seconds:
      skipped.append({"batch": b, "reason": f"estimated {est:.0f} s exceeds the "
                      f"{max_seconds:.0f} s budget of the torch sweep"})
      continue
    cond = torch.randn(b, num_cond_tokens, dim, generator=gen, device=device)
    stats = _time(lambda: ddim_sample(model, cond, ab, num_steps, 0.0, num_samples,
                                      generator=gen), n_rep, device=device)
    stats["batch"] = b
    stats["patients_per_s"] = b / (stats["p50_ms"] * 1e-3)
    per_patient_s = stats["p50_ms"] * 1e-3 / b
    sweep.append(stats)
  result["sweep"] = sweep
  result["sweep_skipped"] = skipped
  result["matmul_gflops_per_s"] = chained_matmul_rates(device)
  return result


CHAINED_ROWS = (15, 240, 960)   # one denoiser call's rows at batch 1, 16 and 64 (15 each)


def chained_matmul_rates(device="cpu", n=256, chain=20, repeats=30) -> dict:
  """GFLOP/s of ``[m, n] @ [n, n]`` for ``m`` in `CHAINED_ROWS`, ``chain`` dependent
  products per call (the kernel's own rate: no per-call dispatch), p50 of ``repeats``."""
  out = {}
  for m in CHAINED_ROWS:
    a = torch.randn(m, n, device=device)
    b = torch.randn(n, n, device=device) / n ** 0.5

    def products(a=a, b=b):
      x = a
      for _ in range(chain):
        x = x @ b
      return x
    stats = _time(products, repeats, warmup=3, device=device)
    out[f"{m}x{n}x{n}_chained{chain}"] = 2.0 * m * n * n * chain / (stats["p50_ms"] * 1e-3) / 1e9
  return out


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--params", help=".npz of weights (torch state_dict layout) + check/*")
  p.add_argument("--threads", type=int, default=None)
  p.add_argument("--repeats", type=int, default=10)
  p.add_argument("--one-at-a-time-repeats", type=int, default=3)
  p.add_argument("--batch-sizes", default="1", help="comma-separated")
  p.add_argument("--max-seconds", type=float, default=60.0)
  p.add_argument("--device", default="cpu", help="cpu or cuda")
  a = p.parse_args(argv)
  params = dict(np.load(a.params)) if a.params else None
  res = run(params, threads=a.threads, repeats=a.repeats,
            one_at_a_time_repeats=a.one_at_a_time_repeats,
            batch_sizes=[int(x) for x in a.batch_sizes.split(",") if x],
            max_seconds=a.max_seconds, device=a.device)
  json.dump(res, sys.stdout)
  sys.stdout.write("\n")


if __name__ == "__main__":
  main()
