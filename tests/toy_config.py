"""The toy method on a small synthetic cohort: the config half of a new method.

  PYTHONPATH=tests python -m survjax.main --config=tests/toy_config.py --workdir=runs/toy
"""

import ml_collections

from configs.common import base_config


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  del variant
  c = base_config("toy_method")
  c.model = ml_collections.ConfigDict(dict(modalities=("pathology", "genomics"), epochs=(4, 2)))
  c.data.synthetic.n_patients = 90
  c.data.synthetic.bag_min, c.data.synthetic.bag_max, c.data.synthetic.patch_dim = 20, 60, 8
  c.cv.num_folds = 3
  c.train.batch_size = 16
  c.train.max_instances = 32
  c.eval.batch_size = 32
  c.eval.scenarios = ("auto", "missing_30pct_genomics")
  c.progress = False
  return c
