r"""Self-normalizing network (Klambauer et al. 2017) on all genomic columns, pathology-only or genomics-only baseline.

Command:

  python -m survjax.main --config=configs/snn.py --workdir=runs/snn

Variants :smoke (120 patients, 3 folds, 3 epochs; seconds), :whole_folds (no inner
validation part, the last epoch). Discrete-time NLL with 4 bins, AdamW lr 2e-4, weight
decay 1e-5, batch 32 (MCAT/SurvPath defaults, which the MUST paper uses for its
baselines); at most 20 epochs, the one with the best C-index on 20% of each training fold
kept (the protocol every method follows).

Expected result (5 folds on the default synthetic cohort, MUST's folds;
docs/results/runs/snn.json, `bash scripts/reproduce_results.sh snn`; the oracle is the
expected true risk given this model's one modality, its ceiling):

<!-- generated: scenarios.snn -->
| scenario | C-index | per fold | oracle |
|---|---|---|---|
| `full` | 0.746 +- 0.035 | 0.758, 0.733, 0.736, 0.697, 0.804 | 0.791 |

Training 11 s, evaluation 1 s in all folds; cohort `cfb596a6f8fd`, splits `bfd6390620c0`.
<!-- end generated -->
"""

import ml_collections

from configs.common import unimodal_config


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  return unimodal_config("snn", variant, depth=2, dropout=0.25)
