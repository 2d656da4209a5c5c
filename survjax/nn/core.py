"""Small pure helpers shared by the layers in `survjax.nn`.

Everything here is a pure function of arrays (and, for dropout, an explicit PRNG key),
so the modules that use them stay parameter holders that run under a plain `jax.jit` of
``nnx.merge(graphdef, state)``.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

# PyTorch's `nn.LayerNorm` default, used by the reference implementations we port.
LN_EPS = 1e-5

# Matmul precisions of the forwards that take a ``precision`` argument (the DDIM
# denoiser, the MIL poolings): "float32" is the plain float32 product (the default, and
# the exact code path these layers always ran), "bfloat16" rounds both operands of every
# weight and attention matmul to bfloat16 and accumulates in float32
# (``preferred_element_type``); everything else (LayerNorm, softmax, residuals, the DDIM
# update) stays float32.
PRECISIONS = ("float32", "bfloat16")


def check_precision(precision: str) -> str:
  """``precision`` if it is one of `PRECISIONS`, else a ValueError naming them."""
  if precision not in PRECISIONS:
    raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
  return precision


def _bf16(x: jax.Array) -> jax.Array:
  return x.astype(jnp.bfloat16)


def matmul(a: jax.Array, b: jax.Array, precision: str = "float32") -> jax.Array:
  """``a @ b``; with ``precision="bfloat16"`` bfloat16 operands, float32 accumulation."""
  if check_precision(precision) == "float32":
    return a @ b
  return jnp.matmul(_bf16(a), _bf16(b), preferred_element_type=jnp.float32)


def einsum(spec: str, a: jax.Array, b: jax.Array, precision: str = "float32") -> jax.Array:
  """``jnp.einsum(spec, a, b)``; with ``precision="bfloat16"`` bfloat16 operands and a
  float32 result (accumulation)."""
  if check_precision(precision) == "float32":
    return jnp.einsum(spec, a, b)
  return jnp.einsum(spec, _bf16(a), _bf16(b), preferred_element_type=jnp.float32)


def linear(layer, x: jax.Array, precision: str = "float32") -> jax.Array:
  """``layer(x)`` for an `nnx.Linear`; with ``precision="bfloat16"`` the product
  ``x W`` takes bfloat16 operands and accumulates in float32, the bias is added in
  float32."""
  if check_precision(precision) == "float32":
    return layer(x)
  y = matmul(x, layer.kernel[...], precision)
  return y if layer.bias is None else y + layer.bias[...]


def dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
  """Inverted dropout, applied only when a key is given.

      y = x * b / (1 - rate),   b ~ Bernoulli(1 - rate)  elementwise

  Args:
    x: any array.
    rate: drop probability in ``[0, 1)``.
    key: PRNG key, or ``None`` for the identity (evaluation).

  Returns:
    An array like ``x``.
  """
  if key is None or rate <= 0.0:
    return x
  if not 0.0 <= rate < 1.0:
    raise ValueError(f"dropout rate must be in [0, 1), got {rate}")
  keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


def split_key(key: jax.Array | None, num: int) -> list[jax.Array | None]:
  """``jax.random.split(key, num)`` as a list, or ``num`` Nones when ``key`` is None."""
  if key is None:
    return [None] * num
  return list(jax.random.split(key, num))


def masked_softmax(scores: jax.Array, mask: jax.Array | None, axis: int = -1) -> jax.Array:
  """Softmax over the entries where ``mask`` is True; exact zeros elsewhere.

      p_i = m_i exp(s_i - c) / sum_j m_j exp(s_j - c),   c = max_{j: m_j} s_j

  A slice with no True entry gives all zeros (finite, also in the gradient), never NaN.

  Args:
    scores: real array.
    mask: boolean array broadcastable to ``scores`` (True = keep), or None.
    axis: the softmax axis.

  Returns:
    Probabilities like ``scores``.
  """
  if mask is None:
    return jax.nn.softmax(scores, axis=axis)
  mask = jnp.broadcast_to(mask, scores.shape)
  s = jnp.where(mask, scores, -jnp.inf)
  smax = jnp.max(s, axis=axis, keepdims=True)
  smax = jax.lax.stop_gradient(jnp.where(jnp.isfinite(smax), smax, 0.0))
  e = jnp.where(mask, jnp.exp(s - smax), 0.0)
  den = jnp.sum(e, axis=axis, keepdims=True)
  return e / jnp.where(den > 0, den, 1.0)


def masked_mean(x: jax.Array, mask: jax.Array | None, axis: int = -2) -> jax.Array:
  """Mean of ``x`` over ``axis`` restricted to ``mask`` (zeros when nothing is valid).

      mean = sum_i m_i x_i / max(sum_i m_i, 1)

  Args:
    x: ``[..., N, D]`` (with the default ``axis=-2``).
    mask: boolean ``[..., N]`` or None.
    axis: the reduced axis of ``x``.

  Returns:
    ``x`` reduced over ``axis``.
  """
  if mask is None:
    return jnp.mean(x, axis=axis)
  m = jnp.expand_dims(mask, -1).astype(x.dtype) if axis == -2 else mask.astype(x.dtype)
  return jnp.sum(x * m, axis=axis) / jnp.maximum(jnp.sum(m, axis=axis), 1.0)


def torch_uniform_init(fan_in: int):
  """PyTorch's default init for conv/linear weights and biases: ``U(-1/sqrt(fan_in), +)``.

  (``kaiming_uniform_(a=sqrt(5))`` reduces to this bound.) Used where we port a PyTorch
  reference whose initial scale matters (depthwise convolutions).
  """
  bound = 1.0 / math.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init
