r"""PARACHUTE: pathology-radiology cross-modal fusion robust to a missing modality.

Caforio et al., paper text in ``papers/002_*`` (Sec. 3.3-3.6), public PyTorch code at
github.com/PietroCaforio/parachute (``models/parachute``, ``training/survival_trainer.py``).

Forward, per patient ``b`` (one token per modality, as in the paper and the code):

* Adapters (eq. 3). Radiology ``h^x = phi_x(X)``: two blocks of 1-D convolution over the
  slices (kernel 3, stride 1, zero padding 1), ReLU, dropout and a norm, then average
  pooling over the slices. Padded slices are zeroed before each convolution and left out
  of the pooling, so a bag padded to any length gives the same ``h^x`` (the last real slice
  sees a zero neighbour, exactly PyTorch's zero padding of an unpadded volume). The code's
  ``BatchNorm1d`` would mix patients (and padded slices) in its statistics; we use a
  LayerNorm over the channels of each slice instead (per patient, per slice), so a risk
  never depends on the rest of the batch. Pathology ``h^y = phi_y(Y)``: a residual MLP
  (Linear, then blocks ``x + Linear(Drop(GELU(LN(x))))``, final LayerNorm), on a slide
  embedding (``vector`` modality) or on the masked mean of a patch bag (``bag``).
  A missing modality is replaced by a learned token ``t_x`` / ``t_y`` (the data are never
  read).
* LocXEmb (eq. 4): L2-normalised ``h^x, h^y`` in ``R^D``; with one token per modality the
  local similarity is the rank-1 matrix ``S_ij = x_i y_j`` of their entries (the code's
  ``einsum("bi,bj->bij")``), ``P+ = mean top-k(S)``, ``P- = mean top-k(-S)`` over the
  flattened ``D^2`` entries (``k = 16``), computed exactly in ``O(D log D)``
  (`locxemb_rank1`; the dense ``O(D^2)`` form is `locxemb_dense`).
* DCE (eq. 5): ``e = MLP([P+, P-]) + m t_miss``, ``m = 1`` when either modality is missing.
* Hierarchical MHCA (eq. 7), pre-LN blocks ``H = Q + Attn(LN Q, LN K, LN V)``,
  ``out = H + FFN(LN H)``, 4 heads:
  ``f_V = MHCA1(h^x, h^y, h^x + h^y)``, ``f_K = MHCA2(h^x, h^y, h^y)``,
  ``f_Q = MHCA3(h^y, h^x, h^x)``, ``f = LN(MHCA4(f_Q, f_K, f_V + e))`` (eq. 6: ``e`` biases
  the value stream). Attention is per patient: with one key token per patient its
  softmax weight is 1, so each block is its value path, residual and FFN. The public code
  feeds ``[B, D]`` tensors to ``nn.MultiheadAttention`` unbatched, i.e. attends across
  the patients of a batch (a risk then depends on who else is in the batch);
  ``model.reference_cross_batch_attention = True`` reproduces that (padded patients masked).
* Hazard network: 3-layer MLP to a log-risk; Cox partial likelihood (eq. 8, Breslow).
* GCS (eq. 9-10, Alg. 1, `survjax.curvature`): the hazard net gets the plain Cox
  gradient, the fusion encoder the steered feature gradient ``g~_b = s_b g_b``, with the
  curvature ``c_b`` from Hutchinson (Rademacher probes, forward-over-reverse) of the Cox
  loss as a function of ``f`` through the hazard net. Implemented inside the loss with a
  custom VJP on ``f`` (identity forward, backward ``g -> s_b g``), so the core's one jitted
  ``value_and_grad`` step applies it. The gate constants are fixed (see `GCSGate`).

Training: AdamW with a cosine schedule, per-patient modality dropping with probability
``missing_modality_prob`` (one of the two, uniformly; a patient keeps at least one).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from survjax import curvature, survival
from survjax.method import Stage
from survjax.nn.attention import MultiHeadAttention
from survjax.nn.core import LN_EPS, dropout, masked_mean, masked_softmax, split_key
from survjax.train.optim import make_optimizer, matrices_only

RAD, PATH = "radiology", "pathology"


# ---- LocXEmb -----------------------------------------------------------------------


def _l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
  """``x / max(||x||_2, eps)`` over the last axis (``F.normalize``)."""
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


def _topk_mean(s: jax.Array, k: int) -> jax.Array:
  return jnp.mean(jax.lax.top_k(s, min(k, s.shape[-1]))[0], axis=-1)


def locxemb_dense(hx: jax.Array, hy: jax.Array, k: int = 16,
                  normalize: bool = True) -> tuple[jax.Array, jax.Array]:
  r"""Top-k statistics of the token similarity matrix, dense ``O(T_x T_y D)``.

  .. math::

    S^{(b)} = \hat h^{x,(b)} (\hat h^{y,(b)})^\top, \quad
    P_+ = \tfrac{1}{k} \sum \mathrm{Top}\text{-}k(S), \quad
    P_- = \tfrac{1}{k} \sum \mathrm{Top}\text{-}k(-S)

  over the flattened ``T_x T_y`` entries (``k`` clipped to their number).

  Args:
    hx: ``[B, T_x, C]`` tokens.
    hy: ``[B, T_y, C]`` tokens.
    k: top-k size.
    normalize: L2-normalise each token over ``C`` first.

  Returns:
    ``(P+, P-)``, each ``[B]``.
  """
  if normalize:
    hx, hy = _l2_normalize(hx), _l2_normalize(hy)
  s = jnp.einsum("bic,bjc->bij", hx, hy).reshape(hx.shape[0], -1)
  return _topk_mean(s, k), _topk_mean(-s, k)


def _topk_mean_outer(x: jax.Array, y: jax.Array, k: int) -> jax.Array:
  """Mean of the ``k`` largest ``x_i y_j`` over all pairs, from ``2k x 2k`` candidates.

  For fixed ``j``, ``x_i y_j`` is monotone in ``x_i``; so for any pair outside
  (k largest or k smallest of x) x (k largest or k smallest of y) there are ``k``
  candidate pairs at least as large, and the top-k values of the candidates are those of
  all pairs. One sort of each vector: ``O(D log D + k^2)``.
  """
  d = x.shape[-1]
  if 2 * k < d:
    xs, ys = jnp.sort(x, axis=-1), jnp.sort(y, axis=-1)
    x = jnp.concatenate([xs[:, :k], xs[:, -k:]], axis=-1)
    y = jnp.concatenate([ys[:, :k], ys[:, -k:]], axis=-1)
  return _topk_mean((x[:, :, None] * y[:, None, :]).reshape(x.shape[0], -1), k)


def locxemb_rank1(x: jax.Array, y: jax.Array, k: int = 16) -> tuple[jax.Array, jax.Array]:
  r"""`locxemb_dense` of one token per modality, where the similarity of the entries of the
  L2-normalised vectors is the rank-1 matrix ``S_ij = \hat x_i \hat y_j``: exact in
  ``O(D log D)`` (`_topk_mean_outer`); equal to
  ``locxemb_dense(x^[..., None], y^[..., None], k, normalize=False)``.

  Args:
    x, y: ``[B, D]``.
    k: top-k size (clipped to ``D^2``).

  Returns:
    ``(P+, P-)``, each ``[B]``.
  """
  x, y = _l2_normalize(x), _l2_normalize(y)
  k = min(k, x.shape[-1] * y.shape[-1])
  return _topk_mean_outer(x, y, k), _topk_mean_outer(-x, y, k)


# ---- modules -----------------------------------------------------------------------


class RadiologyAdapter(nnx.Module):
  """phi_x: [Conv1d(k=3) -> ReLU -> Dropout -> LayerNorm] x 2 -> masked average pool."""

  def __init__(self, in_dim: int, dim: int, rate: float, *, rngs: nnx.Rngs):
    self.rate = rate
    self.convs = nnx.List([nnx.Conv(d, dim, kernel_size=(3,), padding=((1, 1),), rngs=rngs)
                           for d in (in_dim, dim)])
    self.norms = nnx.List([nnx.LayerNorm(dim, epsilon=LN_EPS, rngs=rngs) for _ in range(2)])

  def __call__(self, x: jax.Array, mask: jax.Array, key=None) -> jax.Array:
    """``x`` ``[B, N, C]``, ``mask`` ``[B, N]`` -> ``[B, dim]``."""
    keep = mask[..., None]
    h = jnp.where(keep, x.astype(jnp.float32), 0.0)
    for conv, norm, k in zip(self.convs, self.norms, split_key(key, 2)):
      h = norm(dropout(jax.nn.relu(conv(h)), self.rate, k))
      h = jnp.where(keep, h, 0.0)
    return masked_mean(h, mask)


class PathologyAdapter(nnx.Module):
  """phi_y: Linear, then residual blocks ``x + Linear(Drop(GELU(LN x)))``, LayerNorm."""

  def __init__(self, in_dim: int, dim: int, depth: int, rate: float, *, rngs: nnx.Rngs):
    self.rate = rate
    self.fc_in = nnx.Linear(in_dim, dim, rngs=rngs)
    self.norms = nnx.List([nnx.LayerNorm(dim, epsilon=LN_EPS, rngs=rngs) for _ in range(depth)])
    self.fcs = nnx.List([nnx.Linear(dim, dim, rngs=rngs) for _ in range(depth)])
    self.out_norm = nnx.LayerNorm(dim, epsilon=LN_EPS, rngs=rngs)

  def __call__(self, x: jax.Array, key=None) -> jax.Array:
    h = self.fc_in(x)
    for norm, fc, k in zip(self.norms, self.fcs, split_key(key, len(self.fcs))):
      h = h + fc(dropout(jax.nn.gelu(norm(h), approximate=False), self.rate, k))
    return self.out_norm(h)


class CrossBlock(nnx.Module):
  """Pre-LN cross-attention block with separate Q, K and V sources (eq. 6-7):

      H = Q + Drop(Attn(LN_q Q, LN_k K, LN_v V)),   out = H + Drop(W_2 GELU(W_1 LN H)).

  The projections are those of `survjax.nn.attention.MultiHeadAttention` (its call takes
  one key/value source, eq. 7 needs two).
  """

  def __init__(self, dim: int, num_heads: int, rate: float, *, rngs: nnx.Rngs):
    self.rate = rate
    self.norm_q, self.norm_k, self.norm_v, self.norm_ffn = (
        nnx.LayerNorm(dim, epsilon=LN_EPS, rngs=rngs) for _ in range(4))
    self.attn = MultiHeadAttention(dim, num_heads, rngs=rngs)
    self.fc1 = nnx.Linear(dim, 2 * dim, rngs=rngs)
    self.fc2 = nnx.Linear(2 * dim, dim, rngs=rngs)

  def __call__(self, q, k, v, kv_mask=None, key=None):
    """``q`` ``[S, Tq, D]``, ``k``/``v`` ``[S, Tk, D]``, ``kv_mask`` ``[S, Tk]`` or None."""
    a, h = self.attn, self.attn.num_heads
    s, tq, d = q.shape
    heads = lambda t: t.reshape(t.shape[0], t.shape[1], h, d // h)
    qh, kh, vh = heads(a.q_proj(self.norm_q(q))), heads(a.k_proj(self.norm_k(k))), heads(
        a.v_proj(self.norm_v(v)))
    logits = jnp.einsum("sqhc,skhc->shqk", qh, kh) * (d // h) ** -0.5
    weights = masked_softmax(logits, None if kv_mask is None else kv_mask[:, None, None, :])
    ctx = jnp.einsum("shqk,skhc->sqhc", weights, vh).reshape(s, tq, d)
    k1, k2, k3 = split_key(key, 3)
    x = q + dropout(a.out_proj(ctx), self.rate, k1)
    ffn = self.fc2(dropout(jax.nn.gelu(self.fc1(self.norm_ffn(x)), approximate=False),
                           self.rate, k2))
    return x + dropout(ffn, self.rate, k3)


class HazardNet(nnx.Module):
  """g_theta: Linear -> ReLU -> Drop -> Linear -> ReLU -> Drop -> Linear(1)."""

  def __init__(self, dim: int, hidden: int, rate: float, *, rngs: nnx.Rngs):
    self.rate = rate
    self.fc1 = nnx.Linear(dim, hidden, rngs=rngs)
    self.fc2 = nnx.Linear(hidden, dim, rngs=rngs)
    self.fc3 = nnx.Linear(dim, 1, rngs=rngs)

  def __call__(self, f: jax.Array, key=None) -> jax.Array:
    k1, k2 = split_key(key, 2)
    h = dropout(jax.nn.relu(self.fc1(f)), self.rate, k1)
    h = dropout(jax.nn.relu(self.fc2(h)), self.rate, k2)
    return self.fc3(h)[:, 0]


class ParachuteModel(nnx.Module):
  """Adapters, missing tokens, LocXEmb + DCE, hierarchical MHCA and the hazard net."""

  def __init__(self, info: dict, cfg, *, rngs: nnx.Rngs):
    d, rate = cfg.dim, cfg.dropout
    self.path_is_bag = info[PATH]["kind"] == "bag"
    self.use_dce = bool(cfg.dce)
    self.topk = int(cfg.topk)
    self.cross_batch = bool(cfg.reference_cross_batch_attention)
    self.rad = RadiologyAdapter(info[RAD]["dim"], d, rate, rngs=rngs)
    self.path = PathologyAdapter(info[PATH]["dim"], d, cfg.adapter_depth, rate, rngs=rngs)
    init = nnx.initializers.normal(0.02)
    self.miss_rad = nnx.Param(init(rngs.params(), (d,)))
    self.miss_path = nnx.Param(init(rngs.params(), (d,)))
    if self.use_dce:
      self.dce1 = nnx.Linear(2, cfg.dce_hidden, rngs=rngs)
      self.dce2 = nnx.Linear(cfg.dce_hidden, d, rngs=rngs)
      self.miss_dce = nnx.Param(jnp.zeros((d,)))   # t_miss (zeros as in the code)
    self.mhca = nnx.List([CrossBlock(d, cfg.num_heads, cfg.attn_dropout, rngs=rngs)
                          for _ in range(4)])
    self.out_norm = nnx.LayerNorm(d, epsilon=LN_EPS, rngs=rngs)
    self.hazard = HazardNet(d, cfg.hazard_hidden, rate, rngs=rngs)

  def _tokens(self, batch, avail, present, key):
    """``h^x, h^y`` ``[B, D]`` with missing tokens where ``avail`` is False."""
    mods = batch["modalities"]
    b = batch["valid"].shape[0]
    k_rad, k_path = split_key(key, 2)
    out = []
    for name, token, k in ((RAD, self.miss_rad, k_rad), (PATH, self.miss_path, k_path)):
      miss = jnp.broadcast_to(token[...], (b, token.shape[0]))
      if name not in present:      # never touch the data of a withheld modality
        out.append(miss)
        continue
      m, ok = mods[name], avail[name]
      if name == RAD:
        h = self.rad(m["x"], m["mask"] & ok[:, None], k)
      else:
        x = m["x"].astype(jnp.float32)
        if self.path_is_bag:
          x = masked_mean(jnp.where(m["mask"][..., None] & ok[:, None, None], x, 0.0),
                          m["mask"])
        else:
          x = jnp.where(ok[:, None], x, 0.0)
        h = self.path(x, k)
      out.append(jnp.where(ok[:, None], h, miss))
    return out

  def fuse(self, batch, avail: dict, present, key=None):
    """Fused features ``f`` ``[B, D]`` and the missing flag ``m`` ``[B]`` (float)."""
    k_tok, k_dce, *k_att = split_key(key, 6)
    hx, hy = self._tokens(batch, avail, present, k_tok)
    missing = 1.0 - (avail[RAD] & avail[PATH]).astype(jnp.float32)
    e = 0.0
    if self.use_dce:
      p_pos, p_neg = locxemb_rank1(hx, hy, self.topk)
      e = self.dce2(jax.nn.gelu(self.dce1(jnp.stack([p_pos, p_neg], -1)), approximate=False))
      e = e + missing[:, None] * self.miss_dce[...]
    if self.cross_batch:   # reference: the batch is one sequence; padded patients masked
      seq, kv_mask = (lambda t: t[None]), batch["valid"][None]
    else:                  # per patient: one token each
      seq, kv_mask = (lambda t: t[:, None]), None
    x, y = seq(hx), seq(hy)
    e = seq(jnp.broadcast_to(e, hx.shape))
    f_v = self.mhca[0](x, y, x + y, kv_mask, k_att[0])
    f_k = self.mhca[1](x, y, y, kv_mask, k_att[1])
    f_q = self.mhca[2](y, x, x, kv_mask, k_att[2])
    f = self.mhca[3](f_q, f_k, f_v + e, kv_mask, k_att[3])
    f = f[0] if self.cross_batch else f[:, 0]
    return self.out_norm(f), missing


def reference_parachute_cindex(risk, time, event, eps: float = 1e-8) -> float:
  """The public code's evaluation metric, for comparison only (survjax reports Harrell's C).

  Its ``cindex(preds_hazard, time, event)`` calls ``concordance_index_torch(time,
  preds_hazard, event)``, whose arguments are ``(scores, times, events)``: times and
  predicted hazards are swapped. What it then computes is, over the pairs ``(i, j)`` with
  ``r_j < r_i`` and ``delta_j = 1``, the share with ``t_j > t_i`` (ties in ``t`` count one
  half): a concordance that conditions on the lower-risk patient's event rather than on
  the earlier one's, so it does not equal Harrell's C, and a censored patient with a short
  follow-up never enters as ``j``. A numpy transcription of the code, kept so the
  difference can be shown (`tests/test_parachute.py`).
  """
  scores = np.asarray(time, np.float64)      # the code's predicted_scores
  times = np.asarray(risk, np.float64)       # the code's event_times
  observed = np.asarray(event).astype(bool)
  diff_t = times[None, :] - times[:, None]   # [i, j] = x_j - x_i, as unsqueeze(0) - (1)
  diff_s = scores[None, :] - scores[:, None]
  valid = (diff_t < 0) & observed[None, :]
  concordant = ((diff_s > 0) & valid).sum()
  tied = ((np.abs(diff_s) < eps) & valid).sum()
  return float((concordant + 0.5 * tied) / (valid.sum() + eps))


def drop_modalities(key: jax.Array, avail: dict, prob: float) -> dict:
  """Training-time missingness: each patient with both modalities loses one of them
  (uniformly) with probability ``prob``."""
  if prob <= 0:
    return avail
  k_lose, k_which = jax.random.split(key)
  b = avail[RAD].shape[0]
  lose = jax.random.bernoulli(k_lose, prob, (b,)) & avail[RAD] & avail[PATH]
  which_rad = jax.random.bernoulli(k_which, 0.5, (b,))
  return {RAD: avail[RAD] & ~(lose & which_rad), PATH: avail[PATH] & ~(lose & ~which_rad)}


@dataclasses.dataclass
class Parachute:
  """The PARACHUTE method (see the module docstring)."""

  cfg: object
  accumulate: int = 1
  name: str = "parachute"
  modalities: tuple = (RAD, PATH)
  time_model: str = "cox"
  num_bins: int = 0

  def build(self, info, rngs):
    return ParachuteModel(info, self.cfg, rngs=rngs)

  @property
  def gate(self) -> curvature.GCSGate:
    g = self.cfg.gcs
    return curvature.GCSGate(a_curv=g.a_curv, a_grad=g.a_grad, a_missing=g.a_missing,
                             bias=g.bias, gamma=g.gamma)

  def loss(self, model, batch, key):
    """Cox partial NLL with training-time missingness and (optionally) GCS."""
    k_drop, k_fuse, k_haz, k_probe = jax.random.split(key, 4)
    mods = batch["modalities"]
    avail = drop_modalities(k_drop, {m: mods[m]["available"] for m in self.modalities},
                            self.cfg.missing_modality_prob)
    f, missing = model.fuse(batch, avail, frozenset(self.modalities), k_fuse)
    w = (batch["valid"] & batch["labelled"]).astype(jnp.float32)
    metrics = {}
    if self.cfg.gcs.enabled:
      n_events = jnp.sum(w * batch["event"])

      def summed_loss(feats):   # per-patient scale (see GCSGate)
        risk = model.hazard(feats, k_haz)
        return n_events * survival.cox_partial_nll(risk, batch["time"], batch["event"], w)

      g, c = curvature.hutchinson_rows(summed_loss, jax.lax.stop_gradient(f), k_probe,
                                       self.cfg.gcs.num_probes)
      gnorm = jnp.linalg.norm(g, axis=-1)
      gate = self.gate
      weight = curvature.gcs_gate(c, gnorm, missing, gate)
      scale = jax.lax.stop_gradient(curvature.gcs_scale(c, weight, gate.gamma))
      f = curvature.steer_cotangent(f, scale)
      wm, wc = w * missing, w * (1.0 - missing)
      metrics = {"curv_missing": survival.weighted_mean(c, wm), "curv_complete": survival.weighted_mean(c, wc),
                 "gnorm_missing": survival.weighted_mean(gnorm, wm),
                 "gnorm_complete": survival.weighted_mean(gnorm, wc),
                 "gate_mean": survival.weighted_mean(weight, w), "scale_mean": survival.weighted_mean(scale, w)}
    risk = model.hazard(f, k_haz)
    return survival.cox_partial_nll(risk, batch["time"], batch["event"], w), metrics

  def stages(self):
    cfg = self.cfg

    def optimizer(total_steps):
      return make_optimizer(cfg.lr, cfg.weight_decay, cfg.grad_clip, self.accumulate,
                            schedule="cosine", total_steps=total_steps,
                            warmup_steps=int(cfg.warmup_frac * total_steps),
                            decay_mask=matrices_only)

    return [Stage("train", self.loss, optimizer, epochs=cfg.epochs, patients="any",
                  select=cfg.get("select") or None)]

  def predict(self, model, batch, present, key):
    b = batch["valid"].shape[0]
    avail = {m: (batch["modalities"][m]["available"] if m in present
                 else jnp.zeros((b,), bool)) for m in self.modalities}
    f, _ = model.fuse(batch, avail, frozenset(present), None)
    return {"risk": model.hazard(f, None)}


def make(config) -> Parachute:
  return Parachute(cfg=config.model, accumulate=config.train.accumulate)
