r"""MUST on the embedded synthetic TCGA-like cohort (the main job).

Command (5-fold cross-validation, scenarios full / missing_pathology / missing_genomics):

  python -m survjax.main --config=configs/must.py --workdir=runs/must

Variants: ``configs/must.py:smoke`` (the whole pipeline at small size: 2 folds of 120
patients, a 64-d model; 61-69 s on a 2-core AMD EPYC, about 45 s of it compilation),
``:paper_schedule`` (the paper's 30 + 30 epochs and learning rates, a 10x longer LDM),
``:paper_ldm`` (the LDM as the paper writes it: the 256-d u^, trained on c^),
``:no_warmup``, ``:cond_c`` (condition on [c] only), ``:rank16``, ``:rank128``,
``:train_missing`` (15% of patients miss each modality and train unpaired, supp. 8.2),
``:decomp_sg`` (eq. 13 with g as a target, no gradient into g; see below).

Architecture and losses follow the paper (Sec. 3, supp. 6-7): D = 256, r = 64, K = 4
bins, 8 heads, lambda_dec = 1, lambda_sh = 1, lambda_orth = 0.5, warm-up lr 1e-3 with
sigma = 0.1, weight decay 1e-5, LDM batch 32, 4-layer 256-d transformer denoiser, DDIM
50 steps, eta = 0, 5 samples averaged. Differences, each a config field:

* a real batch of 32 patients with padded, masked bags instead of batch 1 with 32-step
  accumulation (``train.accumulate`` is still there);
* main stage: the paper's 30 epochs at lr 1e-3 instead of 2e-4. With 320 training
  patients an epoch is 10 steps; after 15 epochs at 2e-4 the decomposition loss was
  still falling (602 -> 32; 24 at 1e-3) and the survival loss (1.16) was above the
  warm-up's (0.48). On fold 1 the full C-index went from 0.717 (the previous defaults,
  15 + 15 epochs at 2e-4) to 0.763 (10 + 30 epochs at 1e-3; 0.755 with 40 main epochs,
  0.728 with 80: it overfits), oracle 0.761 (each a run of the command above with
  ``--config.cv.folds='(1,)'`` and the epochs and lr named; losses from its
  ``fold_1/metrics.jsonl``);
* warm-up: 10 epochs instead of 30 (its loss, two survival NLLs, falls from 2.79 to
  1.14 in 15 epochs on these patients: it memorises);
* training bags subsampled to 32 patches (``train.max_instances``; evaluation reads
  whole bags), TransMIL with 16 Nystrom landmarks (the synthetic bags hold 64-480
  patches, not 10k-200k);
* the LDM trains 600 steps at lr 1e-3 per modality instead of 1M steps at 1e-4;
  the noise schedule (linear, T = 1000, DDPM's betas) is not given by the paper;
  DDIM clips each predicted clean latent to +-3 (``ldm.clip_x0``, the ``clip_denoised``
  of the DDPM/DDIM code);
* the LDM diffuses the 8 whitened principal coordinates of u^ (``ldm.latent_dim``;
  0 = the paper's 256-d u^, standardised per dimension), and is trained on the
  surrogate condition c~ = g - u^ of the training patients (supp. 8.2;
  ``ldm.condition_source = "c_hat"`` for the paper's c^), the condition it gets at
  inference; the head's c slot takes the projected P c~ (``project_recovered_shared``),
  the denoiser the unprojected g - u^ (``ldm.project_condition = False``, eq. 20 as
  written), which carries more of the available modality: held-out R^2 of a ridge fit of
  u^_G on it 0.40 / 0.35 (folds 1 / 0), on P c~ 0.28 / 0.11; of u^_P 0.09 / -0.11
  against 0.04 / 0.05. A trained u^ varies along a few directions (79-96% of its variance in 4 of
  256), and on the 256-d latent the individual samples came out with 2.2-2.3x the
  data's spread, pinned at the clip; on 8 coordinates, 0.95-1.2x. Per held-out patient,
  c~ and c^ correlate (centred) at only 0.08 (from genomics) and 0.11 (from pathology),
  so a denoiser trained on c^ samples from conditions it never saw. Fold 1 of the main
  job, C-index of the LDM fill (zeros: 0.743 missing pathology, 0.747 missing genomics),
  ``--config.cv.folds='(1,)'`` plus the fields named, figures from
  ``scripts/must_ldm_probe.py`` (the default row: fold 1 of the 5-fold run below):

    LDM                                 missing P   missing G   sample spread   sq. error / mean's
    8 coordinates, g - u^ (default)     0.747       0.744       0.97 / 1.17     1.22 / 0.94
    8 coordinates, P c~                 0.668       0.743       0.98 / 1.20     1.27 / 1.42
      (``ldm.project_condition=True``)
    8 coordinates, c^                   0.557       0.747       0.95 / 0.99     1.84 / 1.20
    256-d, P c~ (latent_dim=0)          0.598       0.749       2.16 / 2.29     2.16 / 2.28
    256-d, c^ (``:paper_ldm``)          0.583       0.748       2.24 / 2.28     2.18 / 2.25

  (spread and error: generated u^_P / u^_G; the rows below the default were measured
  when the head's and the denoiser's c~ were both P c~).

Expected result (5 folds, a run of the command above on the default cohort, whose
specific factors are coupled to the shared one with rho = 0.7; C-index mean +- std over
folds, oracle = the conditional expectation of the true risk given what the scenario
reveals, averaged over the folds):

  scenario             LDM (the method)   zeros           training mean   oracle
  full                 0.768 +- 0.029                                      0.796
  missing_pathology    0.758 +- 0.026     0.775 +- 0.034  0.774 +- 0.033   0.786
  missing_genomics     0.728 +- 0.028     0.714 +- 0.035  0.716 +- 0.037   0.779

Per fold, LDM / zeros: missing genomics 0.692 / 0.650, 0.744 / 0.747, 0.747 / 0.705,
0.698 / 0.733, 0.761 / 0.736; missing pathology 0.764 / 0.789, 0.747 / 0.743,
0.804 / 0.810, 0.723 / 0.727, 0.753 / 0.806. With 50 samples instead of 5 (the same
trained folds, ``--mode=eval --config.model.ldm.num_samples=50``, 3 min 56 s):
missing pathology 0.768 +- 0.030, missing genomics 0.728 +- 0.032.

Decomposition diagnostics (held-out patients, Sec. 4.4): cos(c_P<-G, c_G<-P) 0.99,
cos(u_P, u_G) -0.01, cos(g_P, u_P + c_G<-P) 0.97, cos(g_G, u_G + c_P<-G) 0.997, cos(g_P,
g_G) 0.06: the paper's picture (shared parts aligned, specific parts orthogonal), but it
is the picture of a common offset. Every component is nearly the same vector for all
patients: the share of its mean square that varies between patients (``spread`` in
``results.json``) is 0.0010-0.0044 for all six; after the warm-up it is 0.47-0.73, at
initialisation 0.22-0.76 (fold 1, the command above with ``--config.cv.folds='(1,)'
--config.model.stage2.epochs=0``, and ``stage1.epochs=0`` as well). Centred on the
held-out mean (``cos_centred``), the cosines are c_P<-G vs c_G<-P 0.20, g_P vs u_P +
c_G<-P 0.09, g_G vs u_G + c_P<-G 0.38, u_P vs u_G 0.02, g_P vs g_G 0.01: the
patient-level parts are neither aligned nor decomposed. Eq. 13 and 14 as written are
squared errors with the gradient reaching g and c, and collapsing everything onto
constants satisfies them (the main stage's loss falls from 370-434 to 10-11 over the
five folds, its decomposition term to 8-10). The collapse happens before the final
LayerNorms, whose scales stay at 0.88-0.91 (bias rms 0.01), and the paper's stage-2
learning rate collapses the same way (fold 1 with ``--config.model.stage2.lr=2e-4``:
spread of g_G 3e-5). The risk lives in the small patient-level parts, which the
constraints hardly touch. The full C-index is 0.028 below the oracle; on the same folds
it is above gated ABMIL on pathology alone (0.766 +- 0.031, within noise), TransMIL
(0.751) and the SNN on genomics (0.746).

With genomics missing the diffusion fill beats zeros and the training mean (0.728
against 0.714 and 0.716; on 3 of 5 folds). With pathology missing it does not (0.758
against 0.775; 1 of 5 folds). Why, measured on the trained folds of that run with the
main network frozen (``RUN=runs/must FOLD=k RETRAIN=0 python
scripts/must_ldm_probe.py``, folds 1 / 0):

* genomics tells little about u^_P. A ridge regression of u^_P on g_G - u^_G (training
  patients, 32 principal components, lambda 100) has a held-out R^2 of 0.09 / -0.11;
  of u^_G on g_P - u^_P, 0.40 / 0.35. Most of u^_P's spread is the length of the bag:
  its first principal direction holds 71% / 93% of the held-out variance and correlates
  with the log bag length at |r| = 0.995 / 0.996 (a likely cause: in TransMIL's and
  the class query's attention the class token's share of the softmax shrinks with the
  number of patches; training bags are cut to 32 patches, held-out bags hold 64-480),
  and no genomic condition can predict it. An average of S samples from the true conditional
  distribution has the expected squared error (1 - R^2)(1 + 1/S) relative to the
  training mean's, below 1 only for R^2 > 1/(S + 1) = 1/6: no 5-sample fill of u^_P can
  be closer than the mean. The LDM's errors: 1.22 / 1.88 for u^_P, 0.94 / 0.74 for u^_G;
* the cohort leaves a pathology fill little to win: the oracle loses 0.010 without
  pathology (0.786 against 0.796) and 0.017 without genomics, and zeros already reach
  0.775. The true u^_P itself, used as the fill, scores 0.759 / 0.729 against zeros'
  0.743 / 0.789: with pathology missing the head reads c~ from genomics, not the c^ of
  both modalities it was trained on (their centred correlation is 0.04-0.19), and c^
  alone carries most of the risk (0.749 / 0.771 against the full 0.763 / 0.748);
* more samples move the pathology fill towards the mean (0.768 with 50, above).

``:decomp_sg`` stops the gradient into g in eq. 13, so the decomposition has to
reproduce what the warm-up taught g instead of collapsing it (the paper does not say
either way). Its decomposition term then stays at 102-130 (the survival term ends at
1.0-1.1, as the default's at 1.0-1.3). Nothing collapses (spread 0.34-0.72), the
decomposition holds at the patient level (centred cos(g_P, u_P + c_G<-P) 0.73, cos(g_G,
u_G + c_P<-G) 0.95; raw 0.78 / 0.98, the paper's 0.75-0.94), the shared parts still do
not align (centred 0.23, raw 0.47 against the paper's 0.99), and the diffusion fill
matters: it beats zeros on 5 of 5 folds with pathology missing and 4 of 5 with genomics
missing. But every C-index is lower (same command plus ``:decomp_sg``, 7 min 27 s):

  scenario             LDM                zeros           training mean
  full                 0.728 +- 0.039
  missing_pathology    0.694 +- 0.052     0.678 +- 0.050  0.679 +- 0.049
  missing_genomics     0.684 +- 0.048     0.653 +- 0.064  0.672 +- 0.054

(per fold, LDM / zeros: missing pathology 0.701 / 0.692, 0.729 / 0.692, 0.647 / 0.637,
0.626 / 0.614, 0.767 / 0.756; missing genomics 0.703 / 0.645, 0.767 / 0.769,
0.631 / 0.594, 0.673 / 0.665, 0.645 / 0.594). On folds 2 and 3 (``--config.cv.folds=
'(2,3)'``), neither lambda_dec = 0.1 nor the paper's stage-2 lr 2e-4 helped it: full
0.740 / 0.645 and 0.760 / 0.649 against 0.677 / 0.687 (the default: 0.805 / 0.729).

Wall time of the main job on a 2-core AMD EPYC, from a fresh clone (the README's
command: ``bash scripts/bootstrap.sh`` and the command at the top): 7 min 22 s and 8 min
1 s in two runs, 365 / 403 s training + 36 / 38 s evaluation (earlier runs of the same
training computation took 6 min 29 s to 7 min 39 s here: this machine's speed varies
between runs by about 15%). Checkpoints are written every 30 s and at each stage's end
(``train.checkpoint_every_s``). On the 2-core Intel Xeon of earlier sessions the same
code ran about 1.9x slower (the smoke variant: 3 min there). Traces: one per training
step function, one shared LDM feature pass.
"""

import ml_collections

from configs.common import base_config


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  c = base_config("must")
  m = c.model = ml_collections.ConfigDict()
  m.modalities = ("pathology", "genomics")   # the P and G slots: 'bag' or 'tokens' kinds
  m.dim = 256
  m.num_heads = 8
  m.num_landmarks = 16
  m.rank = 64
  m.num_bins = 4
  m.head_hidden = 256
  m.dropout = 0.1
  m.warmup_sigma = 0.1
  m.lambda_dec = 1.0
  m.lambda_sh = 1.0
  m.lambda_orth = 0.5
  m.grad_clip = 1.0
  m.decomp_stop_gradient = False   # True: eq. 13 takes g as a fixed target (:decomp_sg)
  m.train_patients = "complete"   # paper protocol; "any" = training-time missingness
  m.project_recovered_shared = True  # missing modality: c~ = P (g - u^) (False: eq. 20 as is)
  m.stage1 = ml_collections.ConfigDict(dict(epochs=10, lr=1e-3, weight_decay=1e-5))
  m.stage2 = ml_collections.ConfigDict(dict(epochs=30, lr=1e-3, weight_decay=1e-5))
  m.ldm = ml_collections.ConfigDict(dict(
      num_layers=4, num_heads=8, schedule="linear", timesteps=1000, beta_start=1e-4,
      beta_end=0.02, lr=1e-3, weight_decay=0.0, batch_size=32, steps=600,
      steps_per_epoch=300, ddim_steps=50, eta=0.0, num_samples=5,
      cond_noise=0.0,             # > 0: condition noise augmentation (x per-dim std of c)
      clip_x0=3.0,                # > 0: clip predicted clean latents (standardised) to +-clip_x0
      condition="c_cls",          # "c_cls": [c; CLS_u] (paper) | "c": [c] only (ablation)
      condition_source="c_tilde",  # "c_tilde" (surrogate, supp. 8.2) | "c_hat" (paper)
      latent_dim=8,               # whitened principal coordinates of u^ (0: all 256, paper)
      project_condition=False,    # condition on g - u^ (eq. 20 as written); True: P (g - u^)
  ))
  # Synthetic bags hold 64-480 patches: one 512 bucket for whole-bag evaluation (fewer
  # compilations, half the padding of 1024); training bags are capped at max_instances.
  c.data.buckets = (512, 4096, 16384, 65536, 262144)
  c.train.batch_size = 32
  c.train.max_instances = 32
  c.eval.batch_size = 80   # a 400-patient cohort's 80-patient folds in one unpadded batch

  for v in filter(None, variant.split(",")):
    if v == "smoke":  # the whole pipeline, small: 2 folds of 120 patients, 64-d model
      c.data.synthetic.n_patients = 120
      c.cv.num_folds = 2
      m.dim, m.num_heads, m.rank, m.head_hidden = 64, 4, 16, 64
      m.ldm.num_layers, m.ldm.num_heads = 2, 4
      m.stage1.epochs = 3
      m.stage2.epochs = 4
      m.ldm.steps = 200
      m.ldm.steps_per_epoch = 100
      m.ldm.ddim_steps = 10
    elif v == "paper_schedule":  # the paper's epochs and a 10x longer LDM (about 4x the time)
      m.stage1.epochs = 30
      m.stage2.epochs = 30
      m.stage2.lr = 2e-4
      m.ldm.steps = 10000
      m.ldm.steps_per_epoch = 1000
    elif v == "no_warmup":
      m.stage1.epochs = 0
    elif v == "cond_c":
      m.ldm.condition = "c"
    elif v == "paper_ldm":  # the LDM as the paper writes it: 256-d u^, trained on c^
      m.ldm.latent_dim = 0
      m.ldm.condition_source = "c_hat"
    elif v.startswith("rank"):
      m.rank = int(v[4:])
    elif v == "decomp_sg":  # no gradient into g through eq. 13: no collapse, lower C
      m.decomp_stop_gradient = True
    elif v == "train_missing":
      c.data.synthetic.missing_pathology = 0.15
      c.data.synthetic.missing_genomics = 0.15
      m.train_patients = "any"
      m.ldm.condition_source = "c_tilde"
    else:
      raise ValueError(f"unknown variant {v!r}")
  return c
