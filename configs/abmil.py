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
| `full` | 0.766 +- 0.031 | 0.760, 0.759, 0.762, 0.725, 0.823 | 0.781 |

Training 104 s, evaluation 3 s in all folds; cohort `cfb596a6f8fd`, splits `bfd6390620c0`.
<!-- end generated -->
"""

import ml_collections

from configs.common import unimodal_config


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  return unimodal_config("abmil", variant)
