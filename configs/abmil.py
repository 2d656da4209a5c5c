r"""Gated attention MIL (Ilse et al. 2018) on the pathology bag, pathology-only or genomics-only baseline.

Command:

  python -m survjax.main --config=configs/abmil.py --workdir=runs/abmil

Variant :smoke: 120 patients, 3 folds, 3 epochs (seconds). Discrete-time NLL with
4 bins, AdamW lr 2e-4, weight decay 1e-5, 20 epochs, batch 32 (MCAT/SurvPath defaults,
which the MUST paper uses for its baselines).

Expected result (5 folds on the default synthetic cohort, a run of the command above,
58 s of training on an idle 2-core CPU): C-index 0.766 +- 0.031. The oracle of the whole
cohort is 0.798; given pathology alone it is 0.779 (the ``missing_genomics`` oracle of
configs/must.py), the ceiling for this model.
"""

import ml_collections

from configs.common import unimodal_config


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  return unimodal_config("abmil", variant)
