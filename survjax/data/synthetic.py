"""An embedded synthetic TCGA-like cohort with a known ground truth.

Generative model (deterministic for a seed). Per patient, standard normal latent factors:

* ``s``   [k]  shared: seen by pathology, genomics (and radiology when enabled),
* ``a_P`` [k]  pathology-specific, seen only by the pathology bag,
* ``a_G`` [k]  genomics-specific, seen only by the gene families,
* ``a_R`` [k]  radiology-specific (optional modality),

with each specific factor partly predictable from the shared one (``coupling`` rho):

    a_m = rho Q_m s + sqrt(1 - rho^2) e_m,   e_m ~ N(0, I),  Q_m a random rotation,

so ``a_m`` stays standard normal. In real cohorts what only one modality measures is not
independent of what both show (a tumour's mutations shape its morphology, and the
reverse); this dependence is what MUST's conditional diffusion of ``u_m`` given the shared
component exploits. With ``rho = 0`` the specific factors are independent of everything
the other modality shows, and no imputation of them can beat their mean.

The true log-hazard is linear in the factors,

    eta = w_s . s + w_P . a_P + w_G . a_G (+ w_R . a_R),

with the weights scaled so that each block carries a configurable share of var(eta).
Event times follow a Weibull proportional-hazards model,
``T = (-log U / (lambda exp(eta)))^(1/k_w)``, and censoring times are uniform on
``[0, c_max]`` with ``c_max`` found by bisection so that the censoring rate matches the
configured one (30-70% is realistic for TCGA).

Modalities:

* ``pathology`` (bag): ``N_i`` patches of dimension ``D``; a minority ``signal_frac`` of
  them carry ``M_s s + M_P a_P`` (random orthogonal-ish maps) plus noise, the rest are
  background noise drawn around a few tissue-type prototypes; features are float16.
* ``genomics`` (tokens): six gene families of different sizes and kinds (RNA-like
  continuous, CNV-like integer levels in {-2..2}, mutation-like binary), each a noisy
  nonlinear read-out of ``[s, a_G]``.
* ``radiology`` (bag, optional): ``T_i`` slice embeddings carrying ``[s, a_R]``.
* ``rna``/``dnam`` (vector, optional): long vectors carrying ``[s, a_G]``.

Oracle risk per scenario (``Cohort.true_risk``) is the conditional expectation of eta
given the factors the available modalities reveal: ``full`` uses all of them;
``missing_genomics`` replaces ``w_G . a_G`` by its conditional mean given what pathology
shows (``s`` and ``a_P``), ``rho w_G . Q_G s``; ``missing_pathology`` likewise replaces
``w_P . a_P`` by ``rho w_P . Q_P s``. The oracle C-index of a scenario is the C-index of
that oracle risk against the observed outcomes: no model can be expected to beat it
except by chance.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from survjax.data.cohort import Cohort, Modality

GENE_FAMILIES = (
    # name, size, kind: six families of different sizes as in MCAT/MUST's hallmark groups
    ("tumor_suppression", 48, "rna"),
    ("oncogenesis", 64, "rna"),
    ("protein_kinases", 40, "cnv"),
    ("cell_differentiation", 32, "cnv"),
    ("transcription", 56, "mut"),
    ("cytokines_growth", 24, "rna"),
)


@dataclasses.dataclass(frozen=True)
class SyntheticSpec:
  """Knobs of the synthetic cohort. Defaults give a TCGA-sized, CPU-friendly cohort."""

  n_patients: int = 400
  seed: int = 0
  latent_dim: int = 4
  # Share of var(eta) carried by each block (shared, pathology-specific, genomics-specific,
  # radiology-specific). The rest of the time variance is the Weibull noise.
  share_shared: float = 0.4
  share_pathology: float = 0.3
  share_genomics: float = 0.3
  share_radiology: float = 0.0
  risk_std: float = 1.5
  # rho: correlation of each specific factor with (a rotation of) the shared one.
  coupling: float = 0.7
  censoring: float = 0.5
  weibull_shape: float = 1.5
  # Pathology bags.
  patch_dim: int = 128
  bag_min: int = 64
  bag_max: int = 480
  signal_frac: float = 0.2
  patch_noise: float = 1.0
  signal_scale: float = 1.5
  # Genomics: six families; noise of each gene read-out.
  gene_noise: float = 0.7
  # Optional modalities.
  radiology: bool = False
  radiology_dim: int = 64
  slices_min: int = 8
  slices_max: int = 48
  rna_dnam: bool = False
  rna_dim: int = 512
  dnam_dim: int = 512
  # Fraction of patients missing each modality at random (training-time missingness).
  missing_pathology: float = 0.0
  missing_genomics: float = 0.0
  missing_radiology: float = 0.0


def _weights(rng, k, share, total_std):
  w = rng.normal(size=k)
  return w / np.linalg.norm(w) * np.sqrt(share) * total_std


def _censor_scale(rng_u, t_event, target):
  """c_max such that P(C < T) = target with C ~ U(0, c_max), by bisection."""
  lo, hi = 1e-6, float(np.max(t_event)) * 1e3
  u = rng_u
  for _ in range(100):
    mid = 0.5 * (lo + hi)
    rate = float(np.mean(u * mid < t_event))
    if rate > target:
      lo = mid
    else:
      hi = mid
  return 0.5 * (lo + hi)


def make_synthetic_cohort(spec: SyntheticSpec = SyntheticSpec(), name: str = "synthetic") -> Cohort:
  """Draws a cohort from the generative model in the module docstring."""
  rng = np.random.default_rng(spec.seed)
  n, k = spec.n_patients, spec.latent_dim
  s = rng.normal(size=(n, k))
  e_p = rng.normal(size=(n, k))
  e_g = rng.normal(size=(n, k))
  e_r = rng.normal(size=(n, k))
  # The rotations come from their own stream, so coupling = 0 reproduces independent
  # factors with every other draw unchanged.
  rho = float(spec.coupling)
  if not 0.0 <= rho < 1.0:
    raise ValueError(f"coupling {rho} is out of range, expected 0 <= coupling < 1")
  rot_rng = np.random.default_rng([spec.seed, 1])
  q_p, q_g, q_r = (np.linalg.qr(rot_rng.normal(size=(k, k)))[0] for _ in range(3))
  keep = np.sqrt(1.0 - rho**2)
  a_p = rho * s @ q_p + keep * e_p
  a_g = rho * s @ q_g + keep * e_g
  a_r = rho * s @ q_r + keep * e_r
  shares = np.array([spec.share_shared, spec.share_pathology, spec.share_genomics,
                     spec.share_radiology if spec.radiology else 0.0])
  shares = shares / shares.sum()
  w_s, w_p, w_g, w_r = (_weights(rng, k, sh, spec.risk_std) for sh in shares)
  if rho > 0:
    # The shared risk w_s . s is kept orthogonal to the directions of s that predict the
    # specific risks (Q_m w_m), so that the predictable part of a missing specific risk is
    # new information, not a copy of the shared risk the available modality already gives.
    coupled = np.stack([q_p @ w_p, q_g @ w_g, q_r @ w_r], axis=1)
    basis, sv, _ = np.linalg.svd(coupled, full_matrices=False)
    basis = basis[:, sv > 1e-9 * max(sv.max(), 1e-300)]
    w_perp = w_s - basis @ (basis.T @ w_s)
    w_s = w_perp / max(np.linalg.norm(w_perp), 1e-12) * np.linalg.norm(w_s)
  # Coupled factors make the blocks covary; rescale so that var(eta) = risk_std^2 still:
  # eta = (w_s + rho sum_m Q_m w_m) . s + sqrt(1 - rho^2) sum_m w_m . e_m.
  on_s = w_s + rho * (q_p @ w_p + q_g @ w_g + q_r @ w_r)
  var_eta = on_s @ on_s + (1.0 - rho**2) * (w_p @ w_p + w_g @ w_g + w_r @ w_r)
  scale = spec.risk_std / np.sqrt(var_eta)
  w_s, w_p, w_g, w_r = (w * scale for w in (w_s, w_p, w_g, w_r))
  part_s, part_p, part_g, part_r = s @ w_s, a_p @ w_p, a_g @ w_g, a_r @ w_r
  eta = part_s + part_p + part_g + part_r

  # Weibull PH event times (months-like scale) and uniform censoring at the target rate.
  u = rng.uniform(size=n)
  t_event = 30.0 * (-np.log(u) / np.exp(eta)) ** (1.0 / spec.weibull_shape)
  u_c = rng.uniform(size=n)
  c_max = _censor_scale(u_c, t_event, spec.censoring)
  t_censor = u_c * c_max
  event = t_event <= t_censor
  time = np.maximum(np.where(event, t_event, t_censor), 1e-2)

  modalities = {}
  # Pathology: a few tissue prototypes as background, a signal minority of patches.
  d = spec.patch_dim
  protos = rng.normal(size=(6, d)) * 0.8
  m_s = rng.normal(size=(k, d)) / np.sqrt(k)
  m_p = rng.normal(size=(k, d)) / np.sqrt(k)
  signal_dir = rng.normal(size=d) * 0.5
  lengths = rng.integers(spec.bag_min, spec.bag_max + 1, size=n)
  bags = []
  for i in range(n):
    n_i = int(lengths[i])
    n_sig = max(1, int(round(spec.signal_frac * n_i)))
    bg = protos[rng.integers(0, len(protos), size=n_i - n_sig)]
    bg = bg + spec.patch_noise * rng.normal(size=(n_i - n_sig, d))
    sig = spec.signal_scale * (s[i] @ m_s + a_p[i] @ m_p) + signal_dir
    sig = sig + spec.patch_noise * rng.normal(size=(n_sig, d))
    bag = np.concatenate([bg, sig])[rng.permutation(n_i)]
    bags.append(bag.astype(np.float16))
  modalities["pathology"] = Modality(kind="bag", available=np.ones(n, bool), bags=bags)

  # Genomics: six families, each a noisy nonlinear read-out of [s, a_G].
  z_g = np.concatenate([s, a_g], axis=1)
  columns, groups, blocks, start = [], [], [], 0
  for fam, size, kind in GENE_FAMILIES:
    load = rng.normal(size=(2 * k, size)) / np.sqrt(2 * k)
    raw = z_g @ load + spec.gene_noise * rng.normal(size=(n, size))
    if kind == "rna":
      block = np.tanh(raw) * 2.0
    elif kind == "cnv":
      block = np.clip(np.round(raw * 1.2), -2, 2)
    else:  # mutation-like: rare binary events more frequent with high read-out
      block = (raw > 1.0).astype(np.float64)
    blocks.append(block)
    suffix = {"rna": "rnaseq", "cnv": "cnv", "mut": "mut"}[kind]
    columns += [f"{fam.upper()}_{j}_{suffix}" for j in range(size)]
    groups.append((fam, tuple(range(start, start + size))))
    start += size
  modalities["genomics"] = Modality(
      kind="tokens", available=np.ones(n, bool),
      values=np.concatenate(blocks, axis=1).astype(np.float32),
      groups=tuple(groups), columns=tuple(columns))

  if spec.radiology:
    m_rs = rng.normal(size=(k, spec.radiology_dim)) / np.sqrt(k)
    m_rr = rng.normal(size=(k, spec.radiology_dim)) / np.sqrt(k)
    t_len = rng.integers(spec.slices_min, spec.slices_max + 1, size=n)
    slices = []
    for i in range(n):
      base = s[i] @ m_rs + a_r[i] @ m_rr
      weight = np.sin(np.linspace(0, np.pi, t_len[i]))[:, None]  # the lesion peaks mid-volume
      sl = weight * base + 0.8 * rng.normal(size=(t_len[i], spec.radiology_dim))
      slices.append(sl.astype(np.float16))
    modalities["radiology"] = Modality(kind="bag", available=np.ones(n, bool), bags=slices)

  if spec.rna_dnam:
    for mod_name, dim in (("rna", spec.rna_dim), ("dnam", spec.dnam_dim)):
      load = rng.normal(size=(2 * k, dim)) / np.sqrt(2 * k)
      vals = z_g @ load + spec.gene_noise * rng.normal(size=(n, dim))
      if mod_name == "dnam":  # beta values in (0, 1)
        vals = 1.0 / (1.0 + np.exp(-vals))
      modalities[mod_name] = Modality(kind="vector", available=np.ones(n, bool),
                                      values=vals.astype(np.float32))

  for mod_name, frac in (("pathology", spec.missing_pathology),
                         ("genomics", spec.missing_genomics),
                         ("radiology", spec.missing_radiology)):
    if frac > 0 and mod_name in modalities:
      _drop(modalities[mod_name], rng.uniform(size=n) < frac)

  # E[w_m . a_m | s, other factors] = rho w_m . Q_m s (the e_m are independent of the rest).
  true_risk = {
      "full": eta,
      "missing_genomics": eta - part_g + rho * (s @ q_g) @ w_g,
      "missing_pathology": eta - part_p + rho * (s @ q_p) @ w_p,
  }
  if spec.radiology:
    true_risk["missing_radiology"] = eta - part_r + rho * (s @ q_r) @ w_r
  case_ids = np.array([f"SYN-{spec.seed:02d}-{i:05d}" for i in range(n)])
  return Cohort(name=name, case_ids=case_ids, time=time, event=event,
                modalities=modalities, true_risk=true_risk)


def _drop(mod: Modality, missing: np.ndarray) -> None:
  mod.available = mod.available & ~missing
  if mod.kind == "bag":
    for i in np.flatnonzero(missing):
      mod.bags[i] = np.zeros((0, mod.bags[i].shape[1]), mod.bags[i].dtype)
  else:
    mod.values[missing] = 0
