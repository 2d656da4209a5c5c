"""MUST's conditional transformer denoiser and the latent-diffusion training loss.

MUST (Sec. 3.5, Fig. 2, suppl. 7.2) trains, per missing modality, an epsilon-predictor
``eps_theta(z_t, t, cond)`` on 256-d latent vectors ("a 4-layer transformer architecture
operating on 256-dimensional feature embeddings"), conditioned on
``cond = [c_hat; [CLS_u]]``: the shared component recovered from the available modality
and the modality-specific class token, i.e. two 256-d tokens.

The paper shows the network only as a figure. The following are our choices:

* token sequence ``[z_t + e(t), cond_1 + type_1, ..., cond_K + type_K]`` with ``K`` learned
  type embeddings (``N(0, 0.02^2)`` init) that tell the condition tokens apart; no input
  projection when the latent has the token width ``dim``; a latent of another width
  ``latent_dim`` (MUST's whitened principal coordinates of u^) enters through a linear
  map to ``dim`` and leaves through the read-out, ``dim -> latent_dim``;
* time embedding ``e(t) = W_2 SiLU(W_1 sinusoid(t) + b_1) + b_2`` (DDPM/transformer
  sinusoids, period up to 10000);
* pre-LN transformer layers with full (unmasked) multi-head self-attention over the
  ``1 + K`` tokens and a GELU MLP (tanh approximation) of width ``mlp_ratio * dim``;
  LayerNorm epsilon 1e-6;
* a final LayerNorm and a zero-initialised linear read-out at the ``z`` position, so that
  ``eps_theta = 0`` at initialisation;
* the last layer only computes the ``z`` position after its keys/values (the other
  positions are never read): exact, and about 12% fewer FLOPs for ``K = 2``.

The module holds parameters only; `denoising_loss` is a pure function.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from survjax.diffusion.schedules import Schedule
from survjax.nn.core import check_precision, einsum, linear

LN_EPS = 1e-6


def timestep_embedding(t: jax.Array, dim: int, max_period: float = 10000.0) -> jax.Array:
  """Sinusoidal timestep embedding (Vaswani et al. 2017; DDPM).

      freq_j = max_period^(-j / h),  j = 0, ..., h - 1,  h = dim // 2,
      e(t) = [sin(t freq_0), ..., sin(t freq_{h-1}), cos(t freq_0), ..., cos(t freq_{h-1})]

  (zero-padded by one column when ``dim`` is odd).

  Args:
    t: timesteps ``[B]`` (int or float).
    dim: embedding width.
    max_period: longest period.

  Returns:
    float32 ``[B, dim]``.
  """
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = jnp.asarray(t, jnp.float32)[:, None] * freqs[None, :]
  emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
  if dim % 2:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


class _TransformerLayer(nnx.Module):
  """Pre-LN transformer layer: ``x + MHA(LN(x))``, then ``x + MLP(LN(x))``.

      MHA(h) = concat_h softmax(Q_h K_h^T / sqrt(d_h)) V_h W_o,   [Q, K, V] = h W_qkv
      MLP(h) = W_2 GELU(W_1 h)
  """

  def __init__(self, dim: int, num_heads: int, mlp_ratio: int, *, rngs: nnx.Rngs):
    if dim % num_heads:
      raise ValueError(f"dim={dim} is not divisible by num_heads={num_heads}")
    self.num_heads = num_heads
    self.ln1 = nnx.LayerNorm(dim, epsilon=LN_EPS, rngs=rngs)
    self.qkv = nnx.Linear(dim, 3 * dim, rngs=rngs)
    self.proj = nnx.Linear(dim, dim, rngs=rngs)
    self.ln2 = nnx.LayerNorm(dim, epsilon=LN_EPS, rngs=rngs)
    self.fc1 = nnx.Linear(dim, mlp_ratio * dim, rngs=rngs)
    self.fc2 = nnx.Linear(mlp_ratio * dim, dim, rngs=rngs)

  def __call__(self, x: jax.Array, *, first_only: bool = False,
               precision: str = "float32") -> jax.Array:
    """Applies the layer.

    Args:
      x: tokens ``[B, L, D]``.
      first_only: compute (and return) only position 0, attending to all positions.
      precision: matmul precision (`survjax.nn.core.PRECISIONS`).

    Returns:
      ``[B, L, D]``, or ``[B, 1, D]`` when ``first_only``.
    """
    b, l, d = x.shape
    h = self.num_heads
    p = precision
    qkv = linear(self.qkv, self.ln1(x), p).reshape(b, l, 3, h, d // h)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    if first_only:
      q, x = q[:, :1], x[:, :1]
    scores = einsum("bqhc,bkhc->bhqk", q, k, p) / math.sqrt(d // h)
    attn = jax.nn.softmax(scores, axis=-1)
    out = einsum("bhqk,bkhc->bqhc", attn, v, p).reshape(b, q.shape[1], d)
    x = x + linear(self.proj, out, p)
    return x + linear(self.fc2, jax.nn.gelu(linear(self.fc1, self.ln2(x), p),
                                            approximate=True), p)


class ConditionalDenoiser(nnx.Module):
  """Transformer epsilon-predictor ``eps_theta(z_t, t, cond)`` for MUST's latent diffusion.

  ``__call__(z [B, D], t int[B], cond [B, K, D]) -> eps [B, D]``; see the module docstring
  for the architecture (which parts come from the paper and which are ours).
  """

  def __init__(
      self,
      dim: int = 256,
      num_layers: int = 4,
      num_heads: int = 8,
      mlp_ratio: int = 4,
      num_cond_tokens: int = 2,
      latent_dim: int | None = None,
      *,
      rngs: nnx.Rngs):
    """Builds the denoiser.

    Args:
      dim: latent and token width ``D`` (256 in MUST).
      num_layers: transformer layers (4 in MUST).
      num_heads: attention heads.
      mlp_ratio: MLP hidden width as a multiple of ``dim``.
      num_cond_tokens: ``K``, condition tokens (2 in MUST: ``c_hat`` and ``CLS_u``).
      latent_dim: width of ``z`` when it differs from ``dim`` (None: ``dim``).
      rngs: parameter initialisation keys.
    """
    self.dim = dim
    self.latent_dim = latent_dim or dim
    self.num_cond_tokens = num_cond_tokens
    self.in_proj = (nnx.Linear(self.latent_dim, dim, rngs=rngs)
                    if self.latent_dim != dim else None)
    self.time_fc1 = nnx.Linear(dim, dim, rngs=rngs)
    self.time_fc2 = nnx.Linear(dim, dim, rngs=rngs)
    self.type_embed = nnx.Param(
        0.02 * jax.random.normal(rngs.params(), (num_cond_tokens, dim), jnp.float32))
    self.layers = nnx.List([
        _TransformerLayer(dim, num_heads, mlp_ratio, rngs=rngs) for _ in range(num_layers)])
    self.ln_out = nnx.LayerNorm(dim, epsilon=LN_EPS, rngs=rngs)
    self.out = nnx.Linear(
        dim, self.latent_dim, kernel_init=nnx.initializers.zeros_init(),
        bias_init=nnx.initializers.zeros_init(), rngs=rngs)

  def __call__(self, z: jax.Array, t: jax.Array, cond: jax.Array, *,
               precision: str = "float32") -> jax.Array:
    """Predicts the noise.

    Args:
      z: noisy latents ``z_t`` ``[B, latent_dim]``.
      t: integer timesteps ``[B]`` (0-based, ``0 <= t < T``).
      cond: condition tokens ``[B, K, D]`` (MUST: ``[c_hat; CLS_u]``).
      precision: matmul precision, ``"float32"`` (default) or ``"bfloat16"`` (bfloat16
        operands, float32 accumulation; `survjax.nn.core.PRECISIONS`).

    Returns:
      ``eps_theta(z_t, t, cond)``, ``[B, latent_dim]``.
    """
    if (cond.shape[-2:] != (self.num_cond_tokens, self.dim)
        or z.shape[-1] != self.latent_dim):
      raise ValueError(
          f"expected z [B, {self.latent_dim}] and cond [B, {self.num_cond_tokens}, "
          f"{self.dim}], got {z.shape} and {cond.shape}")
    p = check_precision(precision)
    temb = linear(self.time_fc2,
                  jax.nn.silu(linear(self.time_fc1, timestep_embedding(t, self.dim), p)), p)
    h = z if self.in_proj is None else linear(self.in_proj, z, p)
    x = jnp.concatenate(
        [(h + temb)[:, None, :], cond + self.type_embed[...][None]], axis=1)
    n = len(self.layers)
    for i, layer in enumerate(self.layers):
      x = layer(x, first_only=(i == n - 1), precision=p)
    return linear(self.out, self.ln_out(x[:, 0]), p)


def denoising_loss(
    eps_fn: Callable[[jax.Array, jax.Array, jax.Array], jax.Array],
    z0: jax.Array,
    cond: jax.Array,
    key: jax.Array,
    schedule: Schedule) -> jax.Array:
  """The latent-diffusion objective (MUST eq. 19; Ho et al. 2020, "L_simple").

      L = E_{t, z_0, eps} || eps - eps_theta(sqrt(abar_t) z_0 + sqrt(1 - abar_t) eps, t, cond) ||_2^2

  with ``t ~ U{0, ..., T - 1}`` and ``eps ~ N(0, I)``, one draw per row; the squared norm
  is summed over the feature axis (as in the equation) and averaged over the batch.

  Args:
    eps_fn: the denoiser (e.g. a `ConditionalDenoiser`), ``(z [B, D], t int[B], cond) ->
      eps [B, D]``.
    z0: clean latents ``[B, D]``.
    cond: condition ``[B, ...]`` handed to ``eps_fn`` unchanged.
    key: PRNG key for ``t`` and ``eps``.
    schedule: the noise schedule.

  Returns:
    Scalar loss.
  """
  kt, ke = jax.random.split(key)
  t = jax.random.randint(kt, z0.shape[:1], 0, schedule.num_timesteps, dtype=jnp.int32)
  eps = jax.random.normal(ke, z0.shape, z0.dtype)
  ab = schedule.alphas_cumprod[t].astype(z0.dtype)[:, None]
  zt = jnp.sqrt(ab) * z0 + jnp.sqrt(1.0 - ab) * eps
  return jnp.mean(jnp.sum(jnp.square(eps - eps_fn(zt, t, cond)), axis=-1))
