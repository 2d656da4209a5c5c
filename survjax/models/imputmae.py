r"""impuTMAE: multimodal masked-autoencoder pretraining that imputes missing modalities.

"impuTMAE: multimodal transformer masked autoencoder for survival prediction with
missing modalities" (paper text ``papers/001_*.txt``, Sec. 3 and Table 1).

Patches (Sec. 3.1). Every modality becomes a sequence of patches ``x_m [B, N_m, P_m]``
with a boolean mask of the real ones:

* ``vector`` (RNA-seq, DNA methylation ``[B, C]``): cut into ``ceil(C / p)``
  non-overlapping 1-D patches of ``p`` values (Table 1: 512 for DNAm, the RNA row says
  256 and the text 512; ``patch_size`` per modality, 512 by default). The vector is padded
  to a multiple of ``p`` with zeros; the padded entries are masked out of the loss. A
  linear patch embedding (= a stride-``p`` 1-D convolution) and fixed sinusoidal
  positions of the patch index.
* ``bag`` (pre-extracted WSI patch features ``[B, N, D]``): every patch feature vector is
  one patch, embedded linearly; a bag is a set, so no positions.

* ``patches`` (raw RGB WSI tiles ``uint8 [B, M, H, W, 3]``, config ``:tiles``): each tile
  cut into ``16 x 16`` ViT patches (``tile.patch``; `tile_patches`, raster order), embedded
  linearly (= a stride-16 2-D convolution) with sinusoidal positions of the raster index;
  each tile is encoded on its own (its own CLS, ``mask_ratio`` of its patches masked) and
  a patient's tile CLS tokens are averaged (Sec. 3.3). The decoder sees the M tiles'
  tokens side by side; its head for tiles is a transposed convolution (kernel = stride =
  16) from each tile's token grid back to pixels (`TileHead`).

Each modality has its own encoder (``[CLS; W x_m + pos]`` -> transformer layers -> LN).

Masking (Sec. 3, pretraining). For each modality and patient with ``L`` real patches,
``floor(r L)`` of them (r = ``mask_ratio`` = 0.5) are hidden, chosen by MAE's
shuffle-and-restore with static shapes: ``ids = argsort(u)``, ``u ~ U(0,1)`` at real
patches and 2 at padding, so the first ``L - floor(r L)`` entries of ``ids`` are the
kept patches; the encoder sees ``K = N - floor(r N)`` slots of which the first
``L - floor(r L)`` are real (boolean attention mask). A modality the patient lacks is
fully masked: the encoder sees its CLS only.

Decoder (Sec. 3.2). Each encoder's tokens are projected to the decoder width, put back
in patch order (``argsort(ids)``) with a learned mask token in the hidden slots, given
decoder positions and a modality-type embedding; the modalities' sequences are
concatenated, pass through the decoder transformer, and per-modality linear heads map
back to patch space. Loss (eq. 1-2), masked real entries only, patients that have the
modality only:

    L = sum_m MSE^(m),   MSE^(m) = (1 / N_m) sum_{masked real entries i} (y_i - y^_i)^2.

A missing WSI bag has no patches; the decoder imputes ``impute_bag_len`` slots for it
(missing tiles: all ``M`` tiles' patch slots).
Departure (``pretrain.hide_modality``, 0 = the paper): each available modality of a
patient is also hidden entirely with that probability, its loss kept, so that the
decoder learns to rebuild a modality from the others alone (`ImpuTMAE.reconstruct`);
``pretrain.never_hide`` names modalities exempt from it (raw tiles, whose pixels the
other modalities cannot predict).

Inputs are standardised per entry (vectors), per feature dimension (bags) or per entry
of a ViT patch (tiles, pooled over tiles and patches) with the
training patients' statistics, fitted by a first no-op feature stage ``normalise``
(its ``prepare`` stores them in non-trainable `Stats` variables, carried in
checkpoints); the loss is therefore in standardised units, every modality on one scale
(the paper quantile- and min-max-normalises each modality beforehand).

Fine-tuning (Sec. 3.3). Encoders frozen except their last transformer layer and final
norm; decoder frozen. A modality a patient lacks (or a scenario withholds) is imputed:
all present modalities are encoded unmasked, the decoder reconstructs the missing
modality's patches, and its encoder encodes the reconstruction (``impute = True``);
the alternative leaves it fully masked (its CLS alone, ``impute = False``). Both are
computed; the one not chosen by ``finetune.impute`` is reported as the alternative row
``imputed`` / ``masked``. The CLS tokens ``[B, M, D]`` (dropout 0.1) go through a one-layer
fusion self-attention block, are concatenated, and a linear head gives T = 20
discrete-time hazard logits trained with the NLL of eq. 3. Risk ``-sum_t S(t)``.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from survjax import survival
from survjax.errors import InputError
from survjax.method import Stage
from survjax.nn.attention import TransformerLayer
from survjax.nn.core import LN_EPS, dropout, split_key
from survjax.train.optim import make_optimizer


# ---- pure helpers ------------------------------------------------------------------------


def sincos(pos: jax.Array, dim: int) -> jax.Array:
  """Fixed sinusoidal embedding of integer positions ``[...]`` -> ``[..., dim]``.

      PE(p, 2i) = sin(p / 10000^(2i/dim)),  PE(p, 2i+1) = cos(p / 10000^(2i/dim))
  """
  half = dim // 2
  freq = jnp.exp(-math.log(10000.0) * jnp.arange(half, dtype=jnp.float32) / half)
  ang = pos.astype(jnp.float32)[..., None] * freq
  out = jnp.concatenate([jnp.sin(ang), jnp.cos(ang)], axis=-1)
  return jnp.pad(out, [(0, 0)] * (out.ndim - 1) + [(0, dim - 2 * half)])


def num_kept(n: int | jax.Array, ratio: float):
  """Patches kept of ``n`` real ones: ``n - floor(ratio n)``."""
  if isinstance(n, int):
    return n - int(math.floor(ratio * n))
  return n - jnp.floor(ratio * n.astype(jnp.float32)).astype(jnp.int32)


def random_masking(real: jax.Array, ratio: float, key: jax.Array | None,
                   hide_all: jax.Array | None = None) -> dict:
  """MAE shuffle-and-restore with static shapes.

  Args:
    real: bool ``[B, N]``, real patches.
    ratio: share of each row's real patches to hide (``floor(ratio L)`` of ``L``).
    key: PRNG key; None = no shuffle (only valid with ``ratio = 0``).
    hide_all: optional bool ``[B]``: rows whose real patches are all hidden.

  Returns:
    ``ids_shuffle`` int ``[B, N]`` (kept real patches first, then the hidden real ones,
    then padding), ``ids_restore = argsort(ids_shuffle)``, ``keep`` bool ``[B, K]``
    (``K = N - floor(ratio N)``: which encoder slots hold a kept real patch), and
    ``masked`` bool ``[B, N]`` in patch order (real and hidden).
  """
  b, n = real.shape
  length = jnp.sum(real, axis=1).astype(jnp.int32)
  if key is None:
    if ratio:
      raise ValueError("random masking needs a key")
    noise = jnp.broadcast_to(jnp.arange(n, dtype=jnp.float32) / n, (b, n))
  else:  # one draw per position, so padding never changes the draws at real positions
    noise = jax.vmap(lambda j: jax.random.uniform(jax.random.fold_in(key, j), (b,)),
                     out_axes=1)(jnp.arange(n))
  noise = jnp.where(real, noise, 2.0)
  ids_shuffle = jnp.argsort(noise, axis=1).astype(jnp.int32)
  ids_restore = jnp.argsort(ids_shuffle, axis=1).astype(jnp.int32)
  rank = jnp.arange(n, dtype=jnp.int32)[None]
  kept_count = num_kept(length, ratio)
  if hide_all is not None:
    kept_count = jnp.where(hide_all, 0, kept_count)
  kept_count = kept_count[:, None]
  keep_sorted = rank < kept_count
  masked_sorted = (rank >= kept_count) & (rank < length[:, None])
  k = num_kept(n, ratio)
  return {"ids_shuffle": ids_shuffle, "ids_restore": ids_restore,
          "keep": keep_sorted[:, :k],
          "masked": jnp.take_along_axis(masked_sorted, ids_restore, axis=1)}


def masked_mse(pred: jax.Array, target: jax.Array, weight: jax.Array) -> jax.Array:
  """Eq. 2: ``sum_i w_i (y_i - y^_i)^2 / sum_i w_i`` over the entries with ``weight`` True
  (masked real patches, real entries of a padded vector); 0 when there are none."""
  weight = jnp.broadcast_to(weight, pred.shape)
  err = jnp.where(weight, (pred - target) ** 2, 0.0)
  return jnp.sum(err) / jnp.maximum(jnp.sum(weight), 1)


def tile_patches(img: jax.Array, p: int) -> jax.Array:
  """Images ``[..., H, W, C]`` -> non-overlapping ``p x p`` patches ``[..., (H/p)(W/p),
  p p C]`` in raster order (each patch flattened row by row, channels last)."""
  *lead, h, w, c = img.shape
  x = img.reshape(*lead, h // p, p, w // p, p, c)
  x = jnp.moveaxis(x, -4, -3)   # [..., H/p, W/p, p, p, C]
  return x.reshape(*lead, (h // p) * (w // p), p * p * c)


def tile_unpatch(x: jax.Array, p: int, h: int, w: int) -> jax.Array:
  """Inverse of `tile_patches`: ``[..., (H/p)(W/p), p p C]`` -> ``[..., H, W, C]``."""
  *lead, _, pc = x.shape
  c = pc // (p * p)
  y = x.reshape(*lead, h // p, w // p, p, p, c)
  y = jnp.moveaxis(y, -3, -4)   # [..., H/p, p, W/p, p, C]
  return y.reshape(*lead, h, w, c)


def _gather(x, ids):
  """``x [B, N, ...]`` rows reordered by ``ids [B, K]``."""
  return jnp.take_along_axis(x, ids.reshape(ids.shape + (1,) * (x.ndim - 2)), axis=1)


# ---- modules -----------------------------------------------------------------------------


class Stats(nnx.Variable):
  """Non-trainable input standardisation statistics, fitted on a fold's training patients
  (stage ``normalise``) and carried in checkpoints."""



class PatchEncoder(nnx.Module):
  """Linear patch embedding, sinusoidal positions (ordered modalities), a CLS token and
  ``depth`` pre-LN transformer layers; the last layer (``last``) and the final norm
  (``last_norm``) are what fine-tuning unfreezes."""

  def __init__(self, patch_dim, dim, depth, num_heads, mlp_ratio, positional, *, rngs,
               remat=False):
    if depth < 1:
      raise ValueError(f"encoder depth must be >= 1, got {depth}")
    self.dim = dim
    self.positional = positional
    self.embed = nnx.Linear(patch_dim, dim, rngs=rngs)
    self.cls = nnx.Param(0.02 * jax.random.normal(rngs.params(), (1, 1, dim)))
    self.layers = nnx.List([TransformerLayer(dim, num_heads, mlp_ratio, rngs=rngs, remat=remat)
                            for _ in range(depth - 1)])
    self.last = TransformerLayer(dim, num_heads, mlp_ratio, rngs=rngs, remat=remat)
    self.last_norm = nnx.LayerNorm(dim, epsilon=LN_EPS, rngs=rngs)

  def __call__(self, patches, pos, keep, key=None):
    """Encodes the kept patches.

    Args:
      patches: ``[B, K, P]`` (entries at ``keep = False`` are ignored).
      pos: int ``[B, K]`` patch positions (used when ``positional``).
      keep: bool ``[B, K]``.
      key: dropout key or None (the layers have no dropout; kept for symmetry).

    Returns:
      ``([B, 1 + K, D] tokens, bool [B, 1 + K] mask)``; row 0 is the CLS token.
    """
    h = self.embed(jnp.where(keep[..., None], patches, 0.0))
    if self.positional:
      h = h + sincos(pos + 1, self.dim)
    b = h.shape[0]
    tokens = jnp.concatenate([jnp.broadcast_to(self.cls[...], (b, 1, self.dim)), h], axis=1)
    mask = jnp.concatenate([jnp.ones((b, 1), bool), keep], axis=1)
    for layer in list(self.layers) + [self.last]:
      tokens = layer(tokens, mask)
    return jnp.where(mask[..., None], self.last_norm(tokens), 0.0), mask


class TileHead(nnx.Module):
  """Decoder head of an image modality: each tile's patch tokens ``[gh, gw, D]`` through a
  transposed convolution (kernel = stride = the ViT patch) back to pixels ``[H, W, C]``,
  returned as patches ``[B, M gh gw, p p C]`` (`tile_patches`) to compare with the input."""

  def __init__(self, dim, layout, *, rngs):
    self.layout = tuple(layout)   # (tiles M, grid gh, grid gw, patch p, channels C)
    _, _, _, p, c = layout
    self.deconv = nnx.ConvTranspose(dim, c, kernel_size=(p, p), strides=(p, p),
                                    padding="VALID", rngs=rngs)

  def __call__(self, x):
    m, gh, gw, p, _ = self.layout
    b = x.shape[0]
    img = self.deconv(x.reshape(b * m, gh, gw, x.shape[-1]))   # [B M, H, W, C]
    return tile_patches(img, p).reshape(b, m * gh * gw, -1)


class MultimodalDecoder(nnx.Module):
  """Per-modality projection + mask token + type embedding, a shared transformer over the
  concatenated modalities, per-modality linear heads back to patch space."""

  def __init__(self, enc_dims, patch_dims, positional, dim, depth, num_heads, mlp_ratio,
               *, rngs, cross_modal: bool = True, tiles=None, remat: bool = False):
    self.dim = dim
    self.cross_modal = bool(cross_modal)   # False: each modality decoded alone (unimodal)
    self.positional = tuple(sorted(positional.items()))   # hashable static metadata
    init = lambda shape: nnx.Param(0.02 * jax.random.normal(rngs.params(), shape))
    self.proj = nnx.Dict({m: nnx.Linear(d, dim, rngs=rngs) for m, d in enc_dims.items()})
    self.mask_token = nnx.Dict({m: init((1, 1, dim)) for m in enc_dims})
    self.type_embed = nnx.Dict({m: init((1, 1, dim)) for m in enc_dims})
    self.layers = nnx.List([TransformerLayer(dim, num_heads, mlp_ratio, rngs=rngs, remat=remat)
                            for _ in range(depth)])
    self.norm = nnx.LayerNorm(dim, epsilon=LN_EPS, rngs=rngs)
    tiles = tiles or {}   # image modalities: a transposed-convolution head
    self.out = nnx.Dict({m: TileHead(dim, tiles[m], rngs=rngs) if m in tiles
                         else nnx.Linear(dim, p, rngs=rngs) for m, p in patch_dims.items()})

  def __call__(self, enc: dict) -> dict:
    """``enc[m]`` holds ``z [B, 1+K, D_m]``, ``keep [B, K]``, ``ids_restore [B, N]`` and
    ``slots`` bool ``[B, N]`` (patch positions to reconstruct); returns ``[B, N, P_m]``."""
    seqs, masks, sizes = [], [], []
    for m, e in enc.items():
      h = self.proj[m](e["z"])
      cls, tok = h[:, :1], h[:, 1:]
      b, k, d = tok.shape
      n = e["ids_restore"].shape[1]
      mask_tok = jnp.broadcast_to(self.mask_token[m][...], (b, n, d))
      tok = jnp.where(e["keep"][..., None], tok, mask_tok[:, :k])
      full = _gather(jnp.concatenate([tok, mask_tok[:, k:]], axis=1), e["ids_restore"])
      if dict(self.positional)[m]:
        full = full + sincos(jnp.arange(1, n + 1), d)
      seqs.append(jnp.concatenate([cls, full], axis=1) + self.type_embed[m][...])
      masks.append(jnp.concatenate([jnp.ones((b, 1), bool), e["slots"]], axis=1))
      sizes.append(n + 1)
    if not self.cross_modal:   # unimodal pretraining: no token sees another modality
      out = {}
      for m, x, mask in zip(enc, seqs, masks):
        for layer in self.layers:
          x = layer(x, mask)
        out[m] = self.out[m](self.norm(x)[:, 1:])
      return out
    x, mask = jnp.concatenate(seqs, axis=1), jnp.concatenate(masks, axis=1)
    for layer in self.layers:
      x = layer(x, mask)
    x = self.norm(x)
    out, start = {}, 0
    for m, size in zip(enc, sizes):
      out[m] = self.out[m](x[:, start + 1:start + size])
      start += size
    return out


class ImpuTMAEModel(nnx.Module):

  def __init__(self, info: dict, modalities, cfg, *, rngs):
    self.modalities = tuple(modalities)
    patch_dims, positional, tiles, stat_dims = {}, {}, {}, {}
    for m in self.modalities:
      kind = info[m]["kind"]
      stat_dims[m] = info[m]["dim"]
      if kind == "patches":   # raw RGB tiles [M, H, W, C]: ViT patches of each tile
        n_tiles, h, w, c = info[m]["shape"]
        p = int(cfg.get("tile", {}).get("patch", 16))
        if h % p or w % p:
          raise ValueError(f"impuTMAE cuts {m!r} tiles of {h}x{w} into {p}x{p} patches, "
                           f"expected sizes that are multiples of {p}")
        tiles[m] = (n_tiles, h // p, w // p, p, c)
        patch_dims[m] = stat_dims[m] = p * p * c
        positional[m] = True
      elif kind == "vector":
        patch_dims[m] = min(int(cfg.patch_size.get(m, cfg.patch_size.get("default", 512))),
                            info[m]["dim"])
        positional[m] = True
      elif kind == "bag":
        patch_dims[m] = info[m]["dim"]
        positional[m] = False
      else:
        raise ValueError(f"impuTMAE reads vector, bag and patches modalities; {m!r} is "
                         f"{kind!r}")
    self.patch_dims = tuple(sorted(patch_dims.items()))   # hashable static metadata
    self.tiles = tuple(sorted(tiles.items()))
    remat = bool(cfg.get("remat", False))
    self.encoders = nnx.Dict({
        m: PatchEncoder(patch_dims[m], cfg.dim, int(cfg.depth.get(m, cfg.depth.default)),
                        cfg.num_heads, cfg.mlp_ratio, positional[m], rngs=rngs, remat=remat)
        for m in self.modalities})
    dec = cfg.decoder
    self.decoder = MultimodalDecoder({m: cfg.dim for m in self.modalities}, patch_dims,
                                     positional, dec.dim, dec.depth, dec.num_heads,
                                     dec.mlp_ratio, rngs=rngs,
                                     cross_modal=dec.get("cross_modal", True), tiles=tiles,
                                     remat=remat)
    self.fusion = TransformerLayer(cfg.dim, cfg.num_heads, cfg.mlp_ratio, cfg.dropout,
                                   rngs=rngs, remat=remat)
    self.surv_head = nnx.Linear(len(self.modalities) * cfg.dim, cfg.num_bins, rngs=rngs)
    # Per-entry (vectors) / per-dimension (bags) mean and standard deviation.
    self.stats = nnx.Dict({
        m: nnx.Dict({"mean": Stats(jnp.zeros(stat_dims[m])),
                     "std": Stats(jnp.ones(stat_dims[m]))})
        for m in self.modalities})


# ---- the method --------------------------------------------------------------------------


@dataclasses.dataclass
class ImpuTMAE:
  cfg: object
  accumulate: int = 1
  name: str = "imputmae"
  time_model: str = "discrete"

  def __post_init__(self):
    """Checks the config before anything is built or written."""
    unknown = set(self.cfg.pretrain.get("never_hide", ())) - set(self.modalities)
    if unknown:
      raise InputError(f"names {sorted(unknown)}, expected some of the model's modalities "
                       f"{list(self.modalities)}", path="config.model.pretrain.never_hide")

  @property
  def modalities(self):
    return tuple(self.cfg.modalities)

  @property
  def num_bins(self):
    return self.cfg.num_bins

  def build(self, info, rngs):
    return ImpuTMAEModel(info, self.modalities, self.cfg, rngs=rngs)

  # ---- patches -------------------------------------------------------------------------

  def patchify(self, model, batch, present=None) -> dict:
    """Per modality: ``x [B, N, P]`` (zeros where not real), ``real [B, N]`` (real patches of
    patients that have the modality), ``elem`` (bool, broadcastable to x: real entries of
    a padded vector), ``slots [B, N]`` (patch positions the decoder reconstructs, also for
    patients without the modality) and ``available [B]``. A modality outside ``present``
    is never read (its data is replaced by zeros of its shape)."""
    out = {}
    for m in self.modalities:
      mod = batch["modalities"][m]
      p = dict(model.patch_dims)[m]
      read = present is None or m in present
      avail = mod["available"] if read else jnp.zeros_like(mod["available"])
      st = model.stats[m]
      x = mod["x"].astype(jnp.float32)
      if x.ndim == 5:   # tiles [B, M, H, W, C] -> every tile's ViT patches [B, M N, p p C]
        x = tile_patches(x, dict(model.tiles)[m][3]).reshape(x.shape[0], -1, p)
      x = (x - st["mean"][...]) / st["std"][...]
      if mod["x"].ndim == 5:
        b, n, _ = x.shape
        elem = jnp.ones((1, 1, p), bool)
        shape_real = slots = jnp.ones((b, n), bool)
      elif x.ndim == 2:   # vector -> [B, L, p]
        b, c = x.shape
        n = -(-c // p)
        x = jnp.pad(x.astype(jnp.float32), ((0, 0), (0, n * p - c))).reshape(b, n, p)
        elem = (jnp.arange(n * p) < c).reshape(1, n, p)
        shape_real = jnp.ones((b, n), bool)
        slots = shape_real
      else:             # bag -> [B, N, D]
        b, n, _ = x.shape
        elem = jnp.ones((1, 1, p), bool)
        shape_real = mod["mask"] if read else jnp.zeros((b, n), bool)
        first = jnp.arange(n)[None] < min(n, int(self.cfg.impute_bag_len))
        slots = jnp.where(avail[:, None], shape_real, first)
      real = shape_real & avail[:, None]
      x = jnp.where(real[..., None] & elem, x.astype(jnp.float32), 0.0) if read \
          else jnp.zeros(x.shape[:2] + (p,), jnp.float32)
      out[m] = {"x": x, "real": real, "elem": elem, "slots": slots, "available": avail}
    return out

  def encode(self, model, patches, ratio, key, hide_all=None) -> dict:
    """Masks (``ratio``; every real patch of the rows ``hide_all[m]``, for the modalities
    it names) and encodes every modality; adds the decoder's inputs."""
    keys = split_key(key, len(self.modalities))
    enc = {}
    tiles = dict(model.tiles)
    for m, k in zip(self.modalities, keys):
      pt = patches[m]
      if m in tiles:
        enc[m] = self._encode_tiles(model, m, pt, ratio, k, None if hide_all is None
                                    else hide_all.get(m))
        continue
      msk = random_masking(pt["real"], ratio, k if ratio else None,
                           None if hide_all is None else hide_all.get(m))
      kk = msk["keep"].shape[1]
      ids = msk["ids_shuffle"][:, :kk]
      z, _ = model.encoders[m](_gather(pt["x"], ids), ids, msk["keep"])
      enc[m] = dict(msk, z=z, slots=pt["slots"])
    return enc

  def _encode_tiles(self, model, m, pt, ratio, key, hide_all=None) -> dict:
    """An image modality: each of a patient's M tiles masked (``ratio`` of its N ViT
    patches) and encoded on its own, CLS tokens averaged over the tiles (paper Sec. 3.3);
    the tiles' tokens laid side by side for the decoder (M N patch slots in tile-major
    order, ``ids_restore`` into the M K kept slots followed by mask tokens)."""
    n_tiles = dict(model.tiles)[m][0]
    b, mn, p = pt["x"].shape
    n = mn // n_tiles
    x = pt["x"].reshape(b * n_tiles, n, p)
    real = pt["real"].reshape(b * n_tiles, n)
    hide = None if hide_all is None else jnp.repeat(hide_all, n_tiles)
    msk = random_masking(real, ratio, key if ratio else None, hide)
    kk = msk["keep"].shape[1]
    ids = msk["ids_shuffle"][:, :kk]
    z, _ = model.encoders[m](_gather(x, ids), ids, msk["keep"])   # [B M, 1 + K, D]
    z = z.reshape(b, n_tiles, 1 + kk, -1)
    cls = jnp.mean(z[:, :, 0], axis=1, keepdims=True)
    ir = msk["ids_restore"].reshape(b, n_tiles, n)
    offset = (jnp.arange(n_tiles, dtype=jnp.int32) * kk)[None, :, None]
    flat = jnp.where(ir < kk, offset + ir, n_tiles * kk).reshape(b, mn)
    return {"z": jnp.concatenate([cls, z[:, :, 1:].reshape(b, n_tiles * kk, -1)], axis=1),
            "keep": msk["keep"].reshape(b, n_tiles * kk), "ids_restore": flat,
            "masked": msk["masked"].reshape(b, mn), "slots": pt["slots"]}

  def _cls_unmasked(self, model, m, x, real):
    """CLS ``[B, D]`` of modality ``m`` from patches ``x [B, N, P]`` with the real ones
    ``real`` all shown (tiles: the mean over the tiles' CLS)."""
    if m in dict(model.tiles):
      pt = {"x": x, "real": real, "slots": real}
      return self._encode_tiles(model, m, pt, 0.0, None)["z"][:, 0]
    n = real.shape[1]
    z, _ = model.encoders[m](x, jnp.broadcast_to(jnp.arange(n), real.shape), real)
    return z[:, 0]

  # ---- input standardisation (stage "normalise") ------------------------------------------

  def collect_stats(self, model, batch) -> dict:
    """Per patient and modality: count, sum and sum of squares of the raw entries
    (vectors) or patch features (bags), zero where the modality is missing."""
    out = {}
    for m in self.modalities:
      mod = batch["modalities"][m]
      x = mod["x"].astype(jnp.float32)
      if x.ndim == 5:   # tiles: per entry of a ViT patch, pooled over tiles and patches
        x = tile_patches(x, dict(model.tiles)[m][3]).reshape(x.shape[0], -1,
                                                             dict(model.patch_dims)[m])
        w = mod["available"][:, None, None]
        x = jnp.where(w, x, 0.0)
        out[m] = {"n": w.astype(jnp.float32)[:, 0, 0] * x.shape[1], "s": x.sum(1),
                  "ss": (x * x).sum(1)}
      elif x.ndim == 2:
        w = mod["available"][:, None]
        x = jnp.where(w, x, 0.0)
        out[m] = {"n": w.astype(jnp.float32)[:, 0], "s": x, "ss": x * x}
      else:
        w = (mod["mask"] & mod["available"][:, None])[..., None]
        x = jnp.where(w, x, 0.0)
        out[m] = {"n": jnp.sum(w, axis=(1, 2)).astype(jnp.float32), "s": x.sum(1),
                  "ss": (x * x).sum(1)}
    return out

  def fit_stats(self, model, feats) -> None:
    """Stores the pooled mean and standard deviation (floored at 1e-3) in ``model.stats``."""
    for m in self.modalities:
      f = jax.tree.map(np.asarray, feats[m])
      n = max(float(f["n"].sum()), 1.0)
      mean = f["s"].sum(0) / n
      std = np.sqrt(np.maximum(f["ss"].sum(0) / n - mean**2, 0.0))
      model.stats[m]["mean"].set_value(jnp.asarray(mean, jnp.float32))
      model.stats[m]["std"].set_value(jnp.asarray(np.maximum(std, 1e-3), jnp.float32))

  @staticmethod
  def _no_loss(model, batch, key):
    return jnp.zeros(()), {}

  # ---- pretraining -----------------------------------------------------------------------

  def reconstruct(self, model, batch, key, ratio=None, hide_prob=None):
    """Pretraining forward: masked patches, encodings, decoder output.

    Besides the ``mask_ratio`` of every modality, each available modality of a patient
    is hidden entirely with probability ``hide_prob`` (``pretrain.hide_modality``; its
    loss still counts): the only way the decoder learns to rebuild a modality from the
    others alone, which imputation at fine-tuning and inference asks of it. With 0 (the
    paper) a fully masked modality is only ever one the patient lacks, which has no
    target, and on the synthetic cohort the decoder then learns mostly within-modality
    reconstruction (cross-modal imputation at or near the training mean; see
    docs/results/imputmae.md). Modalities in ``pretrain.never_hide`` are never hidden
    whole: a hidden tile's loss is noise (its pixels' phase is in no other modality),
    and with it the masked-tile loss stayed at the mean fill's (docs/results/imputmae.md).
    """
    patches = self.patchify(model, batch)
    ratio = self.cfg.mask_ratio if ratio is None else ratio
    hide_prob = self.cfg.pretrain.get("hide_modality", 0.0) if hide_prob is None else hide_prob
    k_mask, k_hide = jax.random.split(key)
    hide_all = None
    if hide_prob > 0:
      u = jax.random.uniform(k_hide, (batch["valid"].shape[0], len(self.modalities)))
      never = frozenset(self.cfg.pretrain.get("never_hide", ()))
      hide_all = {m: u[:, i] < hide_prob for i, m in enumerate(self.modalities)
                  if m not in never}
    enc = self.encode(model, patches, ratio, k_mask, hide_all)
    return patches, enc, model.decoder(enc)

  def pretrain_loss(self, model, batch, key):
    """Eq. 1-2: sum over modalities of the MSE on masked real entries."""
    patches, enc, pred = self.reconstruct(model, batch, key)
    total, metrics = 0.0, {}
    valid = batch["valid"]
    for m in self.modalities:
      pt = patches[m]
      mse = masked_mse(pred[m], pt["x"], (enc[m]["masked"] & valid[:, None])[..., None]
                       & pt["elem"])
      metrics[f"mse_{m}"] = mse
      total = total + mse
    return total, metrics

  def impute(self, model, batch, present) -> dict:
    """The decoder's reconstruction of every modality from the ``present`` ones, encoded
    unmasked: vectors ``[B, C]``, bags ``[B, N, D]`` (its ``impute_bag_len`` first slots
    for a patient without the bag)."""
    patches = self.patchify(model, batch, present)
    pred = model.decoder(self.encode(model, patches, 0.0, None))
    out = {}
    for m in self.modalities:
      x = batch["modalities"][m]["x"]
      y = pred[m].reshape(x.shape[0], -1)[:, :x.shape[1]] if x.ndim == 2 else pred[m]
      out[m] = y * model.stats[m]["std"][...] + model.stats[m]["mean"][...]
      if x.ndim == 5:   # back to tiles [B, M, H, W, C] (0-255 scale, not rounded)
        n_tiles, gh, gw, p, c = dict(model.tiles)[m]
        out[m] = tile_unpatch(out[m].reshape(x.shape[0], n_tiles, gh * gw, -1), p,
                              gh * p, gw * p)
    return out

  # ---- fine-tuning ---------------------------------------------------------------------

  def cls_tokens(self, model, batch, present):
    """Per-modality CLS ``[B, D]`` with missing modalities imputed by the decoder
    (``imputed``) and left fully masked (``masked``)."""
    patches = self.patchify(model, batch, present)
    enc = self.encode(model, patches, 0.0, None)
    pred = model.decoder(enc)
    imputed, masked = [], []
    for m in self.modalities:
      pt = patches[m]
      cls_real = enc[m]["z"][:, 0]
      missing = ~pt["available"]
      x_imp = jnp.where(missing[:, None, None],
                        jax.lax.stop_gradient(pred[m]) * pt["elem"], pt["x"])
      real_imp = jnp.where(missing[:, None], pt["slots"], pt["real"])
      cls_imp = self._cls_unmasked(model, m, x_imp, real_imp)
      imputed.append(jnp.where(missing[:, None], cls_imp, cls_real))
      masked.append(cls_real)
    return jnp.stack(imputed, axis=1), jnp.stack(masked, axis=1)

  def head(self, model, cls, key=None):
    """Fusion self-attention block over the modality tokens, concatenation, linear head."""
    k_in, k_fuse, k_out = split_key(key, 3)
    h = dropout(cls, self.cfg.dropout, k_in)
    h = model.fusion(h, None, key=k_fuse)
    h = dropout(h.reshape(h.shape[0], -1), self.cfg.dropout, k_out)
    return model.surv_head(h)

  def finetune_loss(self, model, batch, key):
    imputed, masked = self.cls_tokens(model, batch, frozenset(self.modalities))
    logits = self.head(model, imputed if self.cfg.finetune.impute else masked, key)
    w = (batch["valid"] & batch["labelled"]).astype(jnp.float32)
    return survival.discrete_time_nll(logits, batch["bin"], batch["event"], w), {}

  def stages(self):
    c = self.cfg
    pre, ft = c.pretrain, c.finetune

    def optimizer(stage_cfg):
      def make(total_steps):
        warm = int(round(stage_cfg.warmup_epochs / max(stage_cfg.epochs, 1) * total_steps))
        return make_optimizer(stage_cfg.lr, stage_cfg.weight_decay, c.grad_clip,
                              self.accumulate, total_steps=total_steps, warmup_steps=warm)
      return make

    # Inputs standardised with the training patients' statistics (all patients with the
    # modality, unlabelled included): one step of a no-op feature stage whose prepare()
    # stores them, since the core has no other per-fold fitting hook.
    out = [Stage("normalise", self._no_loss, optax.set_to_zero(), epochs=1,
                 trainable=nnx.All(nnx.Param, nnx.PathContains("surv_head")), labels=False,
                 features=self.collect_stats, prepare=self.fit_stats, steps_per_epoch=1,
                 batch_size=8)]
    if pre.epochs:
      out.append(Stage("pretrain", self.pretrain_loss, optimizer(pre), epochs=pre.epochs,
                       trainable=nnx.All(nnx.Param, nnx.Any(nnx.PathContains("encoders"),
                                                            nnx.PathContains("decoder"))),
                       labels=False, max_instances=pre.max_instances))
    last = nnx.All(nnx.PathContains("encoders"),
                   nnx.Any(nnx.PathContains("last"), nnx.PathContains("last_norm")))
    out.append(Stage("finetune", self.finetune_loss, optimizer(ft), epochs=ft.epochs,
                     trainable=nnx.All(nnx.Param, nnx.Any(last, nnx.PathContains("fusion"),
                                                          nnx.PathContains("surv_head"))),
                     max_instances=ft.max_instances, select=ft.get("select") or None))
    return out

  # ---- held-out reconstruction (the core's held_out hook) --------------------------------

  def _reconstructions(self, model, batch, key):
    """Raw-unit reconstructions of one batch: per modality the MAE output at the masked
    entries (``mask_ratio`` of each modality's real patches hidden, every modality the
    patient has shown) and, for vectors, the decoder's imputation from the other
    modalities alone."""
    patches, enc, pred = self.reconstruct(model, batch, key, hide_prob=0.0)
    out = {}
    for m in self.modalities:
      st = model.stats[m]
      x = batch["modalities"][m]["x"].astype(jnp.float32)
      masked = enc[m]["masked"] & batch["valid"][:, None]
      if x.ndim == 5:   # tiles: compared as ViT patches [B, M N, p p C], raw 0-255
        x = tile_patches(x, dict(model.tiles)[m][3]).reshape(patches[m]["x"].shape)
      if x.ndim == 2:   # [B, N, P] patches back to the vector [B, C]
        b, c = x.shape
        p = pred[m].shape[-1]
        y = pred[m].reshape(b, -1)[:, :c]
        masked = jnp.repeat(masked, p, axis=1)[:, :c]
      else:
        y = pred[m]
      out[m] = {"target": x, "masked": masked,
                "masked_pred": y * st["std"][...] + st["mean"][...]}
    for m in self.modalities:
      if batch["modalities"][m]["x"].ndim == 2 and len(self.modalities) > 1:
        others = frozenset(self.modalities) - {m}
        out[m]["imputed"] = self.impute(model, batch, others)[m]
    return out

  def held_out(self, model, cohort, test_idx, train_idx, key) -> dict:
    r"""Reconstruction MSE per modality on a fold's held-out patients (paper Table 4).

    In the modality's raw units, pooled over the entries of the test patients that have
    it:

    * ``masked/<m>/*``: masked-autoencoder reconstruction as in pretraining (eq. 2):
      ``mask_ratio`` of the modality's real patches hidden at random, every modality the
      patient has visible otherwise; the MSE over the hidden entries. Bags are
      subsampled to ``held_out.max_instances`` evenly spaced patches.
    * ``imputed/<m>/*`` (vector modalities, two or more modalities): the modality
      withheld entirely and rebuilt by the decoder from the others (what fine-tuning and
      prediction feed the encoder of a missing modality); the MSE over all its entries.
      A missing bag has no patch-by-patch target, so bags have no such row.

    Each with ``/model`` (the fold's trained decoder), ``/mean_fill`` (the mean of the
    fold's training patients that have the modality, per entry or per feature
    dimension: mean imputation) and ``/floor`` where the cohort knows its noise
    (``cohort.reconstruction_floor``: the per-patient smallest achievable MSE, averaged
    with the same weights; the mask is uniform, so its expectation over the hidden
    entries is the patient's floor).
    """
    hc = self.cfg.get("held_out", None)
    cap = int(hc.max_instances) if hc is not None else 64
    bs = int(hc.batch_size) if hc is not None else 32
    from survjax.data.batching import BatchSpec, iterate_batches
    graphdef, state = nnx.split(model)
    fn = getattr(self, "_held_out_jit", None)
    if fn is None:
      fn = jax.jit(lambda g, st, b, k: self._reconstructions(nnx.merge(g, st), b, k),
                   static_argnums=0)
      self._held_out_jit = fn
    floors = getattr(cohort, "reconstruction_floor", None) or {}
    train_idx = np.asarray(train_idx)
    means = {}
    for m in self.modalities:
      mod = cohort.modalities[m]
      have = train_idx[mod.available[train_idx]]
      if mod.kind == "bag":
        rows = [mod.bags[i].astype(np.float64) for i in have if len(mod.bags[i])]
        means[m] = np.concatenate(rows).mean(0) if rows else None
      elif mod.kind == "patches":   # per entry of a ViT patch, over tiles and patches
        p = dict(model.tiles)[m][3]
        means[m] = (np.asarray(tile_patches(jnp.asarray(mod.values[have], jnp.float32), p))
                    .reshape(-1, dict(model.patch_dims)[m]).astype(np.float64).mean(0)
                    if len(have) else None)
      else:
        means[m] = mod.values[have].astype(np.float64).mean(0) if len(have) else None
    acc: dict[str, list] = {}
    spec = BatchSpec(batch_size=bs, max_instances=cap)
    for b_i, batch in enumerate(iterate_batches(cohort, np.asarray(test_idx), spec,
                                                sort_by_length=True)):
      res = jax.tree.map(np.asarray, fn(graphdef, state, jax.tree.map(jnp.asarray, batch),
                                        jax.random.fold_in(key, b_i)))
      rows = np.flatnonzero(batch["valid"])
      pid = batch["index"][rows]
      for m in self.modalities:
        r = res[m]
        avail = cohort.modalities[m].available[pid]
        rows_m, pid_m = rows[avail], pid[avail]
        if not len(rows_m):
          continue
        target = r["target"][rows_m].astype(np.float64)
        floor = floors.get(m)
        w = r["masked"][rows_m].astype(np.float64)
        if target.ndim == 3:
          w = np.broadcast_to(w[..., None], target.shape)
        mean = means[m]
        for what, pred, weight in (("masked", r["masked_pred"][rows_m], w),
                                   ("imputed", r.get("imputed"), None)):
          if pred is None:
            continue
          pred = pred[rows_m] if what == "imputed" else pred
          weight = np.ones_like(target) if weight is None else weight
          n = weight.reshape(len(rows_m), -1).sum(1)
          sums = acc.setdefault(f"{what}/{m}", [0.0, 0.0, 0.0, 0.0])
          sums[0] += float(np.sum(weight * (pred - target) ** 2))
          sums[1] += float(np.sum(weight * (mean - target) ** 2)) if mean is not None else np.nan
          sums[2] += float(n.sum())
          if floor is not None:
            sums[3] += float(np.sum(n * floor[pid_m]))
    out = {}
    for name, (err, err_mean, count, floor_sum) in acc.items():
      if count == 0:
        continue
      out[f"{name}/model"] = err / count
      out[f"{name}/mean_fill"] = None if not np.isfinite(err_mean) else err_mean / count
      if floors.get(name.split("/")[1]) is not None:
        out[f"{name}/floor"] = floor_sum / count
    return out

  def predict(self, model, batch, present, key):
    imputed, masked = self.cls_tokens(model, batch, present)
    risk = {"imputed": survival.discrete_time_risk(self.head(model, imputed)),
            "masked": survival.discrete_time_risk(self.head(model, masked))}
    main = "imputed" if self.cfg.finetune.impute else "masked"
    return {"risk": risk.pop(main), **risk}


def make(config) -> ImpuTMAE:
  return ImpuTMAE(config.model, accumulate=config.train.accumulate)
