r"""TTA: Together, Then Apart (pathology bag + genomics), a min-max reading of fusion.

Model (the public reference's released configuration; ``d = 256``, ``K = 32``):

* Encoders. Patches: ``Linear(D -> d)``, LeakyReLU(0.1), dropout 0.3, per patch; padded
  patches are masked. Genomics: one token per gene group, ``Linear(|p| -> d)``,
  LeakyReLU(0.1), dropout 0.3. Genomic columns are standardised with the training fold's
  mean and std, stored in non-trainable variables by a first feature stage
  (``gene_stats``: no optimiser step; its `Stage.prepare` reads the fold's genomics).
* Together. ``K`` shared prototypes ``P``; token logits ``l_ik = cos(W_m x_i, P_k) / 0.5``
  (a projection ``W_m`` per modality); the transport plan ``Q`` of the tokens onto the
  prototypes plus a zero-cost dustbin is an unbalanced entropic OT solved by ott-jax for
  the whole batch at once (`survjax.ot`): cost ``-log softmax(l)``, hard uniform token
  marginal over real tokens, prototype marginal ``rho / K`` relaxed by ``KL`` (``gamma =
  1``, ``eps = 0.1``), dustbin mass ``1 - rho``, ``rho = 0.1 + 0.9 exp(-5 (1 - t)^2)``
  with ``t`` = epochs elapsed / 10 (clipped to 1; 1 at evaluation). Image and omic
  tokens are solved jointly (``ot.joint``). Token weights ``w = 0.5 softmax(l) + 0.5
  Q_row`` (plan rows renormalised over the prototypes), prototype tokens ``T = w^T X``.
* Apart. A learned anchor per modality; ``[T_m; a_m]`` through a refinement layer
  (pre-LN self-attention + FFN, final LayerNorm); summary ``p_m = normalise(MLP(mean))``.
  A modality that is absent (scenario) or unavailable (row) contributes no tokens: its
  ``K`` prototype tokens are its anchor.
* Fusion. Self-attention over ``[genomic prototypes; pathology prototypes]``, mean-pool
  each half, concatenate, linear head: a log-risk (Cox) or 4 hazard logits (discrete).

Min-max reading, exactly as trained. One loss is *minimised* over every `nnx.Param`
(encoders, projections, prototypes, anchors, refinement, fusion, head) by AdamW:

    L = L_surv + 0.5 (CE(l_path, Q_path) + CE(l_gen, Q_gen)) + 0.5 L_apart.

*Together* is the min: the plan ``Q`` minimises the UOT objective for the current
parameters (Sinkhorn, inner problem; ``Q`` is a stop-gradient pseudo-label unless
``ot.grad = "implicit"``), and the soft cross-entropy pulls the token logits towards it.
*Apart* is the max: ``L_apart`` is the two-way InfoNCE (temperature 0.1) between the
modality summaries ``p_m`` and the anchors; minimising it *maximises* each summary's
similarity margin to its own anchor over the other modality's (and each anchor's over the
other summary), i.e. the modalities' distinctiveness. No parameter is updated by gradient
ascent; the max is this negated-likelihood term, as in the reference.

Not copied from the reference: random test-bag subsampling (evaluation reads whole bags,
``eval.max_instances = 0``, or the core's evenly spaced deterministic subsample), its
schedule counter advancing twice per step, and model selection on the test fold.
``rho``'s ramp reads a `Clock` parameter that its own optimiser branch advances by
``1 / steps_per_epoch`` per step (its gradient is never used), since the contract
passes no epoch to ``loss_fn``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from survjax import ot, survival
from survjax.method import Stage
from survjax.nn.attention import TransformerLayer
from survjax.nn.core import dropout, masked_softmax, split_key
from survjax.train.optim import make_optimizer, matrices_only

PATH, GEN = "pathology", "genomics"


class GeneStats(nnx.Variable):
  """Non-trainable training-fold statistics of the genomic columns."""


class Clock(nnx.Param):
  """Epochs elapsed in the training stage (advanced by `_clock_tx`, never by gradients)."""


def rho_schedule(t):
  """``rho(t) = 0.1 + 0.9 exp(-5 (1 - t)^2)``, ``t`` in ``[0, 1]`` (clipped)."""
  t = jnp.clip(t, 0.0, 1.0)
  return 0.1 + 0.9 * jnp.exp(-5.0 * (1.0 - t) ** 2)


def _leaky(x):
  return jax.nn.leaky_relu(x, 0.1)


def _normalise(x, axis=-1):
  """``x / max(|x|, 1e-6)``, with a finite gradient at ``x = 0`` (padded tokens)."""
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=axis, keepdims=True), 1e-12))


@dataclasses.dataclass(frozen=True)
class _OT:
  """The OT settings the forward pass reads (hashable: it lives in the graphdef)."""
  epsilon: float
  gamma: float
  joint: bool
  structure_lambda: float
  outer_iterations: int
  threshold: float
  max_iterations: int
  grad: str
  mode: str
  momentum: float
  inner_iterations: int
  patients_per_solve: int


@dataclasses.dataclass(frozen=True)
class _Hyper:
  dim: int
  num_prototypes: int
  proto_temperature: float
  dropout: float
  ot: _OT


class TTAModel(nnx.Module):

  def __init__(self, info: dict, cfg, *, rngs: nnx.Rngs):
    d, k = cfg.dim, cfg.num_prototypes
    self.cfg = _Hyper(d, k, float(cfg.proto_temperature), float(cfg.dropout),
                      _OT(**{f.name: cfg.ot[f.name] for f in dataclasses.fields(_OT)}))
    self.group_sizes = tuple(int(s) for s in info[GEN]["group_sizes"])
    cols = sum(self.group_sizes)
    out = 1 if cfg.time_model == "cox" else cfg.num_bins
    self.patch_embed = nnx.Linear(info[PATH]["dim"], d, rngs=rngs)
    self.gene_embed = nnx.List([nnx.Linear(s, d, rngs=rngs) for s in self.group_sizes])
    self.gene_mean = GeneStats(jnp.zeros((cols,)))
    self.gene_std = GeneStats(jnp.ones((cols,)))
    self.prototypes = nnx.Param(jax.random.normal(rngs.params(), (k, d)))
    self.proj = nnx.Dict({m: nnx.Linear(d, d, rngs=rngs) for m in (PATH, GEN)})
    self.anchors = nnx.Dict({m: nnx.Param(0.02 * jax.random.normal(rngs.params(), (d,)))
                             for m in (PATH, GEN)})
    self.refine = nnx.Dict({m: TransformerLayer(d, cfg.num_heads, dropout=cfg.dropout_attn,
                                                rngs=rngs) for m in (PATH, GEN)})
    self.refine_norm = nnx.Dict({m: nnx.LayerNorm(d, rngs=rngs) for m in (PATH, GEN)})
    self.summary1 = nnx.Linear(d, d, rngs=rngs)
    self.summary2 = nnx.Linear(d, d, rngs=rngs)
    self.fusion = TransformerLayer(d, cfg.num_heads, dropout=cfg.dropout_attn, rngs=rngs)
    self.head = nnx.Linear(2 * d, out, rngs=rngs)
    self.clock = Clock(jnp.zeros(()))

  # ---- encoders --------------------------------------------------------------------

  def tokens(self, batch, present, key):
    """``{m: (tokens [B, N_m, d], mask [B, N_m])}`` for the present modalities only."""
    k_p, k_g = split_key(key, 2)
    out = {}
    if PATH in present:
      m = batch["modalities"][PATH]
      mask = m["mask"] & m["available"][:, None]
      x = jnp.where(mask[..., None], m["x"].astype(jnp.float32), 0.0)
      out[PATH] = (dropout(_leaky(self.patch_embed(x)), self.cfg.dropout, k_p), mask)
    if GEN in present:
      m = batch["modalities"][GEN]
      avail = m["available"]
      x = (m["x"].astype(jnp.float32) - self.gene_mean[...]) / self.gene_std[...]
      x = jnp.where(avail[:, None], x, 0.0)
      toks, start = [], 0
      for size, lin in zip(self.group_sizes, self.gene_embed):
        toks.append(_leaky(lin(x[:, start:start + size])))
        start += size
      toks = dropout(jnp.stack(toks, axis=1), self.cfg.dropout, k_g)
      out[GEN] = (toks, jnp.broadcast_to(avail[:, None], toks.shape[:2]))
    return out

  def logits(self, name, x):
    """``cos(W_m x, P) / temperature``: ``[B, N, K]``."""
    p = _normalise(self.prototypes[...])
    return _normalise(self.proj[name](x)) @ p.T / self.cfg.proto_temperature

  # ---- Together --------------------------------------------------------------------

  def plans(self, toks, logits, rho):
    """Transport plans ``{m: [B, N_m, K + 1]}`` (stop-gradient unless ``ot.grad``)."""
    o = self.cfg.ot
    implicit = o.grad == "implicit"
    kw = dict(epsilon=o.epsilon, gamma=o.gamma, dustbin=True,
              structure_lambda=o.structure_lambda, outer_iterations=o.outer_iterations,
              threshold=o.threshold, max_iterations=o.max_iterations, implicit=implicit,
              # ott's implicit differentiation runs in the log domain only
              mode="lse" if implicit else o.mode, momentum=o.momentum,
              inner_iterations=o.inner_iterations)
    names = list(toks)
    if o.grad != "implicit":
      logits = {m: jax.lax.stop_gradient(l) for m, l in logits.items()}
    feats = {m: (toks[m][0] if o.structure_lambda > 0 else None) for m in names}
    if o.structure_lambda > 0 and o.grad != "implicit":
      feats = {m: jax.lax.stop_gradient(f) for m, f in feats.items()}

    def solve(ms):
      cat = lambda parts: jnp.concatenate(parts, axis=1)
      f = cat([feats[m] for m in ms]) if o.structure_lambda > 0 else None
      plan, _ = ot.batched_plan(cat([logits[m] for m in ms]), cat([toks[m][1] for m in ms]),
                                rho, f, patients_per_solve=o.patients_per_solve, **kw)
      sizes = [toks[m][0].shape[1] for m in ms]
      splits = jnp.split(plan, [sum(sizes[:i + 1]) for i in range(len(sizes) - 1)], axis=1)
      return dict(zip(ms, splits))

    if o.joint and names:
      return solve(names)
    out = {}
    for m in names:
      out.update(solve([m]))
    return out

  # ---- Apart -----------------------------------------------------------------------

  def refined(self, name, proto_tokens, key):
    """``[T_m; a_m]`` through the refinement layer -> (refined prototypes, summary)."""
    b, k, d = proto_tokens.shape
    anchor = jnp.broadcast_to(self.anchors[name][...], (b, 1, d))
    h = self.refine_norm[name](self.refine[name](
        jnp.concatenate([proto_tokens, anchor], axis=1), key=key))
    s = jnp.mean(h, axis=1)
    p = _normalise(self.summary2(jax.nn.relu(self.summary1(s))))
    return h[:, :k], p

  def forward(self, batch, present, key=None, rho=1.0):
    """Everything the losses and predictions need."""
    k_tok, k_ref_p, k_ref_g, k_fuse = split_key(key, 4)
    toks = self.tokens(batch, present, k_tok)
    logits = {m: self.logits(m, x) for m, (x, _) in toks.items()}
    plans = self.plans(toks, logits, rho)
    b = batch["valid"].shape[0]
    k, d = self.cfg.num_prototypes, self.cfg.dim
    out = {"logits": logits, "plans": plans, "masks": {m: t[1] for m, t in toks.items()},
           "summary": {}, "available": {}}
    halves = []
    for name, k_ref in ((GEN, k_ref_g), (PATH, k_ref_p)):
      anchor = jnp.broadcast_to(self.anchors[name][...], (b, k, d))
      if name in toks:
        x, mask = toks[name]
        soft = masked_softmax(logits[name], mask[..., None])
        q = plans[name][..., :k]
        q = q / jnp.maximum(jnp.sum(q, axis=-1, keepdims=True), 1e-30)
        w = jnp.where(mask[..., None], 0.5 * soft + 0.5 * q, 0.0)
        proto = jnp.einsum("bnk,bnd->bkd", w, x)
        avail = batch["modalities"][name]["available"]
        proto = jnp.where(avail[:, None, None], proto, anchor)
        out["available"][name] = avail
      else:
        proto = anchor
      h, p = self.refined(name, proto, k_ref)
      out["summary"][name] = p
      halves.append(h)
    fused = self.fusion(jnp.concatenate(halves, axis=1), key=k_fuse)
    pooled = jnp.concatenate([jnp.mean(fused[:, :k], 1), jnp.mean(fused[:, k:], 1)], -1)
    out["head"] = self.head(pooled)
    return out


def instance_ce(logits, plan, mask, row_weights):
  """Soft cross-entropy of token logits ``[B, N, K]`` against the plan ``[B, N, K + 1]``.

  Targets are the plan rows over the prototypes, renormalised; each real token is
  weighted by the share of its mass the plan sends to prototypes (not the dustbin).
  Mean over tokens per patient, then weighted mean over patients (``row_weights``).
  """
  k = logits.shape[-1]
  plan = jax.lax.stop_gradient(plan)
  proto_mass = jnp.sum(plan[..., :k], axis=-1)
  q = plan[..., :k] / jnp.maximum(proto_mass, 1e-30)[..., None]
  share = proto_mass / jnp.maximum(jnp.sum(plan, axis=-1), 1e-30)
  u = jnp.where(mask, share, 0.0)
  ce = -jnp.sum(q * jax.nn.log_softmax(logits, axis=-1), axis=-1)
  per_patient = jnp.sum(u * ce, axis=-1) / jnp.maximum(jnp.sum(u, axis=-1), 1e-12)
  return survival.weighted_mean(per_patient, row_weights)


def apart_loss(summary, anchors, both, temperature):
  """Two-way InfoNCE between modality summaries ``{m: [B, d]}`` and anchors ``{m: [d]}``,
  on the rows where both modalities are available (``both``)."""
  names = (PATH, GEN)
  p = jnp.stack([summary[m] for m in names], axis=1)                  # [B, 2, d]
  a = _normalise(jnp.stack([anchors[m][...] for m in names], axis=0))  # [2, d]
  sim = jnp.einsum("bmd,nd->bmn", p, a) / temperature                 # summary m vs anchor n
  eye = jnp.eye(len(names))
  s2a = -jnp.sum(eye * jax.nn.log_softmax(sim, axis=-1), axis=(1, 2)) / len(names)
  a2s = -jnp.sum(eye * jax.nn.log_softmax(sim, axis=-2), axis=(1, 2)) / len(names)
  return survival.weighted_mean(0.5 * (s2a + a2s), both)


def _clock_tx(step: float) -> optax.GradientTransformation:
  """Ignores the gradient and adds ``step`` to each parameter every update."""
  return optax.GradientTransformation(
      lambda params: optax.EmptyState(),
      lambda updates, state, params=None: (jax.tree.map(
          lambda u: jnp.full_like(u, step), updates), state))


def _clock_labels(params):
  def label(path, _):
    return "clock" if any(getattr(p, "key", None) == "clock" for p in path) else "params"
  return jax.tree_util.tree_map_with_path(label, params)


@dataclasses.dataclass
class TTA:
  cfg: object
  accumulate: int = 1
  name: str = "tta"
  modalities: tuple = (PATH, GEN)

  @property
  def time_model(self):
    return self.cfg.time_model

  @property
  def num_bins(self):
    return self.cfg.num_bins if self.cfg.time_model == "discrete" else 0

  def build(self, info, rngs):
    return TTAModel(info, self.cfg, rngs=rngs)

  # ---- stages ----------------------------------------------------------------------

  def optimizer(self, total_steps: int) -> optax.GradientTransformation:
    c = self.cfg
    main = make_optimizer(c.lr, c.weight_decay, c.grad_clip, self.accumulate, "cosine",
                          total_steps=total_steps,
                          warmup_steps=int(round(c.warmup_fraction * total_steps)),
                          decay_mask=matrices_only)
    return optax.multi_transform(
        {"params": main, "clock": _clock_tx(c.epochs / max(total_steps, 1))}, _clock_labels)

  def loss(self, model, batch, key):
    c = self.cfg
    k_drop, k_fwd = jax.random.split(key)
    if c.modality_dropout > 0:
      batch = _drop_modalities(batch, c.modality_dropout, k_drop)
    rho = rho_schedule(jax.lax.stop_gradient(model.clock[...]) / c.rho_ramp_epochs)
    out = model.forward(batch, self.modalities, k_fwd, rho)
    w = (batch["valid"] & batch["labelled"]).astype(jnp.float32)
    surv = self._survival_loss(out["head"], batch, w)
    ce = {m: instance_ce(out["logits"][m], out["plans"][m], out["masks"][m],
                         w * out["available"][m]) for m in self.modalities}
    both = w * out["available"][PATH] * out["available"][GEN]
    apart = apart_loss(out["summary"], model.anchors, both, c.contrast_temperature)
    total = surv + c.ce_weight * (ce[PATH] + ce[GEN]) + c.apart_weight * apart
    dust = {m: jnp.sum(out["plans"][m][..., -1]) / jnp.maximum(
        jnp.sum(out["plans"][m]), 1e-12) for m in self.modalities}
    return total, {"surv": surv, "ce_path": ce[PATH], "ce_gen": ce[GEN], "apart": apart,
                   "rho": rho, "dustbin_path": dust[PATH]}

  def _survival_loss(self, head, batch, w):
    if self.cfg.time_model == "cox":
      return survival.cox_partial_nll(head[:, 0], batch["time"], batch["event"], w)
    return survival.discrete_time_nll(head, batch["bin"], batch["event"], w)

  def gene_features(self, model, batch):
    m = batch["modalities"][GEN]
    return {"x": m["x"], "available": m["available"]}

  def stages(self):
    def prepare(model, feats):
      avail = jnp.asarray(feats["available"]).astype(jnp.float32)[:, None]
      x = jnp.where(avail > 0, jnp.asarray(feats["x"]), 0.0)
      n = jnp.maximum(jnp.sum(avail), 1.0)
      mean = jnp.sum(x, 0) / n
      var = jnp.sum(avail * (x - mean) ** 2, 0) / n
      model.gene_mean[...] = mean
      model.gene_std[...] = jnp.where(var > 1e-12, jnp.sqrt(var), 1.0)

    def no_step(model, batch, key):
      return jnp.zeros(()), {}

    c = self.cfg
    stats = Stage("gene_stats", no_step, optax.set_to_zero(), epochs=1,
                  features=self.gene_features, prepare=prepare, steps_per_epoch=1,
                  batch_size=1)
    main = Stage("train", self.loss, self.optimizer, epochs=c.epochs,
                  select=c.get("select") or None)
    return [stats, main] if c.standardize_genomics else [main]

  def predict(self, model, batch, present, key):
    out = model.forward(batch, tuple(m for m in self.modalities if m in present), None, 1.0)
    if self.cfg.time_model == "cox":
      return {"risk": out["head"][:, 0]}
    return {"risk": survival.discrete_time_risk(out["head"])}


def _drop_modalities(batch, rate, key):
  """Training-time modality dropout: each row loses one modality (chosen uniformly) with
  probability ``rate``, only where both are available; data stay, ``available`` drops."""
  k_lose, k_pick = jax.random.split(key)
  b = batch["valid"].shape[0]
  mods = batch["modalities"]
  both = mods[PATH]["available"] & mods[GEN]["available"]
  lose = both & jax.random.bernoulli(k_lose, rate, (b,))
  pick_path = jax.random.bernoulli(k_pick, 0.5, (b,))
  new = dict(mods)
  new[PATH] = {**mods[PATH], "available": mods[PATH]["available"] & ~(lose & pick_path)}
  new[GEN] = {**mods[GEN], "available": mods[GEN]["available"] & ~(lose & ~pick_path)}
  return {**batch, "modalities": new}


def make(config) -> TTA:
  return TTA(cfg=config.model, accumulate=config.train.accumulate)
