r"""TransMIL (Shao et al. 2021) on the pathology bag, pathology-only or genomics-only baseline.

Command:

  python -m survjax.main --config=configs/transmil.py --workdir=runs/transmil

Variants :smoke (120 patients, 3 folds, 3 epochs; seconds), :whole_folds (no inner
validation part, the last epoch). Discrete-time NLL with 4 bins, AdamW lr 2e-4, weight
decay 1e-5, batch 32 (MCAT/SurvPath defaults, which the MUST paper uses for its
baselines); at most 20 epochs, the one with the best C-index on 20% of each training fold
kept (the protocol every method follows); training bags of 64 patches and 32 Nystrom
landmarks (the synthetic bags hold 64-480 patches).

Expected result (5 folds on the default synthetic cohort, MUST's folds;
docs/results/runs/transmil.json, `bash scripts/reproduce_results.sh transmil`; the oracle is the
expected true risk given this model's one modality, its ceiling):

<!-- generated: scenarios.transmil -->
| scenario | C-index | per fold | oracle |
|---|---|---|---|
| `full` | 0.769 +- 0.043 | 0.787, 0.799, 0.760, 0.810, 0.690 | 0.802 |

Training 736 s, evaluation 31 s in all folds; cohort `39bb1fbfa51f`, splits `14a80ec98584`.
<!-- end generated -->
"""

import ml_collections

from configs.common import unimodal_config


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  return unimodal_config(
      "transmil", variant, num_heads=8,
      num_landmarks=32,  # as MUST's pathology encoder on the synthetic bags (64-480 patches)
      max_instances=64)
