"""A small real cohort: scikit-survival's breast cancer data (198 patients), as tokens.

`sksurv.datasets.load_breast_cancer` (Desmedt et al. 2007, GSE7390) holds 76 gene
expression columns and the clinical variables ``age``, ``er``, ``grade``, ``size`` (and
``tumor`` in some releases); time ``t.tdm`` (days to distant metastasis) and event
``e.tdm``. Two modalities, both complete:

* ``genes`` (tokens): the 76 genes in the file's column order, split into
  ``n_gene_tokens`` contiguous groups (default 4 tokens of 19 genes). The grouping is
  positional, not biological: the data ship no gene families.
* ``clinical`` (tokens): one token per clinical variable; numeric variables are one
  column, categorical ones are one-hot over their categories (``er=negative``,
  ``er=positive``, ``grade=well differentiated``, ..., ``grade=unkown`` as spelled in
  the data).

Scaling: with ``standardize=True`` (default) every numeric column (genes, age, size) is
flagged in ``cohort.standardize`` and z-scored per cross-validation fold with the mean
and standard deviation of that fold's training patients (`survjax.data.formats.
standardize_fold`, applied by the CV loop, tuning and predict mode), so no statistic of a
held-out patient reaches the training features; one-hot columns stay 0/1. The values in
the returned cohort are the data's raw ones either way; ``standardize=False`` flags
nothing. The one-hot categories are the data's categorical levels (a schema, not fitted).

Time stays in days, as in the data (survjax only needs one consistent unit).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from survjax.data.cohort import Cohort, Modality
from survjax.errors import InputError

CLINICAL_VARIABLES = ("age", "er", "grade", "size", "tumor")
SOURCE = "sksurv.datasets.load_breast_cancer"


def load_breast_cancer_cohort(*, n_gene_tokens: int = 4, standardize: bool = True) -> Cohort:
  """The sksurv breast cancer data as a `Cohort` (module docstring).

  Args:
    n_gene_tokens: number of contiguous gene groups (76 genes; 4 gives 19 each).
    standardize: flag the numeric columns for z-scoring on each training fold.

  Returns:
    A validated `Cohort` named ``sksurv_breast_cancer`` with modalities ``genes`` and
    ``clinical``; case ids ``breast-000`` ... in the data's row order.
  """
  from sksurv.datasets import load_breast_cancer
  x, y = load_breast_cancer()
  if x.isna().any().any():
    col = x.columns[x.isna().any()][0]
    raise InputError(f"column {col!r} has missing values, expected complete data",
                     path=SOURCE)
  clinical = [c for c in x.columns if c in CLINICAL_VARIABLES]
  genes = [c for c in x.columns if c not in CLINICAL_VARIABLES]
  n = len(x)
  gene_mod = _gene_tokens(x[genes], n_gene_tokens)
  clin_mod, numeric = _clinical_tokens(x[clinical])
  cohort = Cohort(
      name="sksurv_breast_cancer",
      case_ids=np.array([f"breast-{i:03d}" for i in range(n)]),
      time=np.asarray(y["t.tdm"], dtype=np.float64),
      event=np.asarray(y["e.tdm"], dtype=bool),
      modalities={"genes": gene_mod, "clinical": clin_mod},
  )
  cohort.validate(source=SOURCE)
  if standardize:  # fitted per training fold, never here (module docstring)
    cohort.standardize = {"genes": np.ones(gene_mod.dim, bool), "clinical": numeric}
  return cohort


def _gene_tokens(frame: pd.DataFrame, n_tokens: int) -> Modality:
  values = frame.to_numpy(dtype=np.float64)
  if not 1 <= n_tokens <= values.shape[1]:
    raise InputError(f"n_gene_tokens={n_tokens}, expected 1 to {values.shape[1]}",
                     path=SOURCE)
  chunks = np.array_split(np.arange(values.shape[1]), n_tokens)
  groups = tuple((f"genes_{k + 1}", tuple(int(i) for i in idx))
                 for k, idx in enumerate(chunks))
  return Modality(kind="tokens", available=np.ones(len(frame), bool),
                  values=values.astype(np.float32), groups=groups,
                  columns=tuple(frame.columns))


def _clinical_tokens(frame: pd.DataFrame) -> tuple[Modality, np.ndarray]:
  """The clinical token modality and the bool mask of its numeric (not one-hot) columns."""
  blocks, columns, groups, numeric = [], [], [], []
  for var in frame.columns:
    series = frame[var]
    if isinstance(series.dtype, pd.CategoricalDtype) or not pd.api.types.is_numeric_dtype(
        series.dtype):
      cats = (list(series.cat.categories) if isinstance(series.dtype, pd.CategoricalDtype)
              else sorted(series.astype(str).unique()))
      block = np.stack([(series.astype(str) == str(c)).to_numpy(np.float64)
                        for c in cats], axis=1)
      names = [f"{var}={c}" for c in cats]
      numeric.extend([False] * len(names))
    else:
      block = series.to_numpy(np.float64)[:, None]
      names = [var]
      numeric.append(True)
    groups.append((var, tuple(range(len(columns), len(columns) + len(names)))))
    blocks.append(block)
    columns.extend(names)
  return (Modality(kind="tokens", available=np.ones(len(frame), bool),
                   values=np.concatenate(blocks, axis=1).astype(np.float32),
                   groups=tuple(groups), columns=tuple(columns)),
          np.array(numeric, bool))
