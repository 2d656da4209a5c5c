"""Writes a small cohort in the documented on-disk formats (tests of the files path).

Layout (see docs/data_formats.md)::

  root/clinical.csv     MCAT layout: unnamed index, case_id, slide_id, oncotree_code, age,
                        is_female, survival_months, censorship, <gene>_rnaseq/_cnv/_mut
  root/signatures.csv   MCAT's six gene families, ragged
  root/features/        <slide>.npy and .h5 (CLAM, with coords), some in h5_files/

Every fifth case has two slides (joined into one bag), every third slide id carries a
``.svs`` extension. Risk is driven by a few genes and by a pathology signal so that the
models learn something; about a third of the patients are censored.
"""

from __future__ import annotations

import csv
from pathlib import Path

import h5py
import numpy as np

FAMILIES = ("Tumor Suppressor Genes", "Oncogenes", "Protein Kinases",
            "Cell Differentiation Markers", "Transcription Factors",
            "Cytokines_and_Growth_Factors")


def write_file_cohort(root, *, n_patients: int = 40, dim: int = 16, bag=(20, 60),
                      genes_per_family: int = 3, seed: int = 0, event_rate: float = 0.65):
  """Writes the cohort under ``root``; returns a dict of paths and what was written.

  Returns:
    ``{"csv", "signatures", "features", "case_ids", "slides": {case: [slide ids]},
    "files": {slide id: path}}``.
  """
  root = Path(root)
  rng = np.random.default_rng(seed)
  feats = root / "features"
  (feats / "h5_files").mkdir(parents=True, exist_ok=True)
  genes = [f"G{f}{j}" for f in range(len(FAMILIES)) for j in range(genes_per_family)]
  gene_cols = [f"{g}_{s}" for g in genes for s in ("rnaseq", "cnv", "mut")]
  signal_dir = rng.normal(size=dim)
  rows, slides, files = [], {}, {}
  case_ids = [f"TCGA-{i:02d}-{1000 + 7 * i}" for i in range(n_patients)]
  for i, cid in enumerate(case_ids):
    rna = rng.normal(size=len(genes))
    cnv = rng.integers(-2, 3, size=len(genes))
    mut = (rng.uniform(size=len(genes)) < 0.2).astype(int)
    z = rng.normal()
    risk = 0.8 * rna[0] - 0.6 * rna[4] + 0.5 * cnv[7] + z
    time = max(0.1, rng.exponential(30.0 * np.exp(-0.7 * risk)))
    event = int(rng.uniform() < event_rate)
    n_slides = 2 if i % 5 == 0 else 1
    case_slides = []
    for s in range(n_slides):
      sid = f"{cid}-{s + 1:02d}Z-00-DX{s + 1}"
      n = int(rng.integers(bag[0], bag[1] + 1))
      x = rng.normal(size=(n, dim))
      k = max(1, n // 5)
      x[:k] += z * signal_dir
      x = x.astype(np.float32)
      if (i + s) % 2 == 0:
        path = (feats / "h5_files" if i % 4 == 0 else feats) / f"{sid}.h5"
        with h5py.File(path, "w") as f:
          f["features"] = x
          f["coords"] = rng.integers(0, 50_000, size=(n, 2))
      else:
        path = feats / f"{sid}.npy"
        np.save(path, x)
      files[sid] = path
      case_slides.append(sid)
      listed = sid + ".svs" if (i + s) % 3 == 0 else sid
      rows.append([str(len(rows)), cid, listed, "BRCA" if i % 3 else "LUAD",
                   str(40 + i % 37), str(i % 2), f"{time:.2f}", str(1 - event)]
                  + [f"{v:.4f}" for v in rna] + [str(v) for v in cnv] + [str(v) for v in mut])
    slides[cid] = case_slides
  # Columns grouped as <gene>_rnaseq..., then _cnv..., then _mut (MCAT's order).
  header = ["", "case_id", "slide_id", "oncotree_code", "age", "is_female", "survival_months",
            "censorship"] + [f"{g}_rnaseq" for g in genes] + [f"{g}_cnv" for g in genes] + \
      [f"{g}_mut" for g in genes]
  assert sorted(header[8:]) == sorted(gene_cols)
  with open(root / "clinical.csv", "w", newline="") as f:
    w = csv.writer(f, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
  with open(root / "signatures.csv", "w", newline="") as f:
    w = csv.writer(f, lineterminator="\n")
    w.writerow(FAMILIES)
    for j in range(genes_per_family + 1):  # ragged: last family one gene longer
      w.writerow([f"G{fam}{j}" if j < genes_per_family else
                  (f"G0{0}" if fam == len(FAMILIES) - 1 else "")
                  for fam in range(len(FAMILIES))])
  return {"csv": root / "clinical.csv", "signatures": root / "signatures.csv",
          "features": feats, "case_ids": case_ids, "slides": slides, "files": files,
          "dim": dim}


def files_args(c, **extra) -> list[str]:
  """``--config.data.*`` flags that point a config at the cohort ``c``."""
  args = ["--config.data.source=files", f"--config.data.files.clinical_csv={c['csv']}",
          f"--config.data.files.features_dir={c['features']}",
          f"--config.data.files.signatures_csv={c['signatures']}"]
  return args + [f"--config.{k}={v}" for k, v in extra.items()]
