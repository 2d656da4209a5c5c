"""MUST: modality-specific representation-aware transformer with latent diffusion.

Kim et al., "MUST: Modality-Specific Representation-Aware Transformer for
Diffusion-Enhanced Survival Prediction with Missing Modality" (arXiv 2603.26071).

Encoders (Sec. 3.2, supp. 6.4). Pathology patches ``[N, D_P]`` go through TransMIL
(linear projection to D = 256, class token, PPEG, two Nystrom layers) giving ``g_P`` and
the token outputs ``H_P``; the six gene families go through one small SNN each (tokens
``[6, D]``) and a multi-head self-attention layer with a class token giving ``g_G`` and
``H_G``. Bidirectional cross-attention (eq. 7) gives ``c_{P<-G}`` (pathology tokens query
the genomic tokens) and ``c_{G<-P}`` (genomic tokens query the pathology tokens), each
mean-pooled over its (valid) queries. Attention layers with learned class tokens
``CLS_uP``, ``CLS_uG`` give the modality-specific ``u_P``, ``u_G``; only the class-token
row of that layer is needed, and for one attention layer that row is exact when computed
alone, so it costs O(N) rather than O(N^2) on a bag.

Decomposition (Sec. 3.3). ``P = B B^T`` with ``B`` in R^{D x r}, r = 64 (eq. 8). The paper
calls P idempotent, which holds only for orthonormal columns, so ``B`` is parametrised as
a product of r Householder reflections applied to ``[I_r; 0]`` (`MUSTModel.basis`):
``P @ P = P`` exactly (up to float) for every value of the parameter.

    c^_{P<-G} = P c_{P<-G},  c^_{G<-P} = P c_{G<-P},  u^_m = (I - P) u_m      (eq. 9)
    h = phi([u^_P; c^; u^_G])                                                   (eq. 11)

with ``c^`` the mean of the two shared components (equal under eq. 14) and ``phi`` a
two-layer MLP giving K = 4 discrete hazard logits.

Training (Sec. 3.4, supp. 7.1), three stages:

1. warm-up, 30 epochs, AdamW lr 1e-3:
   ``L_warm = L_surv(phi([g_P; eps_P])) + L_surv(phi([g_G; eps_G]))`` (eq. 12),
   eps ~ N(0, sigma^2 I), sigma = 0.1. The paper writes the head input as a two-part
   concatenation while ``phi`` takes three slots; we put ``g_m`` in modality m's slot and
   the noise in the other two (our reading, stated here);
2. main, 30 epochs, lr 2e-4, weight decay 1e-5:
   ``L = L_surv + 1.0 L_decomp + 1.0 L_shared + 0.5 L_orth`` (eq. 13-16), cosine
   similarities in L_orth. With an orthonormal B the two intra-modal terms of eq. 15 are
   identically zero (u^ and c^ live in complementary subspaces); they are kept so the
   loss is the paper's. Eq. 13-14 are squared errors through which the gradient also
   reaches g and c, and collapse (every component nearly one vector for all patients)
   satisfies them; config ``decomp_relative`` divides each by the between-patient
   variance of what it fits (`decomposition_losses`), which collapse does not lower.
   ``decomp_stop_gradient`` instead makes g a fixed target of eq. 13 (the paper does
   not say which). The `representations` diagnostics ``spread`` and ``cos_centred``
   show collapse; docs/results/must.md has the measurements;
3. latent diffusion (Sec. 3.5, supp. 7.2): the main network frozen, one conditional
   denoiser per modality learns ``u^_m`` from ``cond = [c; CLS_um]`` with the
   epsilon-prediction loss (eq. 19). Conditions are standardised with training
   statistics (raw, their small per-dimension spread vanished beside the
   denoiser's token-type embeddings); the diffused variable is ``u^`` in whitened
   principal coordinates, ``z = ((u^ - mu) V_k) / s`` with k = ``ldm.latent_dim`` = 8
   (`fit_latent`; 0 = all 256 dimensions standardised, the paper's setting), and the
   denoiser maps it to and from its 256-d tokens. The denoiser trains on cached
   features, a `lax.scan` per chunk of steps. Its condition is by default the
   surrogate ``c~ = g - u^`` (supp. 8.2), computed from each modality alone as at
   inference, rather than the paper's ``c^``, so that the denoiser is trained on the
   conditions it is sampled with.

Missing-modality inference (Sec. 3.6). With only P: ``c~ = g_P - u^_P`` (eq. 20),
``u~_G`` by DDIM (eq. 21; 50 steps, eta = 0, 5 samples averaged), risk from
``phi([u^_P; c~; u~_G])`` (eq. 22); symmetric for missing P. The two uses of c~ differ
by default. In the head's c slot it is projected onto the shared subspace, ``P c~``
(config ``project_recovered_shared``): the head was trained on c^ = P c (eq. 9), which
lives in the subspace, while ``g - u^`` adds the decomposition's residual outside it
(the two are equal when eq. 10 holds exactly). The denoiser, trained on the same c~ of
the training patients, is conditioned on eq. 20 as written, ``g - u^`` (``ldm.
project_condition = False``): the residual is where the available modality's own
information lies (`scripts/must_ldm_probe.py` measures how well each predicts the
missing u^). The alternative rows
``zeros`` and ``mean`` replace ``u~`` with zeros or the training mean of ``u^`` (the
ablation "missing component filled by the LDM vs zeros vs the training mean").
Training-time missingness (supp. 8.2): unpaired patients use a zero ``u^`` for the
missing modality and the survival loss only.

Not in the paper, a missing path trained for what it reads (config ``missing_weight``,
``imputer``, ``fill``): in the main stage every complete pair also takes, for each
modality m, the path a patient without m takes at inference, ``phi([u^_have; c~;
u_fill])``, weighted ``missing_weight`` in the loss (its gradient reaches the encoders).
``u_fill`` is an imputer's regression of u^_m on ``[u^_have; c~]`` (an MLP fitted to the
stop-gradient u^_m relative to its variance, `relative_sq_error`; its output reaches the
head held fixed), or zeros without one. ``fill`` names the path ``risk`` takes with a
modality missing (``diffusion``: eq. 20-22; ``imputer``; ``zeros``; ``mean``;
``unimodal``); the other paths are rows beside it. With ``missing_weight`` and a fill the
main stage trains, its epoch is chosen on the mean validation C-index with both
modalities and with each alone (`Stage.select_present`).

A fallback (config ``unimodal_heads``): after the main stage, with the network frozen, one
head per modality learns the survival loss from ``[u^_m; c~_m]``, the two vectors one
modality alone gives at inference (the ``unimodal`` row of a missing scenario). With an
inner validation split, the evaluation adds an ``auto`` row that uses, per fold, whichever
row scores best on the validation patients under that scenario (`survjax.evaluate.cv`);
the ``risk`` output, which ``--mode=predict`` uses, is the ``fill`` path.

The risk score is ``-sum_k S(k)`` (MCAT convention).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx

from survjax import survival
from survjax.diffusion import ddim, schedules
from survjax.diffusion.denoiser import ConditionalDenoiser, denoising_loss
from survjax.errors import InputError
from survjax.method import Stage
from survjax.nn.attention import MultiHeadAttention, TransformerLayer
from survjax.nn.core import PRECISIONS, masked_softmax
from survjax.nn.genomic import GroupTokenizer
from survjax.nn.transmil import TransMIL
from survjax.train.optim import make_optimizer



def _cos(a, b, eps=1e-8):
  """Cosine similarity with a gradient that stays finite at zero vectors.

  Padded batch rows give zero vectors (an empty bag has no cross-attention queries);
  ``jnp.linalg.norm`` has a NaN gradient there, which a zero loss weight does not cancel
  (``0 * nan = nan``), so the norms are clamped inside the square root.
  """
  sq = jnp.sum(a * a, -1) * jnp.sum(b * b, -1)
  return jnp.sum(a * b, -1) / jnp.sqrt(jnp.maximum(sq, eps * eps))


def _weighted_mean(v, weights):
  """``sum_i w_i v_i / sum_i w_i`` of per-patient values ``v [B]`` (0 when no weight)."""
  return jnp.sum(v * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def _masked_mean(x, mask):
  m = mask[..., None].astype(x.dtype)
  return jnp.sum(x * m, axis=-2) / jnp.maximum(jnp.sum(m, axis=-2), 1.0)


def decomposition_losses(comp: dict, weights: jax.Array, relative: bool = False):
  """Eq. 13 and 14 over the paired patients (row weights ``w_i``), absolute or relative.

  Absolute, as the paper writes them (``E_w`` the w-weighted mean over the batch):

      L_decomp = E_w ||g_P - (u^_P + c^_{G<-P})||^2 + E_w ||g_G - (u^_G + c^_{P<-G})||^2
      L_shared = E_w ||c^_{P<-G} - c^_{G<-P}||^2

  Relative: each squared error divided by the between-patient variance of what it fits,
  ``V_w(x) = E_w ||x - E_w x||^2``, i.e. the share of that variance left unexplained
  (1 - R^2 when the fit is centred):

      L_decomp = E_w ||g_P - u^_P - c^_{G<-P}||^2 / V_w(g_P) + (the same for G)
      L_shared = E_w ||c^_{P<-G} - c^_{G<-P}||^2 / ((V_w(c^_{P<-G}) + V_w(c^_{G<-P})) / 2)

  The absolute form is met by collapse: with every vector ``x_i = m_x + eps z_i`` and the
  offsets fitted, it falls as eps^2, while the relative form does not change (it is
  invariant to a common scale); the gradient reaches the denominators as well. With
  fewer than two paired patients a batch has no variance and the relative terms are 0.
  The paper does not say how g, c and u are scaled; see `configs/must.py` for what each
  form does on the synthetic cohort.
  """
  def mean_sq(x):
    return _weighted_mean(jnp.sum(x ** 2, -1), weights)

  res_p = mean_sq(comp["g_p"] - (comp["u_p"] + comp["c_gp"]))
  res_g = mean_sq(comp["g_g"] - (comp["u_g"] + comp["c_pg"]))
  res_sh = mean_sq(comp["c_pg"] - comp["c_gp"])
  if not relative:
    return res_p + res_g, res_sh

  def variance(x):
    centre = jnp.sum(x * weights[:, None], 0) / jnp.maximum(jnp.sum(weights), 1.0)
    return mean_sq(x - centre)

  enough = jnp.sum(weights > 0) >= 2
  tiny = jnp.finfo(res_p.dtype).tiny

  def ratio(num, den):
    return jnp.where(enough, num / jnp.maximum(den, tiny), 0.0)

  l_dec = ratio(res_p, variance(comp["g_p"])) + ratio(res_g, variance(comp["g_g"]))
  l_sh = ratio(res_sh, 0.5 * (variance(comp["c_pg"]) + variance(comp["c_gp"])))
  return l_dec, l_sh


def relative_sq_error(pred, target, weights):
  """``sum_j w_j ||pred_j - target_j||^2 / sum_j w_j ||target_j - tbar||^2`` with ``tbar``
  the weighted mean of ``target``: the share of the targets' between-patient variation
  that ``pred`` leaves unexplained (1 for the constant ``tbar``)."""
  w = weights / jnp.maximum(jnp.sum(weights), 1.0)
  centre = jnp.sum(w[:, None] * target, 0)
  err = jnp.sum(w * jnp.sum((pred - target) ** 2, -1))
  return err / (jnp.sum(w * jnp.sum((target - centre) ** 2, -1)) + 1e-8)


class LatentStats(nnx.Variable):
  """Non-trainable latent normalisation statistics (set before diffusion training)."""


class ClassQuery(nnx.Module):
  """One attention layer's class-token row: ``u = MLP(LN(CA(cls, [cls; H])))`` + residual."""

  def __init__(self, dim, num_heads, *, rngs):
    self.cls = nnx.Param(jax.random.normal(rngs.params(), (1, 1, dim)) * 0.02)
    self.norm = nnx.LayerNorm(dim, rngs=rngs)
    self.attn = MultiHeadAttention(dim, num_heads, rngs=rngs)
    self.norm2 = nnx.LayerNorm(dim, rngs=rngs)
    self.mlp1 = nnx.Linear(dim, 2 * dim, rngs=rngs)
    self.mlp2 = nnx.Linear(2 * dim, dim, rngs=rngs)

  def __call__(self, tokens, mask):
    b = tokens.shape[0]
    cls = jnp.broadcast_to(self.cls[...], (b, 1, tokens.shape[-1]))
    kv = jnp.concatenate([cls, tokens], axis=1)
    kv_mask = jnp.concatenate([jnp.ones((b, 1), bool), mask], axis=1)
    x = cls + self.attn(self.norm(cls), self.norm(kv), kv_mask)
    x = x + self.mlp2(jax.nn.gelu(self.mlp1(self.norm2(x))))
    return x[:, 0]

  def attention(self, tokens, mask):
    """The class query's softmax weights over ``tokens`` ``[B, N]`` in `__call__`'s
    attention, averaged over heads, its own key left out and renormalised over the real
    tokens (0 at padding, all 0 when none is real)."""
    b, n, d = tokens.shape
    h = self.attn.num_heads
    cls = jnp.broadcast_to(self.cls[...], (b, 1, d))
    kv = self.norm(jnp.concatenate([cls, tokens], axis=1))
    kv_mask = jnp.concatenate([jnp.ones((b, 1), bool), mask], axis=1)
    q = self.attn.q_proj(self.norm(cls)).reshape(b, h, d // h)
    k = self.attn.k_proj(kv).reshape(b, n + 1, h, d // h)
    scores = jnp.einsum("bhc,bkhc->bhk", q, k) / (d // h) ** 0.5
    w = jnp.mean(masked_softmax(scores, kv_mask[:, None, :]), axis=1)[:, 1:]
    w = jnp.where(mask, w, 0.0)
    total = jnp.sum(w, axis=1, keepdims=True)
    return w / jnp.where(total > 0, total, 1.0)


class BagEncoder(nnx.Module):
  """MUST's pathology encoder: TransMIL on a padded bag -> ``(g, tokens, mask)``."""

  def __init__(self, in_dim: int, cfg, *, rngs: nnx.Rngs):
    self.transmil = TransMIL(in_dim, dim=cfg.dim, num_heads=cfg.num_heads,
                             num_landmarks=cfg.num_landmarks, rngs=rngs)
    self.precision = cfg.get("precision", "float32")

  def __call__(self, mod, key=None):
    cls, tokens = self.transmil(mod["x"].astype(jnp.float32), mod["mask"], key=key,
                                return_tokens=True, precision=self.precision)
    return cls[:, 0], tokens, mod["mask"]

  def attention(self, mod):
    """``[B, N]``: g's class token over the patches (`TransMIL.attention`)."""
    return self.transmil.attention(mod["x"].astype(jnp.float32), mod["mask"])


class TokenEncoder(nnx.Module):
  """MUST's genomic encoder: one SNN per column group (gene family) -> tokens, a class
  token and one multi-head self-attention layer -> ``(g, tokens, mask)``."""

  def __init__(self, group_sizes: tuple[int, ...], cfg, *, rngs: nnx.Rngs):
    d = cfg.dim
    self.tokenizer = GroupTokenizer(tuple(group_sizes), d, rngs=rngs)
    self.cls = nnx.Param(jax.random.normal(rngs.params(), (1, 1, d)) * 0.02)
    self.layer = TransformerLayer(d, cfg.num_heads, 2, cfg.dropout, rngs=rngs)
    self.norm = nnx.LayerNorm(d, rngs=rngs)

  def __call__(self, mod, key=None):
    tok = self.tokenizer(mod["x"].astype(jnp.float32), key=key)
    b, n, d = tok.shape
    cls = jnp.broadcast_to(self.cls[...], (b, 1, d))
    seq = self.layer(jnp.concatenate([cls, tok], 1), jnp.ones((b, n + 1), bool), key=key)
    seq = self.norm(seq)
    return seq[:, 0], seq[:, 1:], jnp.ones((b, n), bool)


def _dropout(h, rate, key):
  """Inverted dropout of ``h`` (identity without a key, i.e. at inference)."""
  if key is None or rate <= 0:
    return h
  keep = jax.random.bernoulli(key, 1 - rate, h.shape)
  return jnp.where(keep, h / (1 - rate), 0.0)


class MLPHead(nnx.Module):
  """``Linear -> ReLU -> dropout -> Linear``: hazard logits from a feature vector."""

  def __init__(self, in_dim, hidden, out_dim, dropout, *, rngs):
    self.fc1 = nnx.Linear(in_dim, hidden, rngs=rngs)
    self.fc2 = nnx.Linear(hidden, out_dim, rngs=rngs)
    self.dropout = dropout

  def __call__(self, x, key=None):
    return self.fc2(_dropout(jax.nn.relu(self.fc1(x)), self.dropout, key))


def _encoder(info: dict, cfg, rngs):
  if info["kind"] == "bag":
    return BagEncoder(info["dim"], cfg, rngs=rngs)
  if info["kind"] == "tokens":
    return TokenEncoder(info["group_sizes"], cfg, rngs=rngs)
  raise ValueError(f"MUST encodes 'bag' and 'tokens' modalities, got kind {info['kind']!r}")


class MUSTModel(nnx.Module):
  """Parameters of MUST; the forward pieces are methods, the losses live in `MUST`.

  The two modalities are called P and G after the paper (pathology, genomics); any two
  modalities of kind ``bag`` (TransMIL) or ``tokens`` (group SNNs + self-attention) can
  take these slots (``model.modalities`` in the config, e.g. genes and clinical tokens).
  """

  def __init__(self, info: dict, names: tuple[str, str], cfg, *, rngs: nnx.Rngs):
    d = cfg.dim
    self.names = tuple(names)
    self.encoder_p = _encoder(info[names[0]], cfg, rngs)
    self.encoder_g = _encoder(info[names[1]], cfg, rngs)
    self.cross_p_from_g = MultiHeadAttention(d, cfg.num_heads, rngs=rngs)
    self.cross_g_from_p = MultiHeadAttention(d, cfg.num_heads, rngs=rngs)
    self.cross_norm_p = nnx.LayerNorm(d, rngs=rngs)
    self.cross_norm_g = nnx.LayerNorm(d, rngs=rngs)
    self.specific_p = ClassQuery(d, cfg.num_heads, rngs=rngs)
    self.specific_g = ClassQuery(d, cfg.num_heads, rngs=rngs)
    self.subspace = nnx.Param(jax.random.normal(rngs.params(), (d, cfg.rank)) / jnp.sqrt(d))
    self.head1 = nnx.Linear(3 * d, cfg.head_hidden, rngs=rngs)
    self.head2 = nnx.Linear(cfg.head_hidden, cfg.num_bins, rngs=rngs)
    if cfg.get("unimodal_heads", False):
      self.unimodal_heads = nnx.Dict({
          m: MLPHead(2 * d, cfg.head_hidden, cfg.num_bins, cfg.dropout, rngs=rngs)
          for m in names})
    if cfg.get("imputer", False):  # imputers[m]: u^_m from [u^_other; c~_other]
      self.imputers = nnx.Dict({m: MLPHead(2 * d, cfg.head_hidden, d, 0.0, rngs=rngs)
                                for m in names})
    k = cfg.ldm.get("latent_dim", 0) or d
    self.denoisers = nnx.Dict({
        m: ConditionalDenoiser(dim=d, num_layers=cfg.ldm.num_layers, num_heads=cfg.ldm.num_heads,
                               num_cond_tokens=2, latent_dim=k, rngs=rngs)
        for m in names})
    self.latent_mean = nnx.Dict({m: LatentStats(jnp.zeros((d,))) for m in names})
    self.latent_basis = nnx.Dict({m: LatentStats(jnp.eye(d, k)) for m in names})
    self.latent_scale = nnx.Dict({m: LatentStats(jnp.ones((k,))) for m in names})
    self.cond_mean = nnx.Dict({m: LatentStats(jnp.zeros((d,))) for m in names})
    self.cond_std = nnx.Dict({m: LatentStats(jnp.ones((d,))) for m in names})
    self.dropout = cfg.dropout

  # ---- pieces of the forward pass ------------------------------------------------------

  def basis(self):
    """Orthonormal B (D x r) as a product of r Householder reflections.

        B = H(v_1) H(v_2) ... H(v_r) [I_r; 0],   H(v) = I - 2 v v^T / (v^T v)

    with the free parameter ``V = [v_1 .. v_r]`` (D x r). A product of reflections is
    orthogonal, so ``B^T B = I`` and ``P = B B^T`` is idempotent by construction (to float
    rounding), for any V; every orthonormal frame is reachable. The product is one
    `lax.scan` of rank-1 updates: ~10x cheaper to differentiate on CPU than LAPACK's
    QR (geqrf) or a Cholesky-QR, which dominated the training step.
    """
    v = self.subspace[...]
    d, r = v.shape

    def reflect(b, vi):
      vi = vi * jax.lax.rsqrt(jnp.sum(vi * vi))
      return b - 2.0 * jnp.outer(vi, vi @ b), None

    b, _ = jax.lax.scan(reflect, jnp.eye(d, r, dtype=v.dtype), v.T[::-1])
    return b

  def project_shared(self, x, basis=None):
    """``P x = B B^T x`` (eq. 8); pass ``basis`` to reuse one B across several calls."""
    b = self.basis() if basis is None else basis
    return (x @ b) @ b.T

  def encode_pathology(self, batch, key=None):
    """``(g_P, H_P, mask_P)`` of the first modality."""
    return self.encoder_p(batch["modalities"][self.names[0]], key)

  def encode_genomics(self, batch, key=None):
    """``(g_G, H_G, mask_G)`` of the second modality."""
    return self.encoder_g(batch["modalities"][self.names[1]], key)

  def components(self, batch, key=None):
    """All of g, c, u (raw and projected) for complete pairs."""
    k1 = k2 = None
    if key is not None:
      k1, k2 = jax.random.split(key)
    g_p, h_p, mask_p = self.encode_pathology(batch, k1)
    g_g, h_g, mask_g = self.encode_genomics(batch, k2)
    c_pg = _masked_mean(self.cross_p_from_g(self.cross_norm_p(h_p), self.cross_norm_g(h_g), mask_g),
                        mask_p)
    c_gp = _masked_mean(self.cross_g_from_p(self.cross_norm_g(h_g), self.cross_norm_p(h_p), mask_p),
                        mask_g)
    u_p = self.specific_p(h_p, mask_p)
    u_g = self.specific_g(h_g, mask_g)
    basis = self.basis()

    def proj(x):
      return self.project_shared(x, basis)

    return dict(g_p=g_p, g_g=g_g, c_pg=proj(c_pg), c_gp=proj(c_gp),
                u_p=u_p - proj(u_p), u_g=u_g - proj(u_g))

  def specific_only(self, batch, modality, key=None):
    """g_m and u^_m from one modality alone (the missing-modality path)."""
    if modality == self.names[0]:
      g, h, mask = self.encode_pathology(batch, key)
      u = self.specific_p(h, mask)
    else:
      g, h, mask = self.encode_genomics(batch, key)
      u = self.specific_g(h, mask)
    return g, u - self.project_shared(u)

  def head(self, u_p, c, u_g, key=None):
    h = jax.nn.relu(self.head1(jnp.concatenate([u_p, c, u_g], -1)))
    return self.head2(_dropout(h, self.dropout, key))

  def encode_latent(self, modality, u):
    """The diffused coordinates of ``u^``: ``z = ((u - mu) V) / s`` (see `fit_latent`)."""
    return ((u - self.latent_mean[modality][...]) @ self.latent_basis[modality][...]
            / self.latent_scale[modality][...])

  def decode_latent(self, modality, z):
    """``u = (z * s) V^T + mu``, the inverse of `encode_latent` on the kept subspace."""
    return ((z * self.latent_scale[modality][...]) @ self.latent_basis[modality][...].T
            + self.latent_mean[modality][...])

  def standardize_condition(self, modality, c):
    """``(c - mean) / std`` with the training statistics of the condition of ``modality``.

    Like the latents, the shared components are small; fed raw, they vanish beside the
    denoiser's token-type embeddings and the denoiser learns the marginal of u instead of
    its distribution given c.
    """
    return (c - self.cond_mean[modality][...]) / self.cond_std[modality][...]

  def condition(self, modality, c, use_cls: bool):
    """Diffusion condition tokens [c; CLS_um] (or [c; 0] for the no-CLS ablation)."""
    cls = (self.specific_p if modality == self.names[0] else self.specific_g).cls[...][0]
    cls = jnp.broadcast_to(cls, c.shape) if use_cls else jnp.zeros_like(c)
    return jnp.stack([c, jax.lax.stop_gradient(cls)], axis=1)


def fit_latent(u: jax.Array, latent_dim: int = 0, min_scale: float = 1e-3):
  """Training statistics of the diffused variable: ``(mu, V, s)``, ``z = ((u - mu) V) / s``.

  ``latent_dim = 0``: per-dimension standardisation, ``V = I``, ``s = std(u) + 1e-3`` (as
  latent-diffusion models scale their latents). ``latent_dim = k``: whitened principal
  coordinates, ``V`` the top-k right singular vectors of the centred ``u`` (``[n, D]``)
  and ``s_j = sigma_j / sqrt(n)`` (the component standard deviations, floored at
  ``min_scale``), so that ``z`` has identity covariance on the training set and
  ``decode(encode(u))`` is the projection of ``u`` on the top-k principal subspace.

  Why (our choice; the paper diffuses the 256-d u^ and is silent on scaling): a trained
  u^ varies along a few directions, and a short-trained denoiser on all 256 standardised
  dimensions over-disperses its samples (they pin at the clip); a few whitened
  coordinates do not.
  """
  mean = jnp.mean(u, 0)
  if not latent_dim:
    return mean, jnp.eye(u.shape[1], dtype=u.dtype), jnp.std(u, 0) + min_scale
  _, sv, vt = jnp.linalg.svd(u - mean, full_matrices=False)
  basis, scale = vt[:latent_dim].T, sv[:latent_dim] / jnp.sqrt(u.shape[0])
  short = latent_dim - basis.shape[1]  # fewer patients than latent_dim: unused coordinates
  basis = jnp.pad(basis, ((0, 0), (0, short)))
  scale = jnp.pad(scale, (0, short), constant_values=1.0)
  return mean, basis, jnp.maximum(scale, min_scale)


@dataclasses.dataclass
class MUST:
  """The MUST method (see the module docstring); ``cfg`` is the config's ``model`` block."""

  cfg: object
  accumulate: int = 1   # the run's train.accumulate (micro-batches per update)
  batch_size: int = 32  # the run's train.batch_size
  name: str = "must"

  @property
  def modalities(self) -> tuple[str, str]:
    """(P, G): the config's ``model.modalities`` (default pathology, genomics)."""
    return tuple(self.cfg.get("modalities", ("pathology", "genomics")))
  time_model: str = "discrete"

  @property
  def num_bins(self):
    return self.cfg.num_bins

  FILLS = ("diffusion", "imputer", "zeros", "mean", "unimodal")

  @property
  def fill(self) -> str:
    """What `predict`'s ``risk`` reads in the missing slot (config ``fill``)."""
    return self.cfg.get("fill", "diffusion")

  def __post_init__(self):
    """Checks the sizes the config sets, before anything is built or written."""
    c = self.cfg
    if len(self.modalities) != 2:
      raise InputError(f"MUST takes exactly two modalities, got {list(self.modalities)}",
                       path="config.model.modalities")
    if not 0 < c.rank <= c.dim:
      raise InputError(f"rank {c.rank} is out of range, expected 1 <= rank <= model.dim "
                       f"= {c.dim}", path="config.model.rank")
    if self.batch_size < 2 and c.stage2.epochs and (c.lambda_dec or c.lambda_sh):
      # Eq. 13-14 relative to the between-patient variance need two patients in a batch;
      # the paper's batch 1 + accumulation would switch them off without a word.
      raise InputError(f"train.batch_size {self.batch_size} leaves eq. 13-14 (the "
                       "decomposition losses) without a between-patient variance, expected "
                       "a batch of 2 or more patients (accumulate for larger effective "
                       "batches)", path="config.train.batch_size")
    has = {"imputer": c.get("imputer", False), "unimodal": c.get("unimodal_heads", False)}
    available = [f for f in self.FILLS if has.get(f, True)]
    if self.fill not in available:
      raise InputError(f"fill {self.fill!r} is not available, expected one of {available} "
                       "(imputer needs model.imputer, unimodal model.unimodal_heads)",
                       path="config.model.fill")
    choices = {"model.train_patients": (c.train_patients, ("complete", "any")),
               "model.precision": (c.get("precision", "float32"), PRECISIONS),
               "model.ldm.schedule": (c.ldm.schedule, ("linear", "cosine")),
               "model.ldm.condition": (c.ldm.condition, ("c_cls", "c")),
               "model.ldm.condition_source": (c.ldm.condition_source, ("c_tilde", "c_hat"))}
    for key, (value, allowed) in choices.items():
      if value not in allowed:
        raise InputError(f"{value!r} is not a choice here, expected one of {list(allowed)}",
                         path=f"config.{key}")
    for key, dim, heads in (("model", c.dim, c.num_heads),
                            ("model.ldm", c.dim, c.ldm.num_heads)):
      if heads < 1 or dim % heads:
        raise InputError(f"num_heads {heads} does not divide dim {dim}, expected a divisor",
                         path=f"config.{key}.num_heads")
    if not 0 <= c.ldm.get("latent_dim", 0) <= c.dim:
      raise InputError(f"latent_dim {c.ldm.latent_dim} is out of range, expected 0 (all "
                       f"{c.dim} dimensions) to model.dim = {c.dim}",
                       path="config.model.ldm.latent_dim")

  def build(self, info, rngs):
    return MUSTModel(info, self.modalities, self.cfg, rngs=rngs)

  def _schedule(self):
    """The noise schedule as concrete arrays, even when called under `jax.jit` (the DDIM
    step table is computed in float64 numpy from it)."""
    ldm = self.cfg.ldm
    with jax.ensure_compile_time_eval():
      if ldm.schedule == "cosine":
        return schedules.cosine_schedule(ldm.timesteps)
      return schedules.linear_schedule(ldm.timesteps, ldm.beta_start, ldm.beta_end)

  # ---- losses --------------------------------------------------------------------------

  def _surv(self, logits, batch, weights):
    return survival.discrete_time_nll(logits, batch["bin"], batch["event"], weights)

  def warmup_loss(self, model, batch, key):
    """Eq. 12 (our reading of the slots: see the module docstring)."""
    k_enc, k_p, k_g, k_h = jax.random.split(key, 4)
    name_p, name_g = self.modalities
    avail_p = batch["modalities"][name_p]["available"]
    avail_g = batch["modalities"][name_g]["available"]
    w = batch["valid"].astype(jnp.float32)
    g_p, _, _ = model.encode_pathology(batch, k_enc)
    g_g, _, _ = model.encode_genomics(batch, jax.random.fold_in(k_enc, 1))
    sigma = self.cfg.warmup_sigma
    e_p = sigma * jax.random.normal(k_p, (2,) + g_p.shape)
    e_g = sigma * jax.random.normal(k_g, (2,) + g_g.shape)
    logit_p = model.head(g_p, e_p[0], e_p[1], key=k_h)
    logit_g = model.head(e_g[0], e_g[1], g_g, key=jax.random.fold_in(k_h, 1))
    loss_p = self._surv(logit_p, batch, w * avail_p)
    loss_g = self._surv(logit_g, batch, w * avail_g)
    return loss_p + loss_g, {"surv_p": loss_p, "surv_g": loss_g}

  def main_loss(self, model, batch, key):
    """Eq. 16 on complete pairs; survival loss alone for unpaired patients (supp. 8.2)."""
    k_enc, k_h = jax.random.split(key)
    c = self.cfg
    comp = model.components(batch, k_enc)
    name_p, name_g = self.modalities
    avail_p = batch["modalities"][name_p]["available"]
    avail_g = batch["modalities"][name_g]["available"]
    w = batch["valid"].astype(jnp.float32)
    paired = w * avail_p * avail_g
    c_hat = 0.5 * (comp["c_pg"] + comp["c_gp"])
    # Unpaired patients: zero u^ for the missing modality; c from the one that is there.
    u_p = jnp.where(avail_p[:, None], comp["u_p"], 0.0)
    u_g = jnp.where(avail_g[:, None], comp["u_g"], 0.0)
    if c.train_patients == "complete":  # every row paired: skip the unpaired branch
      c_in = c_hat
    else:
      c_only_p = self.recover_shared(model, comp["g_p"], comp["u_p"])
      c_only_g = self.recover_shared(model, comp["g_g"], comp["u_g"])
      c_in = jnp.where((avail_p & avail_g)[:, None], c_hat,
                       jnp.where(avail_p[:, None], c_only_p, c_only_g))
    logits = model.head(u_p, c_in, u_g, key=k_h)
    l_surv = self._surv(logits, batch, w)

    targets = dict(comp)
    if c.get("decomp_stop_gradient", False):
      targets["g_p"] = jax.lax.stop_gradient(comp["g_p"])
      targets["g_g"] = jax.lax.stop_gradient(comp["g_g"])
    l_dec, l_sh = decomposition_losses(targets, paired, relative=c.get("decomp_relative", False))
    l_orth = _weighted_mean(jnp.abs(_cos(comp["u_p"], comp["u_g"]))
                            + jnp.abs(_cos(comp["u_p"], comp["c_pg"]))
                            + jnp.abs(_cos(comp["u_g"], comp["c_gp"])), paired)
    loss = l_surv + c.lambda_dec * l_dec + c.lambda_sh * l_sh + c.lambda_orth * l_orth
    metrics = {"surv": l_surv, "decomp": l_dec, "shared": l_sh, "orth": l_orth}
    if c.get("imputer", False) or c.get("missing_weight", 0.0):
      l_miss, l_imp = self.one_modality_losses(model, comp, batch, paired,
                                               jax.random.fold_in(k_h, 1))
      loss = loss + c.get("missing_weight", 0.0) * l_miss + l_imp
      metrics.update(surv_missing=l_miss, impute=l_imp)
    return loss, metrics

  def one_modality_losses(self, model, comp, batch, weights, key):
    """``(L_missing, L_impute)`` on the complete pairs of ``batch`` (``weights``).

    L_missing is the mean over m of the survival loss of the path a patient without m
    takes at inference (eq. 20-22): the head reads ``[u^_have; c~; u_fill]`` with
    ``c~`` = `recover_shared` from the present modality and the fill of the missing
    slot that training can compute: the imputer's (config ``imputer``), else zeros
    (supp. 8.2's unpaired branch). Its gradient reaches the encoders, so they learn to
    predict from one modality too.

    L_impute fits each imputer to the missing modality's u^, relative to its
    between-patient variance (as eq. 13-14), ``sum_j ||f_m(x_j) - u^_mj||^2 /
    sum_j ||u^_mj - mean u^_m||^2`` with ``x = [u^_have; c~]``. Inputs and targets are
    held fixed (stop-gradient) and the head reads the imputer's output held fixed, so
    the imputer is a regression of u^_m on what the present modality gives, no more.
    """
    name_p, name_g = self.modalities
    use_imputer = self.cfg.get("imputer", False)
    losses, imputes = [], []
    for i, (have, miss, name_miss) in enumerate((("p", "g", name_g), ("g", "p", name_p))):
      u_have = comp[f"u_{have}"]
      c_tilde = self.recover_shared(model, comp[f"g_{have}"], u_have)
      if use_imputer:
        x = jax.lax.stop_gradient(jnp.concatenate([u_have, c_tilde], -1))
        u_fill = model.imputers[name_miss](x)
        imputes.append(relative_sq_error(u_fill, jax.lax.stop_gradient(comp[f"u_{miss}"]),
                                         weights))
        u_fill = jax.lax.stop_gradient(u_fill)
      else:
        u_fill = jnp.zeros_like(u_have)
      k = jax.random.fold_in(key, i)
      logits = (model.head(u_have, c_tilde, u_fill, key=k) if have == "p"
                else model.head(u_fill, c_tilde, u_have, key=k))
      losses.append(self._surv(logits, batch, weights))
    return 0.5 * (losses[0] + losses[1]), sum(imputes, jnp.zeros(()))

  def recover_shared(self, model, g, u_hat):
    """The shared component from one modality as the head reads it: ``c~ = g - u^``
    (eq. 20), by default projected onto the shared subspace, ``P (g - u^)``.

    The head is trained on c^ = P c, which lives in the subspace (eq. 9); ``g - u^`` also
    holds the decomposition's residual outside it, which the head never sees.
    ``P c~ = c~`` when eq. 10 holds exactly. Config ``project_recovered_shared = False``
    gives eq. 20 as written. The denoiser's condition is `diffusion_condition`.
    """
    c_tilde = g - u_hat
    if self.cfg.get("project_recovered_shared", True):
      c_tilde = model.project_shared(c_tilde)
    return c_tilde

  def diffusion_condition(self, model, g, u_hat):
    """The c~ the denoiser is conditioned on: eq. 20 as written, ``g - u^``, or (config
    ``ldm.project_condition``) its projection ``P (g - u^)``, whatever the head reads."""
    c_tilde = g - u_hat
    if self.cfg.ldm.get("project_condition", False):
      c_tilde = model.project_shared(c_tilde)
    return c_tilde

  def ldm_features(self, model, batch):
    """Frozen targets and conditions for both denoisers (complete training pairs)."""
    comp = model.components(batch)
    if self.cfg.ldm.condition_source == "c_tilde":  # surrogate condition (supp. 8.2)
      cond_g = self.diffusion_condition(model, comp["g_p"], comp["u_p"])
      cond_p = self.diffusion_condition(model, comp["g_g"], comp["u_g"])
    else:  # the paper: the shared component derived from the available modality
      cond_g, cond_p = comp["c_gp"], comp["c_pg"]
    return {"z_p": comp["u_p"], "z_g": comp["u_g"], "cond_p": cond_p, "cond_g": cond_g}

  def _ldm_stage_fns(self, modality):
    short = "p" if modality == self.modalities[0] else "g"
    use_cls = self.cfg.ldm.condition == "c_cls"

    def prepare(model, feats):
      mean, basis, scale = fit_latent(jnp.asarray(feats[f"z_{short}"]),
                                      self.cfg.ldm.get("latent_dim", 0))
      model.latent_mean[modality][...] = mean
      model.latent_basis[modality][...] = basis
      model.latent_scale[modality][...] = scale
      cond = jnp.asarray(feats[f"cond_{short}"])
      model.cond_mean[modality][...] = jnp.mean(cond, 0)
      model.cond_std[modality][...] = jnp.maximum(jnp.std(cond, 0), 1e-6)

    def loss(model, batch, key):
      z0 = model.encode_latent(modality, batch[f"z_{short}"])
      c = model.standardize_condition(modality, batch[f"cond_{short}"])
      if self.cfg.ldm.get("cond_noise", 0.0) > 0:
        # Noise-conditioning augmentation (Ho et al. 2021, cascaded diffusion): with a few
        # hundred training pairs the denoiser otherwise memorises condition -> latent and
        # retrieves a training latent for an unseen condition.
        key, k_c = jax.random.split(key)
        c = c + self.cfg.ldm.cond_noise * jax.random.normal(k_c, c.shape)
      cond = model.condition(modality, c, use_cls)
      val = denoising_loss(model.denoisers[modality], z0, cond, key, self._schedule())
      return val, {}

    return prepare, loss

  def unimodal_features(self, model, batch):
    """What a one-modality patient shows, per modality m: ``[u^_m; c~_m]`` with
    ``c~_m`` = `recover_shared` from m alone, exactly as at inference; plus labels."""
    out = {"bin": batch["bin"], "event": batch["event"]}
    for short, m in zip("pg", self.modalities):
      g, u = model.specific_only(batch, m)
      out[f"x_{short}"] = jnp.concatenate([u, self.recover_shared(model, g, u)], -1)
      out[f"avail_{short}"] = batch["modalities"][m]["available"].astype(jnp.float32)
    return out

  def unimodal_loss(self, model, batch, key):
    """Survival loss of each unimodal head on its modality's frozen features."""
    w = batch["valid"].astype(jnp.float32)
    metrics = {}
    for i, (short, m) in enumerate(zip("pg", self.modalities)):
      logits = model.unimodal_heads[m](batch[f"x_{short}"], key=jax.random.fold_in(key, i))
      metrics[f"surv_{short}"] = self._surv(logits, batch, w * batch[f"avail_{short}"])
    return metrics["surv_p"] + metrics["surv_g"], metrics

  def stages(self):
    c = self.cfg
    everything_but_ldm = nnx.All(nnx.Param, nnx.Not(nnx.PathContains("denoisers")))

    def adamw(lr, wd):
      return make_optimizer(lr, wd, grad_clip=c.grad_clip, accumulate=self.accumulate)

    out = []
    if c.stage1.epochs:
      out.append(Stage("warmup", self.warmup_loss, adamw(c.stage1.lr, c.stage1.weight_decay),
                       epochs=c.stage1.epochs, trainable=everything_but_ldm,
                       patients=c.train_patients))
    # The main stage trains the missing path when `missing_weight` > 0 and, if the
    # fill is one it trains (not the LDM's, trained later), is chosen on it as well.
    select_present = None
    if c.get("missing_weight", 0.0) and self.fill in ("imputer", "zeros"):
      select_present = (self.modalities,) + tuple((m,) for m in self.modalities)
    out.append(Stage("main", self.main_loss, adamw(c.stage2.lr, c.stage2.weight_decay),
                     epochs=c.stage2.epochs, trainable=everything_but_ldm,
                     patients=c.train_patients, select=c.stage2.get("select") or None,
                     select_present=select_present, patience=c.stage2.get("patience", 0)))
    ldm = c.ldm
    for modality in self.modalities[::-1]:
      prepare, loss = self._ldm_stage_fns(modality)
      out.append(Stage(
          f"ldm_{modality}", loss, make_optimizer(ldm.lr, ldm.weight_decay),
          epochs=max(1, ldm.steps // ldm.steps_per_epoch),
          trainable=nnx.All(nnx.Param, nnx.PathContains("denoisers"),
                            nnx.PathContains(modality)),
          patients="complete", features=self.ldm_features, prepare=prepare,
          steps_per_epoch=ldm.steps_per_epoch, batch_size=ldm.batch_size,
          missing_path_only=True))
    if c.get("unimodal_heads", False):
      uni = c.unimodal
      out.append(Stage(
          "unimodal_heads", self.unimodal_loss, make_optimizer(uni.lr, uni.weight_decay),
          epochs=max(1, uni.steps // uni.steps_per_epoch),
          trainable=nnx.All(nnx.Param, nnx.PathContains("unimodal_heads")),
          patients="any", features=self.unimodal_features,
          steps_per_epoch=uni.steps_per_epoch, batch_size=uni.batch_size,
          missing_path_only=True))
    return out

  # ---- inference -----------------------------------------------------------------------

  def sample_latent(self, model, modality, c_tilde, key):
    """DDIM samples ``[B, S, k]`` of the diffused coordinates of u~ for ``modality``
    given c~ (eq. 21; ``S = ldm.num_samples``)."""
    ldm = self.cfg.ldm
    cond = model.condition(modality, model.standardize_condition(modality, c_tilde),
                           ldm.condition == "c_cls")
    denoiser = model.denoisers[modality]
    precision = self.cfg.get("precision", "float32")
    eps_fn = (denoiser if precision == "float32"
              else functools.partial(denoiser, precision=precision))
    _, samples = ddim.ddim_sample(eps_fn, cond, key, self._schedule(),
                                  num_steps=ldm.ddim_steps, eta=ldm.eta,
                                  num_samples=ldm.num_samples, dim=denoiser.latent_dim,
                                  clip_x0=ldm.get("clip_x0") or None)
    return samples

  def generate(self, model, modality, c_tilde, key):
    """u~ for ``modality`` given c~: the mean of the DDIM samples, decoded to u^ space."""
    return model.decode_latent(modality,
                               self.sample_latent(model, modality, c_tilde, key).mean(axis=1))

  def _hazard_logits(self, model, batch, present, key):
    """The head's logits for ``present`` modalities, with one of them each fill's
    ``{fill: logits}`` (eq. 20-22 for ``diffusion``: c~ from the present modality, u~ of
    the missing one by DDIM; `FILLS`, those the model has); with both, ``{None: logits}``."""
    if present == frozenset(self.modalities):
      comp = model.components(batch)
      c_hat = 0.5 * (comp["c_pg"] + comp["c_gp"])
      return {None: model.head(comp["u_p"], c_hat, comp["u_g"])}
    if len(present) != 1:
      raise ValueError(f"MUST needs at least one modality, got {sorted(present)}")
    (have,) = present
    name_p, name_g = self.modalities
    missing = name_g if have == name_p else name_p
    g, u_have = model.specific_only(batch, have)
    c_tilde = self.recover_shared(model, g, u_have)                            # eq. 20

    def head(u_missing):                                                       # eq. 22
      if have == name_p:
        return model.head(u_have, c_tilde, u_missing)
      return model.head(u_missing, c_tilde, u_have)

    u_gen = self.generate(model, missing, self.diffusion_condition(model, g, u_have),
                          key)                                                 # eq. 21
    out = {"diffusion": head(u_gen), "zeros": head(jnp.zeros_like(u_gen)),
           "mean": head(jnp.broadcast_to(model.latent_mean[missing][...], u_gen.shape))}
    if self.cfg.get("imputer", False):
      out["imputer"] = head(model.imputers[missing](jnp.concatenate([u_have, c_tilde], -1)))
    if self.cfg.get("unimodal_heads", False):
      out["unimodal"] = model.unimodal_heads[have](jnp.concatenate([u_have, c_tilde], -1))
    return out

  def predict(self, model, batch, present, key):
    """``risk``: with a modality missing, the `fill` path's; the other fills as rows."""
    rows = {k: survival.discrete_time_risk(v)
            for k, v in self._hazard_logits(model, batch, present, key).items()}
    if None in rows:
      return {"risk": rows[None]}
    return {"risk": rows.pop(self.fill), **rows}

  def survival(self, model, batch, present, key):
    """Optional hook (`survjax.method.Method`): ``S(k)`` ``[B, K]`` at the end of each bin,
    from the head's discrete hazards of `predict`'s ``risk`` row (``risk = -sum_k S(k)``):
    with both modalities ``phi([u^_P; c^; u^_G])``, with one the diffusion fill of eq. 22
    (DDIM with ``key``; None = ``jax.random.key(0)``)."""
    key = jax.random.key(0) if key is None else key
    logits = self._hazard_logits(model, batch, present, key)
    return survival.survival_curve(logits.get(None, logits.get(self.fill)))

  @property
  def attention(self):
    """Optional hook (`survjax.method.Method`), with a ``pathology`` modality (None
    otherwise): ``(model, batch) -> {modality: [B, N]}`` for each bag modality, the
    TransMIL class token (g) over the patches in the last layer, averaged over heads
    (`survjax.nn.transmil.TransMIL.attention`; sums to 1 over real patches, 0 at
    padding). `specific_attention` gives the u_P class query's instead."""
    if "pathology" not in self.modalities:
      return None

    def attention(model, batch):
      return {name: enc.attention(batch["modalities"][name])
              for name, enc in zip(self.modalities, (model.encoder_p, model.encoder_g))
              if isinstance(enc, BagEncoder)}
    return attention

  def specific_attention(self, model, batch):
    """``{modality: [B, N]}`` for each bag modality: the specific class query's
    (``CLS_uP``, `ClassQuery`) attention over the TransMIL token outputs, i.e. over the
    patches, averaged over heads (sums to 1 over real patches, 0 at padding). Not written
    by ``--mode=predict``."""
    out = {}
    for name, enc, query in zip(self.modalities, (model.encoder_p, model.encoder_g),
                                (model.specific_p, model.specific_g)):
      if isinstance(enc, BagEncoder):
        _, tokens, mask = enc(batch["modalities"][name])
        out[name] = query.attention(tokens, mask)
    return out

  # Sec. 4.4's pairs: specific parts (near-orthogonal), shared parts (aligned), each g
  # against its decomposition, and the two modalities' g.
  representation_pairs = (("u_P", "u_G"), ("c_P<-G", "c_G<-P"), ("g_P", "u_P+c_G<-P"),
                          ("g_G", "u_G+c_P<-G"), ("g_P", "g_G"))

  def representations(self, model, batch):
    """The per-patient vectors of Sec. 4.4 ``{name: [B, D]}``; the evaluation reports each
    one's between-patient spread and the cosines of `representation_pairs`: as the paper
    takes them, ``cos(a,b)``, and centred, ``cos_centred(a,b)``."""
    comp = model.components(batch)
    return {"g_P": comp["g_p"], "g_G": comp["g_g"], "c_P<-G": comp["c_pg"],
            "c_G<-P": comp["c_gp"], "u_P": comp["u_p"], "u_G": comp["u_g"],
            "u_P+c_G<-P": comp["u_p"] + comp["c_gp"], "u_G+c_P<-G": comp["u_g"] + comp["c_pg"]}



def make(config) -> MUST:
  return MUST(config.model, accumulate=config.train.accumulate,
              batch_size=config.train.batch_size)
