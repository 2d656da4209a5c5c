r"""TransMIL (Shao et al. 2021) on the pathology bag, pathology-only or genomics-only baseline.

Command:

  python -m survjax.main --config=configs/transmil.py --workdir=runs/transmil

Variant :smoke: 120 patients, 3 folds, 3 epochs (seconds). Discrete-time NLL with
4 bins, AdamW lr 2e-4, weight decay 1e-5, 20 epochs, batch 32 (MCAT/SurvPath defaults,
which the MUST paper uses for its baselines); training bags of 64 patches and 32 Nystrom
landmarks (the synthetic bags hold 64-480 patches).

Expected result (5 folds on the default synthetic cohort, a run of the command above,
374 s of training on an idle 2-core CPU): C-index 0.751 +- 0.031. The oracle of the whole
cohort is 0.798; given pathology alone it is 0.779 (the ``missing_genomics`` oracle of
configs/must.py), the ceiling for this model.
"""

import ml_collections

from configs.common import unimodal_config


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  return unimodal_config(
      "transmil", variant, num_heads=8,
      num_landmarks=32,  # as MUST's pathology encoder on the synthetic bags (64-480 patches)
      max_instances=64)
