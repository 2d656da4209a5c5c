"""A deliberately tiny method for testing the shared core without a real model.

It is also the proof of the method contract: this module (with ``make``) and
``tests/toy_config.py`` are all it takes to cross-validate a new method from the command
line, with no edit to survjax (``test_cv.test_a_new_method_is_one_module_and_one_config``).
"""

import dataclasses

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from survjax.method import Stage
from survjax.survival import cox_partial_nll


class ToyModel(nnx.Module):

  def __init__(self, dims, rngs):
    self.enc = nnx.Dict({k: nnx.Linear(d, 4, rngs=rngs) for k, d in dims.items()})
    self.head = nnx.Linear(4, 1, rngs=rngs)
    self.aux = nnx.Linear(4, 4, rngs=rngs)

  def embed(self, batch, present):
    h = 0.0
    for k, lin in self.enc.items():
      if k in present:
        m = batch["modalities"][k]
        x = m["x"]
        if x.ndim == 3:  # bag: masked mean
          mask = m["mask"][..., None]
          x = jnp.sum(jnp.where(mask, x.astype(jnp.float32), 0.0), 1) / jnp.maximum(mask.sum(1), 1)
        h = h + lin(x)
    return jnp.tanh(h)


@dataclasses.dataclass
class ToyMethod:
  modalities: tuple = ("pathology", "genomics")
  epochs: tuple = (3, 2)
  feature_epochs: int = 0
  name: str = "toy"
  time_model: str = "cox"
  num_bins: int = 0
  flipped_variant: bool = False   # predict also returns "flipped" = -risk (a bad fill)
  # A second feature stage "d" on the same features function after "c": "keeps_encoder"
  # (c trains only `aux`, which the features do not read), "moves_encoder" (c's prepare
  # shifts an encoder bias, which they do).
  second_feature_stage: str = ""

  def build(self, info, rngs):
    return ToyModel({k: info[k]["dim"] for k in self.modalities}, rngs)

  def stages(self):
    def loss(model, batch, key):
      h = model.embed(batch, set(self.modalities))
      h = h + 0.01 * jax.random.normal(key, h.shape)
      risk = model.head(h)[:, 0]
      weights = batch["labelled"].astype(jnp.float32)
      return cox_partial_nll(risk, batch["time"], batch["event"], weights), {
          "risk_std": jnp.std(risk)}

    def feats(model, batch):
      return {"h": model.embed(batch, set(self.modalities))}

    def aux_loss(model, batch, key):
      h = batch["h"]
      return jnp.mean((model.aux(h) - h) ** 2), {}

    st = [Stage("a", loss, optax.adamw(1e-2), epochs=self.epochs[0]),
          Stage("b", loss, optax.adam(3e-3), epochs=self.epochs[1],
                trainable=nnx.All(nnx.Param, nnx.PathContains("head")))]
    def shift_encoder(model, feats):
      del feats
      lin = model.enc[self.modalities[0]]
      lin.bias[...] = lin.bias[...] + 0.5

    if self.feature_epochs:
      st.append(Stage("c", aux_loss, optax.adam(1e-2), epochs=self.feature_epochs,
                      trainable=nnx.All(nnx.Param, nnx.PathContains("aux")),
                      features=feats, steps_per_epoch=7, batch_size=8,
                      prepare=(shift_encoder if self.second_feature_stage == "moves_encoder"
                               else None)))
    if self.second_feature_stage:
      st.append(Stage("d", aux_loss, optax.adam(1e-2), epochs=1,
                      trainable=nnx.All(nnx.Param, nnx.PathContains("aux")),
                      features=feats, steps_per_epoch=3, batch_size=8))
    return st

  def predict(self, model, batch, present, key):
    risk = model.head(model.embed(batch, present))[:, 0]
    return {"risk": risk, "flipped": -risk} if self.flipped_variant else {"risk": risk}


def make(config):
  return ToyMethod(modalities=tuple(config.model.modalities), epochs=tuple(config.model.epochs))
