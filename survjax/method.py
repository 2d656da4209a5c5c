"""The contract between a method (models/) and the shared core (train/, evaluate/).

A method is a small object that builds an NNX model, declares its training stages and
predicts risks under a set of present modalities. The core knows nothing else about it:
the trainer runs the stages, the evaluation harness runs the scenarios.

Every function a method hands to the core is pure in the JAX sense: it receives a merged
model, a batch pytree (see `survjax.data.batching`) and an explicit PRNG key, and returns
arrays. The core jits it over ``(graphdef, state)``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Protocol

import jax
import optax
from flax import nnx

Batch = dict
LossFn = Callable[[nnx.Module, Batch, jax.Array], tuple[jax.Array, dict]]


@dataclasses.dataclass(frozen=True)
class Stage:
  """One training stage.

  Attributes:
    name: shown in logs and checkpoints ("warmup", "main", "ldm_genomics", ...).
    loss_fn: ``(model, batch, key) -> (scalar loss, dict of scalar metrics)``.
    optimizer: optax transformation (see `survjax.train.optim.make_optimizer`), or a
      function ``total_steps -> transformation`` for schedules that need the stage's
      number of optimiser steps (epochs x batches per epoch, known once the fold's
      training patients are).
    epochs: passes over the training patients (batch stages), or, for a feature stage,
      the number of chunks of ``steps_per_epoch`` optimiser steps.
    trainable: NNX filter of the parameters this stage updates; everything else is
      frozen (no gradient is computed for it).
    patients: "complete" trains on patients with every modality of ``requires``
      (the MUST paper protocol), "any" on every training patient.
    labels: True (default) trains on the fold's labelled training patients only; False
      (self-supervised stages, e.g. masked-autoencoder pretraining) adds the cohort's
      unlabelled patients (no time/event; never in a test fold). Their batch rows have
      ``labelled = False``.
    max_instances: per-bag instance cap of this stage's batches: None = the run's
      ``train.max_instances``, 0 = whole bags (e.g. pretraining on whole bags, then
      fine-tuning on subsampled ones).
    select: choose the stage's epoch on the fold's inner validation patients (never the
      test fold): ``"c_index"`` (Harrell's C of ``predict`` with every modality, higher
      is better) or ``"loss"`` (``loss_fn`` with a fixed key, lower is better); None =
      keep the last epoch. The model leaves the stage with the chosen epoch's parameters.
    select_present: with ``select = "c_index"``, the modality subsets shown in turn to
      ``predict``, the score being the mean of their C-indexes (None = every modality);
      e.g. a stage that trains the missing-modality path too is chosen on it as well.
    patience: with ``select``, stop the stage after this many epochs without a better
      validation score (0 = run every epoch).
    requires: modalities that "complete" refers to (default: all of the method's).
    features: feature stage: ``(model, batch) -> pytree of per-patient arrays [B, ...]``
      computed once with the model frozen; the stage then trains on random minibatches
      of the cached features (``loss_fn`` receives them as its batch, with a ``valid``
      entry). Used for MUST's latent diffusion, whose targets come from a frozen encoder.
    prepare: feature stages only: ``(model, cached_features) -> None``, called once after
      the features are cached and before training (e.g. to store latent normalisation
      statistics in non-trainable model variables, which then travel in checkpoints).
    steps_per_epoch: feature stages only.
    batch_size: feature stages only (minibatch of cached rows); batch stages use the
      run's batch size.
    missing_path_only: the stage trains only what predictions with a modality missing
      use (MUST's denoisers); ``--mode=tune``, which scores with every modality, skips it.
  """

  name: str
  loss_fn: LossFn
  optimizer: optax.GradientTransformation | Callable[[int], optax.GradientTransformation]
  epochs: int
  trainable: Any = nnx.Param
  patients: str = "any"
  labels: bool = True
  max_instances: int | None = None
  select: str | None = None
  select_present: tuple[tuple[str, ...], ...] | None = None
  patience: int = 0
  requires: tuple[str, ...] | None = None
  features: Callable[[nnx.Module, Batch], dict] | None = None
  prepare: Callable[[nnx.Module, dict], None] | None = None
  missing_path_only: bool = False
  steps_per_epoch: int = 100
  batch_size: int = 32


class Method(Protocol):
  """What the core needs from a method.

  A method lives in one module of `survjax.models` exposing ``make(config) -> Method``
  (see `survjax.models.get_method`); it reads its own ``config.model`` section and
  whatever run settings it needs (``train.accumulate``).

  Optional hooks, looked up with ``getattr`` (a method without them reports neither):

  * ``representations(model, batch) -> {name: [B, D]}``: per-patient vectors on
    complete data, with ``representation_pairs``: a tuple of ``(name, name)``. The
    evaluation reports each vector's between-patient spread and each pair's cosine, raw
    and centred, over the held-out patients (`survjax.evaluate.representations`).
  * ``survival(model, batch, present, key) -> [B, K]``: discrete-time methods, the
    predicted ``S(k)`` at the end of each time bin; `survjax.predict` reports survival
    curves at the bin edges with it.
  * ``attention(model, batch) -> {modality: [B, N]}``: MIL methods, the attention weights
    over each bag's instances (sum 1 over real instances, 0 at padding);
    ``--mode=predict --predict.attention=true`` writes them per slide
    (`survjax.predict`, rendered by `survjax.heatmap`). May be None.
  * ``held_out(model, cohort, test_idx, train_idx, key) -> {name: float}``: any
    statistic of a fold's trained model on that fold's held-out patients (e.g. how well
    it reconstructs a modality). The cross-validation harness calls it once per fold,
    after training, with the fold's test patients ``test_idx`` (indices into
    ``cohort``, the fold's cohort after its per-fold transforms) and its training
    patients ``train_idx`` (for statistics a comparison needs from them, e.g. a
    training-mean fill; the model was trained on them). Host-side: the method batches
    and jits what it needs itself. A value may be None (not defined on this fold);
    values land in ``fold_<k>/result.json`` under ``"held_out"`` and, over the folds,
    in ``results["held_out"][name] = {"mean", "std", "per_fold"}`` and report.md.
    Names with a ``/`` read as ``<row>/<column>`` in the generated tables
    (`survjax.docs`).
  """

  name: str
  modalities: tuple[str, ...]   # cohort modalities the method reads
  time_model: str               # "discrete" (needs bins) or "cox" (raw times, no bins)
  num_bins: int                 # discrete only

  def build(self, cohort_info: dict, rngs: nnx.Rngs) -> nnx.Module:
    """The model for a cohort described by ``cohort_info`` (see `cohort_info`)."""

  def stages(self) -> list[Stage]:
    """Training stages in order."""

  def predict(self, model: nnx.Module, batch: Batch, present: frozenset[str],
              key: jax.Array) -> dict[str, jax.Array]:
    """Risks ``[B]`` (higher = worse) when only ``present`` modalities exist.

    ``present`` is the same for every row of a batch. Returns a dict with at least
    ``"risk"``; any other entry is an alternative risk for the same scenario (e.g.
    ``"zeros"``: missing part filled with zeros), reported as its own row
    ``<scenario>/<entry>``. The function must not read the data of a modality outside
    ``present`` (tests fill it with NaN).
    """


def cohort_info(cohort, modalities) -> dict:
  """Static description of a cohort's modalities that a method builds its model from."""
  info = {}
  for name in modalities:
    mod = cohort.modalities[name]
    info[name] = {"kind": mod.kind, "dim": mod.dim, "group_sizes": mod.group_sizes}
    if mod.kind == "patches":   # [M, H, W, C] of a patient's images
      info[name]["shape"] = tuple(int(d) for d in mod.values.shape[1:])
  return info
