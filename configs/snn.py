r"""Self-normalizing network (Klambauer et al. 2017) on all genomic columns, pathology-only or genomics-only baseline.

Command:

  python -m survjax.main --config=configs/snn.py --workdir=runs/snn

Variant :smoke: 120 patients, 3 folds, 3 epochs (seconds). Discrete-time NLL with
4 bins, AdamW lr 2e-4, weight decay 1e-5, 20 epochs, batch 32 (MCAT/SurvPath defaults,
which the MUST paper uses for its baselines).

Expected result (5 folds on the default synthetic cohort, a run of the command above,
6 s of training on an idle 2-core CPU): C-index 0.746 +- 0.035. The oracle of the whole
cohort is 0.798; given genomics alone it is 0.787 (the ``missing_pathology`` oracle of
configs/must.py), the ceiling for this model.
"""

import ml_collections

from configs.common import unimodal_config


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  return unimodal_config("snn", variant, depth=2, dropout=0.25)
