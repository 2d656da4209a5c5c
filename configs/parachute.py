r"""PARACHUTE (survjax/models/parachute.py) on synthetic radiology slices + pathology patches.

Command:

  python -m survjax.main --config=configs/parachute.py --workdir=runs/parachute

Expected result (5 folds, 400 patients, about 4-6 min on 2 CPU cores;
docs/results/runs/parachute.json, `bash scripts/reproduce_results.sh parachute`):

<!-- generated: scenarios.parachute -->
(no committed result for `parachute`: run `bash scripts/reproduce_results.sh parachute`)
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
