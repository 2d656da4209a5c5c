r"""Gated attention MIL (Ilse et al. 2018) on the pathology bag, pathology-only or genomics-only baseline.

Command:

  python -m survjax.main --config=configs/abmil.py --workdir=runs/abmil

Variants :smoke (120 patients, 3 folds, 3 epochs; seconds), :whole_folds (no inner
validation part, the last epoch). Discrete-time NLL with 4 bins, AdamW lr 2e-4, weight
decay 1e-5, batch 32 (MCAT/SurvPath defaults, which the MUST paper uses for its
baselines); at most 20 epochs, the one with the best C-index on 20% of each training fold
kept (the protocol every method follows).

Expected result (5 folds on the default synthetic cohort, MUST's folds;
docs/results/runs/abmil.json, `bash scripts/reproduce_results.sh abmil`; the oracle is the
expected true risk given this model's one modality, its ceiling):

<!-- generated: scenarios.abmil -->
| scenario | C-index | per fold | oracle |
|---|---|---|---|
| `full` | 0.764 +- 0.046 | 0.740, 0.815, 0.735, 0.824, 0.708 | 0.802 |

Training 95 s, evaluation 4 s in all folds; cohort `39bb1fbfa51f`, splits `14a80ec98584`.
<!-- end generated -->
"""

import ml_collections

from configs.common import unimodal_config


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  return unimodal_config("abmil", variant)
