"""Fields every experiment config shares; each configs/<method>.py starts from these.

Not an experiment itself. Fields:

  method            which models/<method>.py
  seed              run seed (init, data order, sampling)
  data.source       "synthetic" (embedded, default) | "files" | "tfds" | "sksurv_breast"
  data.synthetic    knobs of survjax.data.synthetic.SyntheticSpec
  data.files        clinical_csv, features_dir, signatures_csv, radiology_dir, ...
  data.buckets      padded bag lengths (default powers of 4: 64 ... 262144)
  cv                num_folds, seed (of the split), splits_dir (folds reused from here),
                    folds (subset to run; empty = all)
  train             batch_size, max_instances (per-bag cap during training),
                    accumulate (gradient accumulation steps), checkpoint_every_s (seconds
                    between checkpoints; a stage's end always saves; 0 = every epoch)
  eval              scenarios ("auto" = full + missing_<each modality>), batch_size,
                    max_instances (None = whole bags), latency (batch-1 timing),
                    reference_models (scikit-survival rows on the same folds from the
                    tabular modalities: "coxph", "rsf"; empty = none),
                    reference_coxph_alpha (ridge penalty of the CoxPH reference)
  mesh.num_devices  data-parallel devices (-1 = all)
"""

import dataclasses

import ml_collections

from survjax.data.synthetic import SyntheticSpec


def base_config(method: str) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.method = method
  c.seed = 0
  c.progress = True
  c.compilation_cache_dir = ""
  c.tensorboard_dir = ""

  c.data = ml_collections.ConfigDict()
  c.data.source = "synthetic"
  c.data.name = ""
  c.data.buckets = ()
  # Every knob of the generator, at its default, so that any can be set from the CLI.
  c.data.synthetic = ml_collections.ConfigDict(dataclasses.asdict(SyntheticSpec()))
  c.data.files = ml_collections.ConfigDict(dict(
      clinical_csv="", features_dir="", signatures_csv="", radiology_dir="",
      feature_dim=0, allow_missing=(), tabular=ml_collections.ConfigDict()))
  c.data.tfds = ml_collections.ConfigDict(dict(data_dir="", name=""))

  c.cv = ml_collections.ConfigDict(dict(num_folds=5, seed=0, splits_dir="splits", folds=()))
  c.train = ml_collections.ConfigDict(dict(batch_size=32, max_instances=256, accumulate=1,
                                           checkpoint_every_s=30.0))
  c.eval = ml_collections.ConfigDict(dict(scenarios=("auto",), batch_size=64,
                                          max_instances=0, latency=True))
  c.eval.reference_models = ()
  c.eval.reference_coxph_alpha = 1.0
  c.mesh = ml_collections.ConfigDict(dict(num_devices=-1))
  return c
