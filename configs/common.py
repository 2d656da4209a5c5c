"""Fields every experiment config shares; each configs/<method>.py starts from these.

Not an experiment itself. Fields:

  method            which models/<method>.py
  seed              run seed (init, data order, sampling)
  compilation_cache_dir  persistent XLA compilation cache, so that a second run of a config
                    skips compiling (default $SURVJAX_COMPILATION_CACHE_DIR, else
                    ~/.cache/survjax/xla; "" or "none" = off)
  data.source       "synthetic" (embedded, default) | "files" | "tfds" | "sksurv_breast"
  data.synthetic    knobs of survjax.data.synthetic.SyntheticSpec
  data.files        clinical_csv, features_dir, signatures_csv, radiology_dir, ...;
                    impute: partly empty gene/tabular rows, "error" (default) |
                    "train_mean" | "train_median" (fitted on each training fold)
  data.buckets      padded bag lengths (default powers of 4: 64 ... 262144)
  cv                num_folds, seed (of the split), splits_dir (folds reused from here),
                    folds (subset to run; empty = all), val_fraction (share of each
                    training fold kept as the inner validation split on which stages
                    with `select` choose their epoch; 0 = none)
  train             batch_size, max_instances (per-bag cap during training),
                    accumulate (gradient accumulation steps), checkpoint_every_s (seconds
                    between checkpoints; a stage's end always saves; 0 = every epoch)
  eval              scenarios ("auto" = full + missing_<each modality>), batch_size,
                    max_instances (None = whole bags), latency (batch-1 timing),
                    reference_models (scikit-survival rows on the same folds from the
                    tabular modalities: "coxph", "rsf"; empty = none),
                    reference_coxph_alpha (ridge penalty of the CoxPH reference)
  mesh.num_devices  data-parallel devices (-1 = all)

`unimodal_config` adds the model fields and the ``smoke`` variant the one-modality
baselines (abmil, snn, transmil) share.
"""

import dataclasses
import os

import ml_collections

from survjax.data.synthetic import SyntheticSpec


def base_config(method: str) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.method = method
  c.seed = 0
  c.progress = True
  c.compilation_cache_dir = os.environ.get("SURVJAX_COMPILATION_CACHE_DIR",
                                           "~/.cache/survjax/xla")
  c.tensorboard_dir = ""

  c.data = ml_collections.ConfigDict()
  c.data.source = "synthetic"
  c.data.name = ""
  c.data.buckets = ()
  # Every knob of the generator, at its default, so that any can be set from the CLI.
  c.data.synthetic = ml_collections.ConfigDict(dataclasses.asdict(SyntheticSpec()))
  c.data.files = ml_collections.ConfigDict(dict(
      clinical_csv="", features_dir="", signatures_csv="", radiology_dir="",
      feature_dim=0, allow_missing=(), tabular=ml_collections.ConfigDict(),
      impute="error"))
  c.data.tfds = ml_collections.ConfigDict(dict(data_dir="", name=""))

  c.cv = ml_collections.ConfigDict(dict(num_folds=5, seed=0, splits_dir="splits", folds=(),
                                        val_fraction=0.2))
  c.train = ml_collections.ConfigDict(dict(batch_size=32, max_instances=256, accumulate=1,
                                           checkpoint_every_s=30.0))
  c.eval = ml_collections.ConfigDict(dict(scenarios=("auto",), batch_size=64,
                                          max_instances=0, latency=True))
  c.eval.reference_models = ()
  c.eval.reference_coxph_alpha = 1.0
  c.mesh = ml_collections.ConfigDict(dict(num_devices=-1))
  # --mode=tune: (("dotted.key", (values...)), ...) scored on the inner validation splits.
  # tune.scenarios: score under these scenarios (the missing path's parameters).
  c.tune = ml_collections.ConfigDict(dict(grid=(), scenarios=("full",)))
  return c


def unimodal_config(method: str, variant: str = "", *, dim: int = 256,
                    max_instances: int | None = None,
                    **model_fields) -> ml_collections.ConfigDict:
  """`base_config` plus the model fields and variants of a one-modality baseline.

  ``model`` holds ``dim``, then ``model_fields`` in the order given, then the MCAT/SurvPath
  training defaults the MUST paper uses for its baselines: a discrete-time NLL with
  ``num_bins = 4``, AdamW ``lr = 2e-4``, ``weight_decay = 1e-5``, at most ``epochs = 20``,
  the epoch chosen on the inner validation split.

  Variants (comma-separated): ``smoke`` = 120 patients, 3 folds, 3 epochs, training bags
  of at most 128 patches; ``whole_folds`` = trained on whole training folds for the last
  epoch (by default the epoch is chosen by C-index on an inner validation part, 20% of
  each training fold); ``parachute_cohort`` = PARACHUTE's cohort (radiology slices with
  their own risk share), ``radiology`` = the same, reading the radiology slices.

  Args:
    method: which models/<method>.py.
    variant: the config variant ("" for the full run).
    dim: model width.
    max_instances: per-bag cap during training (``train.max_instances``); None keeps
      `base_config`'s.
    **model_fields: the method's own model fields.

  Returns:
    The config.

  Raises:
    ValueError: an unknown variant.
  """
  c = base_config(method)
  m = c.model = ml_collections.ConfigDict()
  m.dim = dim
  for name, value in model_fields.items():
    m[name] = value
  m.num_bins = 4
  m.lr = 2e-4
  m.weight_decay = 1e-5
  m.epochs = 20
  m.select = "c_index"   # the epoch with the best C-index on the inner validation split
  m.modality = ""  # the modality it reads ("": pathology for MIL models, else genomics)
  if max_instances is not None:
    c.train.max_instances = max_instances
  for v in filter(None, variant.split(",")):
    if v == "whole_folds":   # every training patient, the last epoch (no validation part)
      c.cv.val_fraction = 0.0
      m.select = ""
    elif v in ("parachute_cohort", "radiology"):  # PARACHUTE's cohort (its folds too)
      from configs.parachute import radiology_cohort
      radiology_cohort(c)
      if v == "radiology":
        m.modality = "radiology"
    elif v == "smoke":
      c.data.synthetic.n_patients = 120
      c.cv.num_folds = 3
      m.epochs = 3
      c.train.max_instances = min(c.train.max_instances, 128)
    else:
      raise ValueError(f"unknown variant {v!r}")
  return c
