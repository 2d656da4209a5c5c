"""The whole DDIM loop of one patient as one Pallas kernel (opt-in; XLA is the reference).

`ddim_sample_pallas` computes what `survjax.diffusion.ddim.ddim_sample` computes for a
`ConditionalDenoiser` (``eta = 0``, latent width = token width, with or without
``clip_x0``), with the same initial-noise contract, but as one
`jax.experimental.pallas` kernel whose grid runs over patients: each program keeps its
patient's ``S`` sample rows (padded to ``block_rows``) and all denoiser weights on chip
and runs every step and every layer without leaving the kernel. That removes the ~20
kernel launches per denoiser call (x 50 steps) that bound the XLA path at batch 1 on a
GPU (see the README's GPU section).

The kernel body is written for Triton-style lowering: only 2-D values, matmuls whose
dimensions are multiples of 16, blocks with power-of-two sides (the per-step tables are
padded to one), loads by row from refs rather than slices of values, and no reshapes. Multi-head attention over the ``1 + K``
tokens is expressed with a head-indicator matrix ``E [D, H']`` (``E[d, h] = 1`` iff
column ``d`` belongs to head ``h``; ``H' >= 16`` with zero columns): per key token ``j``,

    s_j = ((q * k_j) E) / sqrt(d_h)          [R, H']   (per-head dot products)
    a_j = exp(s_j - max_j s_j) / sum_j exp(...)      (softmax over the 1 + K tokens)
    out = sum_j (a_j E^T) * v_j              [R, D]

the same function as the einsums of `_TransformerLayer`, summed in another order, so
samples agree with the XLA path to float rounding (the test: 1e-5 relative, in Pallas
interpret mode on the CPU). The time embedding ``e(t)`` of every step is computed
before the kernel (it does not depend on the patient) and read per step.

Where it applies: ``eta = 0`` (no per-step noise), a `ConditionalDenoiser` without
``in_proj``, ``cond`` one ``[B, K, D]`` array. Elsewhere `make_sampler` keeps the XLA
path, which stays the default everywhere. On the CPU the kernel can only run
interpreted (``interpret=True``, the default there): a correctness reference, slow.
On a GPU it lowers through Triton; that lowering has not yet been run (no GPU in the
session that wrote it): `benchmarks/run_gpu.sh` times it and falls back to reporting
the lowering error. Each program loads whole weight matrices (up to ``D x 4D`` per
layer) as blocks, which may exceed what Triton keeps in registers and shared memory;
tiling those products over ``K`` inside the kernel is the next step if it does.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from survjax.diffusion.ddim import ddim_step_table
from survjax.diffusion.denoiser import ConditionalDenoiser, timestep_embedding
from survjax.diffusion.schedules import Schedule

_LAYER_KEYS = ("ln1_s", "ln1_b", "wq", "bq", "wk", "bk", "wv", "bv", "wo", "bo",
               "ln2_s", "ln2_b", "w1", "b1", "w2", "b2")


def pallas_applies(model, cond, eta: float) -> str | None:
  """None when `ddim_sample_pallas` can run this sampler, else the reason it cannot."""
  if eta != 0.0:
    return "eta > 0 (per-step noise) is not in the kernel"
  if not isinstance(model, ConditionalDenoiser):
    return "the kernel implements survjax's ConditionalDenoiser only"
  if model.in_proj is not None:
    return "a latent narrower than the tokens (in_proj) is not in the kernel"
  if not isinstance(cond, jax.Array) or cond.ndim != 3:
    return "cond must be one [B, K, D] array"
  return None


def _layer_weights(model: ConditionalDenoiser) -> dict[str, jax.Array]:
  """Per-layer weights stacked over layers, qkv split into q, k, v (2-D per layer)."""
  d = model.dim
  out = {k: [] for k in _LAYER_KEYS}
  for layer in model.layers:
    w, b = layer.qkv.kernel[...], layer.qkv.bias[...]
    parts = dict(
        ln1_s=layer.ln1.scale[...], ln1_b=layer.ln1.bias[...],
        wq=w[:, :d], bq=b[:d], wk=w[:, d:2 * d], bk=b[d:2 * d], wv=w[:, 2 * d:], bv=b[2 * d:],
        wo=layer.proj.kernel[...], bo=layer.proj.bias[...],
        ln2_s=layer.ln2.scale[...], ln2_b=layer.ln2.bias[...],
        w1=layer.fc1.kernel[...], b1=layer.fc1.bias[...],
        w2=layer.fc2.kernel[...], b2=layer.fc2.bias[...])
    for k, v in parts.items():
      out[k].append(v[None] if v.ndim == 1 else v)          # vectors as [1, n] rows
  return {k: jnp.stack(v) for k, v in out.items()}


def _ln(x, scale, bias, eps):
  mean = jnp.mean(x, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
  return (x - mean) * jax.lax.rsqrt(var + eps) * scale + bias


def _gelu_tanh(x):
  return 0.5 * x * (1.0 + jnp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x * x * x)))


def _make_kernel(*, num_steps, num_layers, num_cond, dh, clip_x0, eps):
  scale = 1.0 / math.sqrt(dh)
  n_w = len(_LAYER_KEYS)

  def kernel(z_ref, cond_ref, temb_ref, coef_ref, head_ref, lnout_s_ref, lnout_b_ref,
             wout_ref, bout_ref, *refs):
    w = dict(zip(_LAYER_KEYS, refs[:n_w]))
    out_ref = refs[n_w]
    e = head_ref[...]                                    # [D, H']
    z = z_ref[...]                                       # [R, D]
    # condition token j (type embedding added), one row, broadcast over the sample rows
    conds = [cond_ref[pl.ds(j, 1), :] for j in range(num_cond)]
    f32 = jnp.float32

    def dot(a, b):
      return jnp.dot(a, b, preferred_element_type=f32)

    def denoise(i, z):
      temb = temb_ref[pl.ds(i, 1), :]                    # [1, D]
      toks = [z + temb] + [jnp.broadcast_to(c, z.shape) for c in conds]
      for l in range(num_layers):
        last = l == num_layers - 1
        g = lambda k, l=l: w[k][l]                       # noqa: E731
        hs = [_ln(t, g("ln1_s"), g("ln1_b"), eps) for t in toks]
        ks = [dot(h, g("wk")) + g("bk") for h in hs]
        vs = [dot(h, g("wv")) + g("bv") for h in hs]
        queries = range(1) if last else range(len(toks))
        new = []
        for qi in queries:
          q = dot(hs[qi], g("wq")) + g("bq")
          s = [dot(q * k, e) * scale for k in ks]          # [R, H'] per key token
          m = s[0]
          for sj in s[1:]:
            m = jnp.maximum(m, sj)
          ex = [jnp.exp(sj - m) for sj in s]
          den = ex[0]
          for x in ex[1:]:
            den = den + x
          att = dot(ex[0] / den, e.T) * vs[0]
          for x, v in zip(ex[1:], vs[1:]):
            att = att + dot(x / den, e.T) * v
          t = toks[qi] + dot(att, g("wo")) + g("bo")
          hid = _gelu_tanh(dot(_ln(t, g("ln2_s"), g("ln2_b"), eps), g("w1")) + g("b1"))
          new.append(t + dot(hid, g("w2")) + g("b2"))
        toks = new
      return dot(_ln(toks[0], lnout_s_ref[...], lnout_b_ref[...], eps),
                 wout_ref[...]) + bout_ref[...]

    def step(i, z):
      r, c, sab, s1m, sabp, dirc = (coef_ref[pl.ds(i, 1), pl.ds(j, 1)] for j in range(6))
      eps_hat = denoise(i, z)
      if clip_x0 is None:
        return r * z + c * eps_hat
      x0 = jnp.clip((z - s1m * eps_hat) / sab, -clip_x0, clip_x0)
      eps_hat = (z - sab * x0) / s1m
      return sabp * x0 + dirc * eps_hat

    out_ref[...] = jax.lax.fori_loop(0, num_steps, step, z)

  return kernel


def ddim_sample_pallas(
    model: ConditionalDenoiser,
    cond: jax.Array,
    key: jax.Array,
    schedule: Schedule,
    *,
    num_steps: int = 50,
    eta: float = 0.0,
    num_samples: int = 5,
    noise: jax.Array | None = None,
    clip_x0: float | None = None,
    block_rows: int | None = None,
    interpret: bool | None = None) -> tuple[jax.Array, jax.Array]:
  """`ddim_sample` of a `ConditionalDenoiser` as one Pallas kernel (grid over patients).

  Same arguments, noise contract and result as `survjax.diffusion.ddim.ddim_sample`
  (``eps_fn = model``), where `pallas_applies` says it applies (else a ValueError).

  Args:
    model: the denoiser (merged; call inside `jax.jit` with a split state).
    cond: ``[B, K, D]`` condition tokens.
    key: PRNG key (initial noise ``z_T = normal(split(key)[0], [B, S, D])``).
    schedule: the noise schedule.
    num_steps: DDIM steps.
    eta: must be 0.
    num_samples: ``S``.
    noise: optional ``z_T`` ``[B, S, D]``.
    clip_x0: as in `ddim_sample`.
    block_rows: rows per program (``S`` padded with zero rows; default the next multiple
      of 16 >= S, what Triton's matmuls need; the padding rows are discarded).
    interpret: run the kernel in Pallas interpret mode (default: on the CPU, the only way
      it runs there).

  Returns:
    ``(mean [B, D], samples [B, S, D])``.
  """
  why = pallas_applies(model, cond, eta)
  if why is not None:
    raise ValueError(f"ddim_sample_pallas does not apply: {why}")
  b, k, d = cond.shape
  s = num_samples
  if interpret is None:
    interpret = jax.default_backend() == "cpu"
  rows = block_rows or max(16, -(-s // 16) * 16)
  if rows < s:
    raise ValueError(f"block_rows={rows} < num_samples={s}")
  k_init, _ = jax.random.split(key)
  if noise is None:
    noise = jax.random.normal(k_init, (b, s, d), jnp.float32)
  elif noise.shape != (b, s, d):
    raise ValueError(f"noise must have shape {(b, s, d)}, got {noise.shape}")
  t, r, c, _, _, sab, s1m, sabp, dirc = ddim_step_table(schedule, num_steps, eta)
  temb = model.time_fc2(jax.nn.silu(model.time_fc1(timestep_embedding(t, d))))  # [T', D]
  zero = jnp.zeros_like(r)
  coef = jnp.stack([r, c, sab, s1m, sabp, dirc, zero, zero], axis=1)             # [T', 8]
  # Triton blocks need power-of-two sides: the per-step tables get zero rows past T'.
  steps_pad = pl.next_power_of_2(num_steps) - num_steps
  temb = jnp.pad(temb, ((0, steps_pad), (0, 0)))
  coef = jnp.pad(coef, ((0, steps_pad), (0, 0)))
  num_heads = model.layers[0].num_heads
  dh = d // num_heads
  h_pad = max(16, num_heads)
  head = (jnp.arange(d)[:, None] // dh == jnp.arange(h_pad)[None, :]).astype(jnp.float32)
  z0 = jnp.pad(noise.astype(jnp.float32), ((0, 0), (0, rows - s), (0, 0)))
  cond_tok = cond.astype(jnp.float32) + model.type_embed[...][None]
  weights = _layer_weights(model)
  lnout_s, lnout_b = model.ln_out.scale[...][None], model.ln_out.bias[...][None]
  wout, bout = model.out.kernel[...], model.out.bias[...][None]

  def whole(x):
    return pl.BlockSpec(x.shape, lambda i, n=x.ndim: (0,) * n)

  shared = [temb, coef, head, lnout_s, lnout_b, wout, bout] + [weights[n] for n in _LAYER_KEYS]
  kernel = _make_kernel(num_steps=num_steps, num_layers=len(model.layers), num_cond=k, dh=dh,
                        clip_x0=clip_x0, eps=model.ln_out.epsilon)
  out = pl.pallas_call(
      kernel,
      grid=(b,),
      in_specs=[pl.BlockSpec((pl.squeezed, rows, d), lambda i: (i, 0, 0)),
                pl.BlockSpec((pl.squeezed, k, d), lambda i: (i, 0, 0))]
      + [whole(x) for x in shared],
      out_specs=pl.BlockSpec((pl.squeezed, rows, d), lambda i: (i, 0, 0)),
      out_shape=jax.ShapeDtypeStruct((b, rows, d), jnp.float32),
      interpret=interpret,
  )(z0, cond_tok, *shared)
  samples = out[:, :s]
  return samples.mean(axis=1), samples
