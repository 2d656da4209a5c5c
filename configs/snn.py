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
| `full` | 0.756 +- 0.071 | 0.744, 0.815, 0.765, 0.826, 0.629 | 0.810 |

Training 6 s, evaluation 0 s in all folds; cohort `39bb1fbfa51f`, splits `14a80ec98584`.
<!-- end generated -->
"""

import ml_collections

from configs.common import unimodal_config


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  return unimodal_config("snn", variant, depth=2, dropout=0.25)
