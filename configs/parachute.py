r"""PARACHUTE (survjax/models/parachute.py) on synthetic radiology slices + pathology patches.

Command:

  python -m survjax.main --config=configs/parachute.py --workdir=runs/parachute

Expected result (5 folds, 400 patients, about 4-6 min on 2 CPU cores;
docs/results/runs/parachute.json, `bash scripts/reproduce_results.sh parachute`):

<!-- generated: scenarios.parachute -->
| scenario | C-index | per fold | oracle |
|---|---|---|---|
| `full` | 0.775 +- 0.037 | 0.796, 0.799, 0.774, 0.801, 0.704 | 0.797 |
| `missing_radiology` | 0.737 +- 0.050 | 0.720, 0.796, 0.725, 0.785, 0.659 | 0.771 |
| `missing_pathology` | 0.748 +- 0.023 | 0.769, 0.735, 0.767, 0.762, 0.709 | 0.788 |
| `missing_5pct_radiology` | 0.774 +- 0.034 | 0.792, 0.797, 0.769, 0.802, 0.711 | 0.796 |
| `missing_15pct_radiology` | 0.769 +- 0.043 | 0.782, 0.792, 0.771, 0.811, 0.688 | 0.790 |
| `missing_30pct_radiology` | 0.765 +- 0.032 | 0.794, 0.773, 0.745, 0.799, 0.713 | 0.794 |
| `missing_5pct_pathology` | 0.774 +- 0.036 | 0.798, 0.791, 0.778, 0.800, 0.703 | 0.798 |
| `missing_15pct_pathology` | 0.767 +- 0.034 | 0.781, 0.795, 0.764, 0.791, 0.702 | 0.793 |
| `missing_30pct_pathology` | 0.769 +- 0.033 | 0.787, 0.783, 0.782, 0.789, 0.703 | 0.801 |
| `missing_5pct_mixed` | 0.771 +- 0.036 | 0.779, 0.800, 0.773, 0.802, 0.703 | 0.795 |
| `missing_15pct_mixed` | 0.771 +- 0.035 | 0.792, 0.786, 0.775, 0.799, 0.703 | 0.794 |
| `missing_30pct_mixed` | 0.760 +- 0.043 | 0.773, 0.800, 0.772, 0.780, 0.677 | 0.793 |

Training 40 s, evaluation 8 s in all folds; cohort `9b5bb2873dd5`, splits `54b45a405f59`.
<!-- end generated -->
Variants (comma-separated): :smoke (120 patients, 2 folds, 3 epochs; about a minute);
:no_dce (no LocXEmb/DCE bias); :no_gcs (plain Cox gradient); :no_dce_no_gcs (both);
:paper_dims (1024-d radiology slices, 128-d tokens, 256-d hazard net).
Defaults not in the paper (epochs, lr, dims, GCS constants) were set once for this CPU,
untuned (no search on any fold); the epoch is chosen on the inner validation split.
Ablations and unimodal baselines on the same folds: docs/results/parachute.md.
Pathology bags are mean-pooled; a slide-embedding vector is read as is.
"""

import ml_collections

from configs.common import base_config

SCENARIOS = ("full", "missing_radiology", "missing_pathology") + tuple(
    f"missing_{p}pct_{m}" for m in ("radiology", "pathology", "mixed") for p in (5, 15, 30))


def radiology_cohort(c: ml_collections.ConfigDict) -> None:
  """The embedded cohort with radiology slices carrying their own risk share (PARACHUTE's
  cohort; the unimodal baselines' :parachute_cohort variants use it too)."""
  s = c.data.synthetic
  s.radiology, s.radiology_dim = True, 64
  s.share_shared, s.share_pathology, s.share_radiology, s.share_genomics = 0.4, 0.3, 0.3, 0.0
  s.coupling, s.risk_std = 0.7, 1.5


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  c = base_config("parachute")
  radiology_cohort(c)
  s = c.data.synthetic
  m = c.model = ml_collections.ConfigDict()
  m.dim = 64                 # f_dim = 64 (paper)
  m.num_heads = 4            # paper
  m.adapter_depth = 2        # residual blocks of the pathology adapter
  m.hazard_hidden = 64
  m.dce_hidden = 32
  m.topk = 16                # k+ = k- = 16 (code)
  m.dropout = 0.1
  m.attn_dropout = 0.1
  m.dce = True
  m.reference_cross_batch_attention = False   # True: attend across the batch (public code)
  m.missing_modality_prob = 0.3
  m.lr = 1e-3
  m.weight_decay = 1e-4
  m.grad_clip = 1.0
  m.warmup_frac = 0.05
  m.epochs = 30
  m.select = "c_index"       # the epoch with the best inner-validation C-index
  m.gcs = ml_collections.ConfigDict(dict(enabled=True, num_probes=4, a_curv=1.0, a_grad=1.0,
                                         a_missing=1.0, bias=0.0, gamma=1.0))
  c.train.batch_size = 32
  c.train.max_instances = 64
  c.data.buckets = (64, 512, 4096, 16384, 65536, 262144)
  c.eval.batch_size = 80
  c.eval.scenarios = SCENARIOS

  for v in filter(None, variant.split(",")):
    if v == "smoke":
      s.n_patients = 120
      c.cv.num_folds = 2
      m.epochs = 3
      c.eval.scenarios = ("full", "missing_radiology", "missing_pathology",
                          "missing_30pct_mixed")
    elif v == "no_dce":
      m.dce = False
    elif v == "no_gcs":
      m.gcs.enabled = False
    elif v == "no_dce_no_gcs":
      m.dce, m.gcs.enabled = False, False
    elif v == "paper_dims":
      s.radiology_dim = 1024
      m.dim, m.hazard_hidden = 128, 256
    else:
      raise ValueError(f"unknown variant {v!r}")
  return c
