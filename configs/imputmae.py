r"""impuTMAE on a synthetic TCGA-like cohort with RNA-seq, DNA methylation and WSI features.

  python -m survjax.main --config=configs/imputmae.py --workdir=runs/imputmae

400 patients: RNA and methylation 2048 values each (both read [s, a_G]), WSI as bags of
128-d patch features; 20% lack methylation, 30% slides, 10% a survival label. Stages per
fold: normalise (input statistics), pretrain (MAE, 50% masked), finetune. Differences
from the paper, each a field: 128-d, 2 encoder layers, pretraining 20 epochs at lr 1e-3,
fine-tuning lr 1e-3, 16 patches per bag in training,
64 at evaluation, the fine-tuning epoch chosen on the inner validation split (the
paper's early stopping, never on the test fold), and pretrain.hide_modality = 0.3 (an available modality fully hidden,
its loss kept; with 0, the paper, the decoder never learns cross-modal imputation).
Expected: about 6-8 min on 2 idle CPU cores (11 min on a loaded one). C-index over 5
folds; rows `<scenario>` = the decoder imputes what is missing, `<scenario>/masked` = left
masked; `full` is the paper's protocol (every test patient has RNA, eval.require; slides
and methylation missing as in the data); oracle = the conditional expectation of the true
risk given the scenario (docs/results/runs/imputmae.json). results.json `held_out`:
reconstruction MSE per modality on each fold's test patients, against the training-fold
mean and the noise floor (docs/results/imputmae.md):

<!-- generated: scenarios.imputmae -->
| scenario | C-index | per fold | oracle |
|---|---|---|---|
| `full/masked` | 0.760 +- 0.033 | 0.795, 0.729, 0.723, 0.801, 0.752 | 0.831 (room +0.011) |
| `full` | 0.769 +- 0.030 | 0.792, 0.785, 0.730, 0.802, 0.736 | 0.831 (room +0.011) |
| `full/auto` | 0.758 +- 0.032 | 0.792, 0.729, 0.730, 0.802, 0.736 (chose risk, masked, risk, risk, risk) | 0.831 (room +0.011) |
| `missing_rna/masked` | 0.717 +- 0.046 | 0.775, 0.642, 0.706, 0.757, 0.705 | 0.800 (room +0.010) |
| `missing_rna` | 0.750 +- 0.029 | 0.763, 0.716, 0.741, 0.799, 0.729 | 0.800 (room +0.010) |
| `missing_rna/auto` | 0.735 +- 0.052 | 0.763, 0.642, 0.741, 0.799, 0.729 (chose risk, masked, risk, risk, risk) | 0.800 (room +0.010) |
| `missing_dnam/masked` | 0.734 +- 0.024 | 0.750, 0.697, 0.714, 0.762, 0.744 | 0.831 (room +0.011) |
| `missing_dnam` | 0.773 +- 0.033 | 0.801, 0.792, 0.725, 0.803, 0.742 | 0.831 (room +0.011) |
| `missing_dnam/auto` | 0.754 +- 0.042 | 0.801, 0.697, 0.725, 0.803, 0.742 (chose risk, masked, risk, risk, risk) | 0.831 (room +0.011) |
| `missing_pathology/masked` | 0.747 +- 0.021 | 0.775, 0.757, 0.716, 0.756, 0.731 | 0.804 (room +0.036) |
| `missing_pathology` | 0.775 +- 0.022 | 0.784, 0.805, 0.739, 0.781, 0.766 | 0.804 (room +0.036) |
| `missing_pathology/auto` | 0.770 +- 0.023 | 0.784, 0.805, 0.739, 0.756, 0.766 (chose risk, risk, risk, masked, risk) | 0.804 (room +0.036) |
| `missing_50pct_mixed/masked` | 0.732 +- 0.038 | 0.792, 0.688, 0.734, 0.750, 0.695 | 0.811 (room +0.024) |
| `missing_50pct_mixed` | 0.766 +- 0.024 | 0.794, 0.783, 0.733, 0.775, 0.743 | 0.811 (room +0.024) |
| `missing_50pct_mixed/auto` | 0.747 +- 0.037 | 0.794, 0.688, 0.733, 0.775, 0.743 (chose risk, masked, risk, risk, risk) | 0.811 (room +0.024) |

Training 965 s, evaluation 259 s in all folds; cohort `ba5bd8d3b885`, splits `a145d35673fa`.
<!-- end generated -->
Variants: :smoke (2 folds of 120 patients, 64-d, 3 + 2 epochs; 51 s, a pipeline check,
C-index about 0.5), :large (Table 1 large: 756-d, 12 heads, 6/12 layers, decoder 8),
:paper_dims (256-d, 6/4 layers), :paper_schedule
(800 pretraining epochs, warm-up 50, lr 1e-4, batch 256), :last_epoch (no epoch
selection), :masked (missing modalities left masked), :unimodal_pretrain (the decoder
decodes each modality from its own tokens, no modality hidden whole: paper Table 4's
unimodal row; 5 folds about 12 min on a loaded CPU, docs/results/imputmae.md), :tiles
(raw RGB WSI tiles instead of patch features: 4 tiles of 64 x 64 per patient, a 4-layer
ViT on 16 x 16 patches, transposed-convolution decoder head; data.files.tiles_dir reads
CLAM imgs HDF5 files or image folders; tiles exempt from whole-modality hiding, 200
pretraining epochs; two folds: docs/results/imputmae.md, run `imputmae_tiles`).
"""

import ml_collections

from configs.common import base_config


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  c = base_config("imputmae")
  syn = c.data.synthetic
  syn.rna_dnam = True
  syn.rna_dim, syn.dnam_dim = 2048, 2048
  # Natural missingness (TCGA GBM-like, paper Table 2): methylation and slides absent for
  # a share of patients; a tenth of the patients have no survival label (pretraining only).
  syn.missing_dnam, syn.missing_pathology = 0.2, 0.3
  syn.unlabelled = 0.1

  m = c.model = ml_collections.ConfigDict()
  m.modalities = ("rna", "dnam", "pathology")
  # Table 1, small variant: 256-d, 4 heads, MLP 1024; decoder 256-d, 3 layers, MLP 512
  # (:paper_dims); 128-d here so that 5 folds train in minutes on a 2-core CPU.
  m.dim, m.num_heads, m.mlp_ratio = 128, 4, 4.0
  m.depth = ml_collections.ConfigDict(dict(default=2))        # paper: 6 (RNA, DNAm), 4 (WSI)
  m.patch_size = ml_collections.ConfigDict(dict(default=512))  # 1-D patches of the vectors
  m.decoder = ml_collections.ConfigDict(dict(dim=128, depth=3, num_heads=4, mlp_ratio=2.0,
                                             cross_modal=True))
  m.mask_ratio = 0.5
  m.impute_bag_len = 32          # patch slots the decoder fills for a missing WSI bag
  m.dropout = 0.1
  m.num_bins = 20
  m.grad_clip = 1.0
  # Transformer layers keep only their projections' outputs for the backward pass and
  # recompute the rest: the same numbers, a faster step at this size (an exploratory A/B,
  # docs/results/imputmae.md, Speed).
  m.remat = True
  # Paper: 800 epochs (warm-up 50), batch 256, AdamW lr 1e-4, wd 1e-2.
  m.pretrain = ml_collections.ConfigDict(dict(epochs=20, lr=1e-3, weight_decay=1e-2,
                                              warmup_epochs=2, max_instances=16,
                                              hide_modality=0.3, never_hide=()))
  # Paper: 20 epochs (warm-up 5), batch 24, lr 1e-4, wd 1e-2, dropout 0.1.
  m.finetune = ml_collections.ConfigDict(dict(epochs=20, lr=1e-3, weight_decay=1e-2,
                                              warmup_epochs=5, max_instances=16, impute=True,
                                              select="c_index"))
  # Reconstruction MSE on each fold's held-out patients (ImpuTMAE.held_out): batch and
  # evenly spaced patches per bag.
  m.held_out = ml_collections.ConfigDict(dict(batch_size=32, max_instances=64))
  c.train.batch_size = 32
  c.eval.scenarios = ("auto", "missing_50pct_mixed")
  c.eval.max_instances = 64
  # The paper's protocol: every test patient with RNA, the others as they are (here every
  # patient has RNA, so `full` is that protocol: methylation and slides naturally missing).
  c.eval.require = ("rna",)

  for v in filter(None, variant.split(",")):
    if v == "smoke":
      syn.n_patients = 120
      syn.rna_dim, syn.dnam_dim = 1024, 1024
      c.cv.num_folds = 2
      m.dim, m.decoder.dim = 64, 64
      m.pretrain.epochs, m.finetune.epochs = 3, 2
      m.pretrain.warmup_epochs, m.finetune.warmup_epochs = 1, 1
      c.eval.latency = False
      c.eval.scenarios = ("auto",)
    elif v == "large":   # Table 1, large variant
      m.dim, m.num_heads, m.mlp_ratio = 756, 12, 3072 / 756
      m.depth = ml_collections.ConfigDict(dict(default=6, pathology=12))
      m.decoder = ml_collections.ConfigDict(dict(dim=756, depth=8, num_heads=12,
                                                 mlp_ratio=2048 / 756, cross_modal=True))
    elif v == "paper_dims":   # Table 1, small variant: 256-d, 6/4 layers
      m.dim, m.decoder.dim = 256, 256
      m.depth = ml_collections.ConfigDict(dict(default=6, pathology=4))
    elif v == "paper_schedule":
      m.pretrain.update(epochs=800, warmup_epochs=50, lr=1e-4)
      m.finetune.lr = 1e-4
      c.train.batch_size = 256
    elif v == "last_epoch":   # keep the last fine-tuning epoch (no selection)
      m.finetune.select = ""
    elif v == "tiles":   # raw WSI tiles instead of patch features: a ViT on 16x16 patches
      syn.wsi_tiles = True
      syn.tile_size, syn.tiles_per_patient = 64, 4   # 64x64 RGB on CPU (paper: 256x256)
      m.modalities = ("rna", "dnam", "tiles")
      m.tile = ml_collections.ConfigDict(dict(patch=16))
      m.depth.tiles = 4                                # Table 1 small WSI encoder
      # A tile hidden whole cannot be rebuilt from RNA or methylation (its pixels' phase
      # is in no other modality): with it hidden 30% of the time, as the vectors are, the
      # masked-tile loss stayed at the mean fill's (docs/results/imputmae.md). Without
      # that noise the tiles still pass a few hundred steps near it before they learn.
      m.pretrain.never_hide = ("tiles",)
      m.pretrain.epochs = 200   # of 100 / 200, on the development draw (seed 1)
      # Real tiles (data.source=files): <tiles_dir>/<slide_id>.h5 with CLAM's imgs
      # dataset, or <tiles_dir>/<slide_id>/ image files (survjax.data.tiles).
      c.data.files.tiles_dir = ""
      c.data.files.tiles_count, c.data.files.tile_size = 4, 64
    elif v == "unimodal_pretrain":   # paper Table 4's unimodal row: no cross-modal decoding
      m.decoder.cross_modal = False
      m.pretrain.hide_modality = 0.0
    elif v == "masked":   # fine-tune and predict with missing modalities left masked
      m.finetune.impute = False
    else:
      raise ValueError(f"unknown variant {v!r}")
  return c
