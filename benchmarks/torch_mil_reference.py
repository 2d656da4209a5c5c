"""TransMIL and CLAM's gated ABMIL written as their official PyTorch code, for comparison.

A standalone script (numpy + torch only, no survjax import) so that it runs in any Python
that has torch, e.g. the CPU-only venv beside the 3.12 one:

    python3 -m venv /tmp/torchvenv && /tmp/torchvenv/bin/pip install torch numpy
    /tmp/torchvenv/bin/python benchmarks/torch_mil_reference.py --model transmil --n 10000

One call = one measurement in a fresh process (so that its peak memory is its own): build
the model, time its eager forward on one bag ``[1, n, in_dim]`` under
``torch.inference_mode()`` and print one JSON line (p50/p90 in ms, peak resident memory).
`benchmarks/train_throughput.py` runs it once per bag size.

The models (the classifier heads are left out, as in survjax's encoders):

* ``transmil``: ``TransMIL.py`` of Shao et al. (NeurIPS 2021): ``fc = Linear + ReLU``,
  the bag laid out on a ``ceil(sqrt(n))^2`` square by appending its first tokens again,
  a class token, ``TransLayer`` (``x + NystromAttention(LayerNorm(x))`` with lucidrains'
  ``nystrom_attention``: 8 heads of ``dim / 8``, ``dim / 2`` landmarks, 6 pseudo-inverse
  iterations, residual value convolution of kernel 33, front zero-padding of the
  sequence to a multiple of the landmarks), ``PPEG`` (three depthwise ``Conv2d`` 7/5/3
  plus identity), a second ``TransLayer`` and ``LayerNorm``; output the class token.
  The only addition is ``--pinv-norm per_matrix`` (default ``global``, lucidrains'):
  the pseudo-inverse's initial scaling per head instead of over the whole batch, as
  survjax does; used only by the numeric check.
* ``abmil``: CLAM's ``CLAM_SB`` attention pooling (``size = [in_dim, dim, dim / 2]``):
  ``h = ReLU(Linear(x))``, ``Attn_Net_Gated`` (``tanh(V h) * sigmoid(U h)``, ``w``),
  softmax over the instances, ``M = A h``; output ``M``.

With ``--params`` (an ``.npz`` in the ``state_dict`` layout) the weights are loaded, and
with ``--check-input`` (an ``.npy`` bag ``[n, in_dim]``) the model's output on that bag
is returned as ``check_output`` for comparison.
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

# ---- memory ---------------------------------------------------------------------------------


def memory_mb():
  """Current and peak resident memory of this process (MiB), from /proc/self/status."""
  out = {}
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith(("VmHWM:", "VmRSS:")):
          out["peak_mb" if line.startswith("VmHWM") else "rss_mb"] = int(line.split()[1]) / 1024
  except OSError:
    import resource
    out["peak_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  return out


def reset_peak_memory():
  try:
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")
    return True
  except OSError:
    return False


# ---- lucidrains' nystrom_attention (the version TransMIL imports) ---------------------------


def moore_penrose_iter_pinv(x, iters=6, per_matrix=False):
  abs_x = torch.abs(x)
  col = abs_x.sum(dim=-1)
  row = abs_x.sum(dim=-2)
  if per_matrix:  # survjax's choice (see the module docstring); not in the reference
    scale = col.amax(-1)[..., None, None] * row.amax(-1)[..., None, None]
  else:
    scale = torch.max(col) * torch.max(row)
  z = x.transpose(-1, -2) / scale
  eye = torch.eye(x.shape[-1], device=x.device)[None]
  for _ in range(iters):
    xz = x @ z
    z = 0.25 * z @ (13 * eye - (xz @ (15 * eye - (xz @ (7 * eye - xz)))))
  return z


class NystromAttention(nn.Module):
  def __init__(self, dim, dim_head=64, heads=8, num_landmarks=256, pinv_iterations=6,
               residual=True, residual_conv_kernel=33, eps=1e-8, dropout=0.0,
               per_matrix_pinv=False):
    super().__init__()
    self.eps = eps
    inner_dim = heads * dim_head
    self.num_landmarks = num_landmarks
    self.pinv_iterations = pinv_iterations
    self.per_matrix_pinv = per_matrix_pinv
    self.heads = heads
    self.scale = dim_head ** -0.5
    self.to_qkv = nn.Linear(dim, inner_dim * 3, bias=False)
    self.to_out = nn.Sequential(nn.Linear(inner_dim, dim), nn.Dropout(dropout))
    self.residual = residual
    if residual:
      kernel_size = residual_conv_kernel
      padding = residual_conv_kernel // 2
      self.res_conv = nn.Conv2d(heads, heads, (kernel_size, 1), padding=(padding, 0),
                                groups=heads, bias=False)

  def forward(self, x):
    b, n, _ = x.shape
    h, m, iters = self.heads, self.num_landmarks, self.pinv_iterations
    remainder = n % m
    if remainder > 0:
      padding = m - (n % m)
      x = F.pad(x, (0, 0, padding, 0), value=0)
    q, k, v = self.to_qkv(x).chunk(3, dim=-1)
    q, k, v = (t.reshape(b, t.shape[1], h, -1).transpose(1, 2) for t in (q, k, v))
    q = q * self.scale
    l = math.ceil(n / m)  # noqa: E741
    q_landmarks = q.reshape(b, h, m, l, -1).sum(dim=-2)
    k_landmarks = k.reshape(b, h, m, l, -1).sum(dim=-2)
    q_landmarks = q_landmarks / l
    k_landmarks = k_landmarks / l
    sim1 = q @ k_landmarks.transpose(-1, -2)
    sim2 = q_landmarks @ k_landmarks.transpose(-1, -2)
    sim3 = q_landmarks @ k.transpose(-1, -2)
    attn1, attn2, attn3 = (t.softmax(dim=-1) for t in (sim1, sim2, sim3))
    attn2_inv = moore_penrose_iter_pinv(attn2, iters, self.per_matrix_pinv)
    out = (attn1 @ attn2_inv) @ (attn3 @ v)
    if self.residual:
      out = out + self.res_conv(v)
    out = out.transpose(1, 2).reshape(b, -1, h * out.shape[-1])
    out = self.to_out(out)
    return out[:, -n:]


# ---- TransMIL (official TransMIL.py) --------------------------------------------------------


class TransLayer(nn.Module):
  def __init__(self, dim=512, num_landmarks=None, per_matrix_pinv=False):
    super().__init__()
    self.norm = nn.LayerNorm(dim)
    self.attn = NystromAttention(dim=dim, dim_head=dim // 8, heads=8,
                                 num_landmarks=num_landmarks or dim // 2, pinv_iterations=6,
                                 residual=True, dropout=0.1, per_matrix_pinv=per_matrix_pinv)

  def forward(self, x):
    return x + self.attn(self.norm(x))


class PPEG(nn.Module):
  def __init__(self, dim=512):
    super().__init__()
    self.proj = nn.Conv2d(dim, dim, 7, 1, 7 // 2, groups=dim)
    self.proj1 = nn.Conv2d(dim, dim, 5, 1, 5 // 2, groups=dim)
    self.proj2 = nn.Conv2d(dim, dim, 3, 1, 3 // 2, groups=dim)

  def forward(self, x, H, W):  # noqa: N803
    B, _, C = x.shape  # noqa: N806
    cls_token, feat_token = x[:, 0], x[:, 1:]
    cnn_feat = feat_token.transpose(1, 2).view(B, C, H, W)
    x = self.proj(cnn_feat) + cnn_feat + self.proj1(cnn_feat) + self.proj2(cnn_feat)
    x = x.flatten(2).transpose(1, 2)
    return torch.cat((cls_token.unsqueeze(1), x), dim=1)


class TransMIL(nn.Module):
  def __init__(self, in_dim=1024, dim=512, num_landmarks=None, per_matrix_pinv=False):
    super().__init__()
    self.pos_layer = PPEG(dim=dim)
    self._fc1 = nn.Sequential(nn.Linear(in_dim, dim), nn.ReLU())
    self.cls_token = nn.Parameter(torch.randn(1, 1, dim))
    self.layer1 = TransLayer(dim=dim, num_landmarks=num_landmarks,
                             per_matrix_pinv=per_matrix_pinv)
    self.layer2 = TransLayer(dim=dim, num_landmarks=num_landmarks,
                             per_matrix_pinv=per_matrix_pinv)
    self.norm = nn.LayerNorm(dim)

  def forward(self, data):
    h = data.float()  # [B, n, in_dim]
    h = self._fc1(h)
    H = h.shape[1]  # noqa: N806
    _H, _W = int(np.ceil(np.sqrt(H))), int(np.ceil(np.sqrt(H)))  # noqa: N806
    add_length = _H * _W - H
    h = torch.cat([h, h[:, :add_length, :]], dim=1)
    B = h.shape[0]  # noqa: N806
    cls_tokens = self.cls_token.expand(B, -1, -1)
    h = torch.cat((cls_tokens, h), dim=1)
    h = self.layer1(h)
    h = self.pos_layer(h, _H, _W)
    h = self.layer2(h)
    return self.norm(h)[:, 0]


# ---- CLAM's gated attention pooling ---------------------------------------------------------


class Attn_Net_Gated(nn.Module):  # noqa: N801
  def __init__(self, L=1024, D=256, n_classes=1):  # noqa: N803
    super().__init__()
    self.attention_a = nn.Sequential(nn.Linear(L, D), nn.Tanh())
    self.attention_b = nn.Sequential(nn.Linear(L, D), nn.Sigmoid())
    self.attention_c = nn.Linear(D, n_classes)

  def forward(self, x):
    a = self.attention_a(x)
    b = self.attention_b(x)
    A = a.mul(b)  # noqa: N806
    return self.attention_c(A), x


class GatedABMIL(nn.Module):
  """CLAM_SB's pooling: attention_net = [Linear, ReLU, Attn_Net_Gated], A^T softmax, A h."""

  def __init__(self, in_dim=1024, dim=512):
    super().__init__()
    self.attention_net = nn.Sequential(nn.Linear(in_dim, dim), nn.ReLU(),
                                       Attn_Net_Gated(L=dim, D=dim // 2, n_classes=1))

  def forward(self, h):  # h: [n, in_dim] (CLAM drops the batch axis)
    A, h = self.attention_net(h)  # noqa: N806
    A = torch.transpose(A, 1, 0)  # noqa: N806
    A = F.softmax(A, dim=1)  # noqa: N806
    return torch.mm(A, h)


# ---- one measurement ------------------------------------------------------------------------


def build(model, in_dim, dim, num_landmarks=None, pinv_norm="global"):
  if model == "transmil":
    return TransMIL(in_dim, dim, num_landmarks, per_matrix_pinv=pinv_norm == "per_matrix")
  if model == "abmil":
    return GatedABMIL(in_dim, dim)
  raise ValueError(f"unknown model {model!r}")


def forward(net, model, x):
  return net(x[0]) if model == "abmil" else net(x)


def run(model, n, *, in_dim=1024, dim=512, num_landmarks=None, pinv_norm="global",
        threads=None, repeats=5, max_seconds=60.0, params=None, check_input=None, seed=0,
        device="cpu"):
  """Builds the model, times its forward on a random bag ``[1, n, in_dim]``; a JSON dict.

  On ``device="cuda"`` each timed forward ends with ``torch.cuda.synchronize()``, float32
  matmuls may use TF32 (JAX's default precision on the GPU does), and the device's peak
  allocation (``torch.cuda.max_memory_allocated``) is recorded beside the host figures.
  """
  if threads:
    torch.set_num_threads(int(threads))
  cuda = str(device).startswith("cuda")
  if cuda:
    torch.set_float32_matmul_precision("high")
  sync = torch.cuda.synchronize if cuda else (lambda: None)
  torch.manual_seed(seed)
  net = build(model, in_dim, dim, num_landmarks, pinv_norm).eval()
  if params is not None:
    net.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v))
                         for k, v in params.items()}, strict=True)
  net = net.to(device)
  result = {"torch_version": torch.__version__, "threads": torch.get_num_threads(),
            "python": sys.version.split()[0], "model": model, "n": n,
            "num_landmarks": num_landmarks, "pinv_norm": pinv_norm, "device": str(device),
            "matmul_precision": torch.get_float32_matmul_precision()}
  baseline = memory_mb()
  with torch.inference_mode():
    if check_input is not None:
      x_check = torch.from_numpy(np.asarray(check_input, np.float32))[None].to(device)
      result["check_output"] = forward(net, model, x_check).cpu().numpy().reshape(-1).tolist()
    gen = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(1, n, in_dim, generator=gen, device=device)
    result["input_mb"] = x.numel() * x.element_size() / 2**20
    times, t_start = [], time.perf_counter()
    first = None
    while True:
      sync()
      t0 = time.perf_counter()
      forward(net, model, x)
      sync()
      dt = time.perf_counter() - t0
      if first is None:  # warm-up call (oneDNN primitive creation, allocator growth)
        first = dt
        peak_first = memory_mb()
        reset = reset_peak_memory()
        continue
      times.append(dt)
      if len(times) >= repeats or (len(times) >= 2 and time.perf_counter() - t_start > max_seconds):
        break
  end = memory_mb()
  t = np.asarray(times) * 1e3
  result["forward"] = {
      "times_ms": [round(float(v), 3) for v in t], "p50_ms": float(np.percentile(t, 50)),
      "p90_ms": float(np.percentile(t, 90)), "min_ms": float(t.min()),
      "mean_ms": float(t.mean()), "repeats": int(t.size), "first_call_ms": first * 1e3}
  peak = max(peak_first["peak_mb"], end["peak_mb"])
  result["memory"] = {
      "baseline_mb": baseline["peak_mb"], "peak_mb": peak,
      "peak_over_baseline_mb": peak - baseline["peak_mb"],
      "run_peak_mb": end["peak_mb"] if reset else None,
      "run_peak_over_baseline_mb": end["peak_mb"] - baseline["peak_mb"] if reset else None}
  if cuda:
    result["memory"]["device_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
  return result


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--model", choices=("transmil", "abmil"), required=True)
  p.add_argument("--n", type=int, required=True, help="patches in the bag")
  p.add_argument("--in-dim", type=int, default=1024)
  p.add_argument("--dim", type=int, default=512)
  p.add_argument("--num-landmarks", type=int, default=None, help="default dim // 2")
  p.add_argument("--pinv-norm", choices=("global", "per_matrix"), default="global")
  p.add_argument("--threads", type=int, default=None)
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--max-seconds", type=float, default=60.0)
  p.add_argument("--params", help=".npz of weights in the state_dict layout")
  p.add_argument("--check-input", help=".npy bag [n, in_dim] whose output is returned")
  p.add_argument("--device", default="cpu", help="cpu or cuda")
  a = p.parse_args(argv)
  res = run(a.model, a.n, in_dim=a.in_dim, dim=a.dim, num_landmarks=a.num_landmarks,
            pinv_norm=a.pinv_norm, threads=a.threads, repeats=a.repeats,
            max_seconds=a.max_seconds, params=dict(np.load(a.params)) if a.params else None,
            check_input=np.load(a.check_input) if a.check_input else None, device=a.device)
  json.dump(res, sys.stdout)
  sys.stdout.write("\n")


if __name__ == "__main__":
  main()
