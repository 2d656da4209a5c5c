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
* ``tiles`` (patches, optional, ``wsi_tiles``): raw RGB tiles from the pathology slide
  (same availability), reading ``[s, a_P]`` through colour gratings (`_tiles`).
* ``rna``/``dnam`` (vector, optional): long vectors carrying ``[s, a_G]`` (methylation
  shares the genomics-specific factor rather than having its own block, so RNA and
  methylation can each be imputed from the other up to the noise), RNA as
  ``z W + noise``, methylation as beta values ``sigmoid(z W' + noise)`` in (0, 1).

Natural missingness: ``missing_<modality>`` drops each modality for that share of the
patients at random (for ``rna``/``dnam`` from their own random stream, so every other
draw is unchanged).

Reconstruction oracle (`reconstruction_floor`, also ``Cohort.reconstruction_floor``): per patient, the mean over a modality's
entries of the variance the generator adds around what the latent factors determine,
i.e. the smallest mean squared error any imputation of that modality can reach even if
it knew the patient's factors exactly: ``gene_noise^2`` for RNA, ``E Var(sigmoid(mu +
gene_noise eps))`` for methylation (Gauss-Hermite, per entry), ``tile_noise^2 + 1/12``
for a tile pixel, for a pathology patch
``patch_noise^2`` plus the spread of the tissue-prototype / signal mixture (which patch
is which is random), ``0.8^2`` for a radiology slice.

Oracle risk (``Cohort.true_risk``, keyed by the revealed modalities joined with ``+``,
e.g. ``"genomics+pathology"``) is the conditional expectation of eta given the factors
those modalities reveal (pathology and tiles ``a_P``, genomics/rna/dnam ``a_G``, radiology ``a_R``,
each also ``s``): a revealed block enters as it is, a withheld specific block as its
conditional mean given ``s``, ``rho w_m . Q_m s``. Keys ``"const:<revealed>"`` put the
withheld specific blocks at their mean (0) instead: the best a model can do with a
constant fill, so the difference of the two oracle C-indices is the room any imputation
has. The oracle C-index of a scenario is the C-index of that oracle risk against the
observed outcomes: no model can be expected to beat it except by chance.
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
  # radiology-specific). The rest of the time variance is the Weibull noise. Raising a
  # modality's specific share widens the gap between the full oracle and the oracle
  # without that modality; ``risk_std`` scales every oracle C-index up.
  share_shared: float = 0.2
  share_pathology: float = 0.4
  share_genomics: float = 0.4
  share_radiology: float = 0.0
  risk_std: float = 2.0
  # rho: correlation of each specific factor with (a rotation of) the shared one. Higher
  # coupling gives imputation more room (the conditional-mean oracle above the
  # constant-fill one) and narrows the gap between the full and unimodal oracles.
  coupling: float = 0.6
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
  # Raw WSI tiles (``tiles``, kind patches, opt-in): per patient ``tiles_per_patient``
  # RGB uint8 tiles of ``tile_size`` pixels, from the same slide as the pathology bag
  # (missing with it), reading [s, a_P].
  wsi_tiles: bool = False
  tile_size: int = 64
  tiles_per_patient: int = 4
  tile_noise: float = 8.0
  # Fraction of patients missing each modality at random (training-time missingness).
  missing_pathology: float = 0.0
  missing_genomics: float = 0.0
  missing_radiology: float = 0.0
  missing_rna: float = 0.0
  missing_dnam: float = 0.0
  # Fraction of patients without a survival label (time NaN): only self-supervised
  # stages see them.
  unlabelled: float = 0.0


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


def _censor(t_event, u_c, target):
  """Uniform censoring ``C = u_c * c_max`` at rate ``target``: ``(time, event)``.

  numpy's SIMD ``exp`` and ``log`` differ in the last bit between instruction sets and
  releases, and a cohort should be one cohort on every machine (its fingerprint names its
  split files). So times are rounded to 1e-6 months (a few seconds), and the event test
  has a relative margin far above that bit: ``c_max`` is a bisection onto one patient's
  event time, and that patient is an event whatever the last bit.
  """
  t_censor = u_c * _censor_scale(u_c, t_event, target)
  event = t_event <= t_censor * (1.0 + 1e-9)
  return np.round(np.maximum(np.where(event, t_event, t_censor), 1e-2), 6), event


def make_synthetic_cohort(spec: SyntheticSpec = SyntheticSpec(), name: str = "synthetic") -> Cohort:
  """Draws a cohort from the generative model in the module docstring."""
  return _generate(spec, name)[0]


def reconstruction_floor(spec: SyntheticSpec = SyntheticSpec()) -> dict[str, np.ndarray]:
  """Per modality (pathology, radiology, rna, dnam where present), float ``[n]``: each
  patient's smallest achievable mean squared error of imputing that modality's entries,
  the generator's own noise around what the latent factors determine (module docstring).
  Patients are those of ``make_synthetic_cohort(spec)``; the value is given also where
  the modality is missing."""
  return _generate(spec, "synthetic")[1]


def _sigmoid_variance(mu: np.ndarray, sigma: float, nodes: int = 40) -> np.ndarray:
  """``Var[sigmoid(mu + sigma eps)]``, eps ~ N(0, 1), elementwise (Gauss-Hermite)."""
  x, w = np.polynomial.hermite_e.hermegauss(nodes)
  w = w / w.sum()
  first = np.zeros_like(mu)
  second = np.zeros_like(mu)
  for xi, wi in zip(x, w):
    v = 1.0 / (1.0 + np.exp(-(mu + sigma * xi)))
    first += wi * v
    second += wi * v * v
  return np.maximum(second - first**2, 0.0)


def _generate(spec: SyntheticSpec, name: str) -> tuple[Cohort, dict[str, np.ndarray]]:
  floor = {}
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
  time, event = _censor(t_event, rng.uniform(size=n), spec.censoring)

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
    # Mixture of six prototypes (uniform) and the patient's signal mean: its spread per
    # entry, plus the patch noise, is what no imputation of a random patch can remove.
    pi_sig = n_sig / n_i
    comp = np.concatenate([protos, (spec.signal_scale * (s[i] @ m_s + a_p[i] @ m_p)
                                    + signal_dir)[None]])
    prob = np.concatenate([np.full(len(protos), (1.0 - pi_sig) / len(protos)), [pi_sig]])
    centre = prob @ comp
    floor.setdefault("pathology", np.zeros(n))[i] = (
        spec.patch_noise**2 + prob @ np.sum((comp - centre) ** 2, axis=1) / d)
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
    floor["radiology"] = np.full(n, 0.8**2)

  if spec.rna_dnam:
    for mod_name, dim in (("rna", spec.rna_dim), ("dnam", spec.dnam_dim)):
      load = rng.normal(size=(2 * k, dim)) / np.sqrt(2 * k)
      vals = z_g @ load + spec.gene_noise * rng.normal(size=(n, dim))
      if mod_name == "dnam":  # beta values in (0, 1)
        floor[mod_name] = _sigmoid_variance(z_g @ load, spec.gene_noise).mean(axis=1)
        vals = 1.0 / (1.0 + np.exp(-vals))
      else:
        floor[mod_name] = np.full(n, spec.gene_noise**2)
      modalities[mod_name] = Modality(kind="vector", available=np.ones(n, bool),
                                      values=vals.astype(np.float32))

  for mod_name, frac in (("pathology", spec.missing_pathology),
                         ("genomics", spec.missing_genomics),
                         ("radiology", spec.missing_radiology)):
    if frac > 0 and mod_name in modalities:
      _drop(modalities[mod_name], rng.uniform(size=n) < frac)
  if spec.rna_dnam and (spec.missing_rna > 0 or spec.missing_dnam > 0):
    miss_rng = np.random.default_rng([spec.seed, 3])  # own stream: other draws unchanged
    for mod_name, frac in (("rna", spec.missing_rna), ("dnam", spec.missing_dnam)):
      lose = miss_rng.uniform(size=n) < frac   # drawn for both, whatever the fractions
      if frac > 0:
        _drop(modalities[mod_name], lose)

  if spec.wsi_tiles:   # own stream, after every other draw: the rest is unchanged
    tiles, floor["tiles"] = _tiles(np.concatenate([s, a_p], axis=1), spec)
    avail = modalities["pathology"].available.copy()   # the same slide
    tiles[~avail] = 0
    modalities["tiles"] = Modality(kind="patches", available=avail, values=tiles)

  # E[w_m . a_m | s, other factors] = rho w_m . Q_m s (the e_m are independent of the rest).
  reveals = {"pathology": "p", "genomics": "g", "radiology": "r", "rna": "g", "dnam": "g",
             "tiles": "p"}
  parts = {"p": part_p, "g": part_g, "r": part_r}
  predicted = {"p": rho * (s @ q_p) @ w_p, "g": rho * (s @ q_g) @ w_g,
               "r": rho * (s @ q_r) @ w_r}
  true_risk = {}
  names = sorted(modalities)
  for mask in range(2 ** len(names)):
    revealed = [m for b, m in enumerate(names) if mask >> b & 1]
    seen = {reveals[m] for m in revealed}
    if not revealed:  # nothing observed: every patient's expected risk is the mean, 0
      cond = const = np.zeros(n)
    else:
      known = part_s + sum(parts[f] for f in seen)
      cond = known + sum(predicted[f] for f in parts if f not in seen)
      const = known
    key = "+".join(revealed)
    true_risk[key] = cond
    true_risk["const:" + key] = const   # missing specific factors at their mean
  if spec.unlabelled > 0:  # own stream: every other draw stays as it was
    drop = np.random.default_rng([spec.seed, 2]).uniform(size=n) < spec.unlabelled
    time = np.where(drop, np.nan, time)
    event = event & ~drop
  case_ids = np.array([f"SYN-{spec.seed:02d}-{i:05d}" for i in range(n)])
  return Cohort(name=name, case_ids=case_ids, time=time, event=event,
                modalities=modalities, true_risk=true_risk,
                reconstruction_floor=floor), floor


def _tiles(z: np.ndarray, spec: SyntheticSpec) -> tuple[np.ndarray, np.ndarray]:
  """RGB tiles ``uint8 [n, M, T, T, 3]`` whose content is a function of the factors ``z``
  ``[n, F]`` up to a random translation per tile, and each patient's noise floor.

  Each factor has a periodic colour grating ``B_j(y, x) = sin(2 pi (f_j . (y, x)) / T +
  phi_j) c_j`` (integer frequencies ``f_j`` in 1..3, so a circular shift is the same
  grating at another phase); a tile is

      I = 128 + 80 tanh(sum_j z_j roll(B_j, d) / sqrt(F)) + tile_noise eps,

  with one shift ``d`` per tile, rounded and clipped to [0, 255]. The floor, the smallest
  MSE of any reconstruction of a tile's pixels (0-255 units) even knowing ``z`` and
  ``d``, is ``tile_noise^2 + 1/12`` (rounding); clipping, which would lower it, needs a
  noise draw beyond 5 standard deviations at the default noise.
  """
  rng = np.random.default_rng([spec.seed, 4])
  n, f = z.shape
  t, m = int(spec.tile_size), int(spec.tiles_per_patient)
  yy, xx = np.mgrid[0:t, 0:t].astype(np.float64) / t
  freq = rng.integers(1, 4, size=(f, 2)) * rng.choice([-1, 1], size=(f, 2))
  phase = rng.uniform(0, 2 * np.pi, size=f)
  colour = rng.normal(size=(f, 3)) / np.sqrt(3)
  basis = np.stack([np.sin(2 * np.pi * (freq[j, 0] * yy + freq[j, 1] * xx) + phase[j])[..., None]
                    * colour[j] for j in range(f)])   # [F, T, T, 3]
  out = np.empty((n, m, t, t, 3), np.uint8)
  shifts = rng.integers(0, t, size=(n, m, 2))
  for i in range(n):
    field = np.tensordot(z[i], basis, axes=1) / np.sqrt(f)   # [T, T, 3]
    for j in range(m):
      img = 128 + 80 * np.tanh(np.roll(field, tuple(shifts[i, j]), axis=(0, 1)))
      img = img + spec.tile_noise * rng.normal(size=img.shape)
      out[i, j] = np.clip(np.round(img), 0, 255).astype(np.uint8)
  return out, np.full(n, spec.tile_noise**2 + 1.0 / 12.0)


def _drop(mod: Modality, missing: np.ndarray) -> None:
  mod.available = mod.available & ~missing
  if mod.kind == "bag":
    for i in np.flatnonzero(missing):
      mod.bags[i] = np.zeros((0, mod.bags[i].shape[1]), mod.bags[i].dtype)
  else:
    mod.values[missing] = 0
