"""Unimodal baselines of the MUST paper's table: ABMIL, TransMIL, SNN and MLP.

Each encodes one modality and maps it to K discrete hazard logits trained with the
discrete-time NLL, as in the MCAT/SurvPath code the MUST paper follows for its baselines
(Adam(W), lr 2e-4, weight decay 1e-5, 4 time bins). They share the core with MUST, so
their rows sit on the same folds as MUST's.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from survjax import survival
from survjax.errors import InputError, check_count
from survjax.method import Stage
from survjax.nn.genomic import SNN
from survjax.nn.mil import GatedABMIL
from survjax.nn.transmil import TransMIL
from survjax.train.optim import make_optimizer


class _Head(nnx.Module):

  def __init__(self, dim, num_bins, *, rngs):
    self.out = nnx.Linear(dim, num_bins, rngs=rngs)

  def __call__(self, h):
    return self.out(h)


class ABMILModel(nnx.Module):

  def __init__(self, in_dim, cfg, *, rngs):
    self.pool = GatedABMIL(in_dim, cfg.dim, rngs=rngs)
    self.head = _Head(cfg.dim, cfg.num_bins, rngs=rngs)

  def __call__(self, m, key=None):
    pooled, _ = self.pool(m["x"].astype(jnp.float32), m["mask"])
    return self.head(pooled)


class TransMILModel(nnx.Module):

  def __init__(self, in_dim, cfg, *, rngs):
    self.encoder = TransMIL(in_dim, dim=cfg.dim, num_heads=cfg.num_heads,
                            num_landmarks=cfg.num_landmarks, rngs=rngs)
    self.head = _Head(cfg.dim, cfg.num_bins, rngs=rngs)

  def __call__(self, m, key=None):
    cls = self.encoder(m["x"].astype(jnp.float32), m["mask"], key=key)
    return self.head(cls[:, 0])


class TabularModel(nnx.Module):
  """SNN (Klambauer et al.) or a plain ReLU MLP on all columns of a tokens modality."""

  def __init__(self, in_dim, cfg, *, snn: bool, rngs):
    self.snn = snn
    if snn:
      self.encoder = SNN(in_dim, cfg.dim, cfg.depth, cfg.dropout, rngs=rngs)
    else:
      self.layers = nnx.List([nnx.Linear(in_dim if i == 0 else cfg.dim, cfg.dim, rngs=rngs)
                              for i in range(cfg.depth)])
    self.head = _Head(cfg.dim, cfg.num_bins, rngs=rngs)

  def __call__(self, m, key=None):
    x = m["x"].astype(jnp.float32)
    if self.snn:
      h = self.encoder(x, key=key)
    else:
      h = x
      for layer in self.layers:
        h = jax.nn.relu(layer(h))
    return self.head(h)


@dataclasses.dataclass
class Unimodal:
  """A one-modality discrete-time survival method."""

  name: str
  modality: str
  cfg: object
  accumulate: int = 1   # the run's train.accumulate
  time_model: str = "discrete"

  def __post_init__(self):
    """Checks the widths the config sets, before anything is built or written."""
    c = self.cfg
    for key, what in (("dim", "a width"), ("depth", "a depth"), ("num_heads", "a head count")):
      check_count(c.get(key, 1), f"config.model.{key}", 1, what)
    if c.get("num_heads") and c.dim % c.num_heads:
      raise InputError(f"num_heads {c.num_heads} does not divide dim {c.dim}, expected a "
                       "divisor", path="config.model.num_heads")

  @property
  def modalities(self):
    return (self.modality,)

  @property
  def num_bins(self):
    return self.cfg.num_bins

  def build(self, info, rngs):
    dim = info[self.modality]["dim"]
    if self.name == "abmil":
      return ABMILModel(dim, self.cfg, rngs=rngs)
    if self.name == "transmil":
      return TransMILModel(dim, self.cfg, rngs=rngs)
    return TabularModel(dim, self.cfg, snn=self.name == "snn", rngs=rngs)

  def stages(self):
    def loss(model, batch, key):
      m = batch["modalities"][self.modality]
      logits = model(m, key=key)
      w = batch["valid"].astype(jnp.float32) * m["available"]
      nll = survival.discrete_time_nll(logits, batch["bin"], batch["event"], w)
      return nll, {}

    tx = make_optimizer(self.cfg.lr, self.cfg.weight_decay, accumulate=self.accumulate)
    return [Stage("train", loss, tx, epochs=self.cfg.epochs, patients="complete",
                  select=self.cfg.get("select") or None)]

  def predict(self, model, batch, present, key):
    logits = model(batch["modalities"][self.modality])
    return {"risk": survival.discrete_time_risk(logits)}

  def survival(self, model, batch, present, key):
    """Optional hook (`survjax.method.Method`): ``S(k)`` ``[B, K]`` at the end of each bin."""
    return survival.survival_curve(model(batch["modalities"][self.modality]))

  @property
  def attention(self):
    """Optional hook (`survjax.method.Method`), ABMIL and TransMIL (None otherwise):
    ``(model, batch) -> {modality: [B, N]}``, the attention over the bag's patches (sums
    to 1 over real patches, 0 at padding). ABMIL: the gated attention pooling weights.
    TransMIL: the class token's softmax attention over the patches in the last layer,
    averaged over heads (`survjax.nn.transmil.TransMIL.attention`: the exact row, not
    its Nystrom approximation; the square layout's repeated patches left out)."""
    if self.name not in ("abmil", "transmil"):
      return None

    def attention(model, batch):
      m = batch["modalities"][self.modality]
      x = m["x"].astype(jnp.float32)
      if self.name == "abmil":
        _, attn = model.pool(x, m["mask"])
      else:
        attn = model.encoder.attention(x, m["mask"])
      return {self.modality: attn}
    return attention


def make(config) -> Unimodal:
  name = config.method
  modality = "pathology" if name in ("abmil", "transmil") else "genomics"
  return Unimodal(name=name, modality=config.model.get("modality") or modality, cfg=config.model,
                  accumulate=config.train.accumulate)
