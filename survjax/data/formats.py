"""On-disk formats: per-slide feature files, the MCAT/SurvPath clinical CSV, signatures.

The layout is the one users of CLAM, MCAT and SurvPath already have::

  clinical.csv          one row per slide (columns below)
  signatures.csv        optional: one column per gene family, gene symbols, ragged
  features/             <slide_id>.h5 | <slide_id>.pt | <slide_id>.npy
                        (CLAM's features/h5_files/ and features/pt_files/ work too)
  radiology/            optional: <case_id>.h5 | .pt | .npy, slice embeddings [T, D]

Clinical CSV columns:

* ``case_id``: patient id. Several rows (slides) of one case join into one bag, in row
  order; they must agree on time, event and gene values.
* ``slide_id``: feature file stem; a trailing WSI extension (``.svs``, ``.tif``, ...) is
  dropped when looking the file up, as MCAT does.
* ``survival_months``: follow-up time, a finite number > 0.
* ``censorship`` (1 = censored, 0 = death) or ``event`` (1 = death, 0 = censored); if
  both are given they must satisfy ``event = 1 - censorship``.
* Gene columns ending in ``_rnaseq``, ``_cnv`` or ``_mut`` (numeric).
* Anything else (``oncotree_code``, ``train``, an unnamed index column, clinical
  variables) is ignored unless declared as a tabular modality.

Every problem raises `survjax.errors.InputError` with one line naming the file, the case
and what was expected. Nothing here prints or writes.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from survjax.data.cohort import Cohort, Modality
from survjax.errors import InputError

GENE_SUFFIXES = ("_rnaseq", "_cnv", "_mut")
WSI_EXTENSIONS = (".svs", ".tif", ".tiff", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu",
                  ".bif", ".czi", ".svslide")
FEATURE_EXTENSIONS = (".h5", ".pt", ".npy")
_TEXT_COLUMNS = ("case_id", "slide_id", "survival_months", "censorship", "event",
                 "oncotree_code")
_NA_STRINGS = ("", "NA", "N/A", "n/a", "NaN", "nan", "null", "NULL", "None", "<NA>")
_FLOAT16_MAX = float(np.finfo(np.float16).max)


# --------------------------------------------------------------------------- features


def read_features(path, *, expected_dim: int | None = None,
                  case_id: str | None = None, dim_source: str | None = None) -> np.ndarray:
  """Reads one bag of feature vectors as float16 ``[N, D]``.

  Supported files: ``.h5``/``.hdf5`` with a ``features`` dataset ``[N, D]`` or
  ``[1, N, D]`` (CLAM; a ``coords`` dataset is ignored), ``.npy`` and ``.pt`` (a torch
  tensor, or a dict holding one under ``"features"``; needs ``pip install survjax[torch]``).

  Args:
    path: the feature file.
    expected_dim: if given, the required feature dimension D.
    dim_source: where ``expected_dim`` comes from (another file, a config field), named
      in the error.
    case_id: the patient, named in error messages.

  Returns:
    float16 ``[N, D]`` with N >= 1, all finite.

  Raises:
    InputError: missing or unreadable file, not 2-D, empty bag, NaN/inf (also values
      that overflow float16), or D != expected_dim.
  """
  path = Path(path)
  if not path.is_file():
    raise InputError("feature file not found, expected a file", path=path, case_id=case_id)
  suffix = path.suffix.lower()
  if suffix in (".h5", ".hdf5"):
    arr = _read_h5(path, case_id)
  elif suffix == ".npy":
    arr = _read_npy(path, case_id)
  elif suffix == ".pt":
    arr = _read_pt(path, case_id)
  else:
    raise InputError(f"unknown feature file type {suffix!r}, expected .h5, .pt or .npy",
                     path=path, case_id=case_id)
  return _check_bag(arr, path, case_id, expected_dim, dim_source)


def _read_h5(path: Path, case_id) -> np.ndarray:
  import h5py
  try:
    with h5py.File(path, "r") as f:
      if "features" not in f:
        raise InputError(f"no 'features' dataset (found {sorted(f.keys())}), expected "
                         "features [N, D]", path=path, case_id=case_id)
      return np.asarray(f["features"][()])
  except InputError:
    raise
  except Exception as e:  # h5py raises OSError, KeyError, ... on corrupt files.
    raise InputError(f"cannot read HDF5 file ({type(e).__name__}: {e}), expected an HDF5 "
                     "file with a 'features' dataset", path=path, case_id=case_id) from e


def _read_npy(path: Path, case_id) -> np.ndarray:
  try:
    return np.load(path, allow_pickle=False)
  except Exception as e:
    raise InputError(f"cannot read .npy file ({type(e).__name__}: {e}), expected a numeric "
                     "array [N, D]", path=path, case_id=case_id) from e


def _read_pt(path: Path, case_id) -> np.ndarray:
  try:
    import torch
  except ImportError as e:
    raise InputError("reading .pt files needs torch: pip install survjax[torch], or convert "
                     "the features to .npy or .h5", path=path, case_id=case_id) from e
  try:
    obj = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:
    raise InputError(f"cannot read .pt file ({type(e).__name__}: {e}), expected a saved "
                     "tensor [N, D]", path=path, case_id=case_id) from e
  if isinstance(obj, Mapping) and "features" in obj:
    obj = obj["features"]
  if not isinstance(obj, torch.Tensor):
    raise InputError(f"contains a {type(obj).__name__}, expected a tensor [N, D]",
                     path=path, case_id=case_id)
  return obj.detach().cpu().to(torch.float32).numpy()


def _check_bag(arr: np.ndarray, path: Path, case_id, expected_dim,
               dim_source=None) -> np.ndarray:
  """Squeezes CLAM's ``[1, N, D]``, checks shape and values, returns float16."""
  if arr.ndim == 3 and arr.shape[0] == 1:
    arr = arr[0]
  if arr.ndim != 2:
    raise InputError(f"features have shape {arr.shape}, expected a 2-D array [N, D]",
                     path=path, case_id=case_id)
  if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
    raise InputError(f"features have dtype {arr.dtype}, expected numbers", path=path,
                     case_id=case_id)
  if arr.shape[0] == 0 or arr.shape[1] == 0:
    raise InputError(f"empty bag of shape {arr.shape}, expected [N>0, D>0]", path=path,
                     case_id=case_id)
  if expected_dim is not None and arr.shape[1] != expected_dim:
    source = f" ({dim_source})" if dim_source else ""
    raise InputError(f"feature dimension {arr.shape[1]}, expected {expected_dim}{source}",
                     path=path, case_id=case_id)
  if not np.isfinite(arr).all():
    raise InputError("features contain NaN or inf, expected finite values", path=path,
                     case_id=case_id)
  with np.errstate(over="ignore"):
    out = arr.astype(np.float16)
  if not np.isfinite(out).all():
    raise InputError(f"features exceed the float16 range (|x| > {_FLOAT16_MAX:g}), expected "
                     "values that fit float16", path=path, case_id=case_id)
  return out


# --------------------------------------------------------------------------- clinical CSV


@dataclasses.dataclass
class ClinicalTable:
  """A parsed clinical CSV, one entry per case in order of first appearance.

  Attributes:
    path: the CSV file.
    case_ids: str ``[n]``.
    time: float64 ``[n]`` (``survival_months``).
    event: bool ``[n]`` (True = death observed).
    slide_ids: per case, the non-empty slide ids in row order.
    gene_columns: names of the ``_rnaseq``/``_cnv``/``_mut`` columns, CSV order.
    genes: float32 ``[n, len(gene_columns)]``; NaN where a cell is empty.
    rows: the CSV rows (all columns as read), indexed by line number in the file.
    case_rows: per case, its positions in ``rows``.
  """

  path: str
  case_ids: np.ndarray
  time: np.ndarray
  event: np.ndarray
  slide_ids: list[list[str]]
  gene_columns: tuple[str, ...]
  genes: np.ndarray
  rows: pd.DataFrame
  case_rows: list[np.ndarray]


def read_clinical_csv(path, *, slides: bool = True, labels: bool = True) -> ClinicalTable:
  """Reads an MCAT/SurvPath clinical CSV (layout in the module docstring).

  Args:
    path: the CSV file.
    slides: whether a ``slide_id`` column is required (only with a features directory;
      a tabular-only cohort needs none).
    labels: False accepts a file without ``survival_months`` (and without ``censorship``
      / ``event``): every case is then unlabelled (time NaN; predict mode).

  Returns:
    A `ClinicalTable`, one entry per case.

  Raises:
    InputError: missing/empty file, missing column, empty case id, missing,
      non-numeric or non-positive time, event/censorship not 0/1, non-numeric gene
      value, rows of one case that disagree on time, event or gene values, or a slide
      id listed twice.
  """
  path = str(path)
  rows = _read_csv_frame(path)
  unlabelled = not labels and "survival_months" not in rows
  if unlabelled:
    rows["survival_months"] = ""
    if "censorship" not in rows and "event" not in rows:
      rows["event"] = "0"
  for col in ("case_id", "slide_id", "survival_months") if slides else ("case_id",
                                                                          "survival_months"):
    _require_column(rows, col, path)
  if "slide_id" not in rows:
    rows["slide_id"] = ""
  if "censorship" not in rows and "event" not in rows:
    raise InputError("missing column 'censorship' (1 = censored) or 'event' (1 = death), "
                     f"found {list(rows.columns)[:8]}", path=path)
  rows["case_id"] = rows["case_id"].str.strip()
  rows["slide_id"] = rows["slide_id"].str.strip()
  for r, cid in enumerate(rows["case_id"]):
    if not cid:
      raise InputError(f"line {rows.index[r]}: empty case_id, expected a patient id",
                       path=path)
  time = np.full(len(rows), np.nan) if unlabelled else _parse_times(rows, path)
  event = _parse_events(rows, path) & ~np.isnan(time)
  gene_columns = tuple(c for c in rows.columns if c.endswith(GENE_SUFFIXES))
  genes = _parse_numeric_block(rows, gene_columns, path)
  _check_duplicate_slides(rows, path)
  case_ids, case_rows = _group_rows(rows["case_id"].to_numpy())
  for cid, idx in zip(case_ids, case_rows):
    _check_case_agrees(cid, idx, time, "survival_months", path, rows)
    _check_case_agrees(cid, idx, event.astype(np.float64), "event/censorship", path, rows)
    _check_case_agrees(cid, idx, genes, "gene", path, rows, names=gene_columns)
  first = np.asarray([idx[0] for idx in case_rows])
  slides = rows["slide_id"].to_numpy()
  return ClinicalTable(path=path, case_ids=case_ids, time=time[first], event=event[first],
                       slide_ids=[[s for s in slides[idx] if s] for idx in case_rows],
                       gene_columns=gene_columns, genes=genes[first], rows=rows,
                       case_rows=case_rows)


def _group_rows(case_col: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
  """Case ids in order of first appearance and, per case, its row positions."""
  pos, groups = {}, []
  for r, cid in enumerate(case_col):
    if cid not in pos:
      pos[cid] = len(groups)
      groups.append([])
    groups[pos[cid]].append(r)
  return np.asarray(list(pos), dtype=str), [np.asarray(g) for g in groups]


def _read_csv_frame(path: str) -> pd.DataFrame:
  """All rows; id/outcome columns as text ("" when empty), others parsed by pandas."""
  if not os.path.isfile(path):
    raise InputError("file not found, expected a clinical CSV", path=path)
  try:
    header = pd.read_csv(path, nrows=0).columns
  except pd.errors.EmptyDataError:
    raise InputError("empty file, expected a header and one row per slide", path=path)
  except Exception as e:
    raise InputError(f"cannot read CSV ({type(e).__name__}: {e})", path=path) from e
  text = {c: str for c in header if str(c).strip() in _TEXT_COLUMNS}
  try:
    rows = pd.read_csv(path, dtype=text)  # Default NA strings ("", NA, nan, ...) -> NaN.
  except Exception as e:
    raise InputError(f"cannot read CSV ({type(e).__name__}: {e})", path=path) from e
  if len(rows) == 0:
    raise InputError("empty file, expected one row per slide after the header", path=path)
  rows.columns = [str(c).strip() for c in rows.columns]
  for c in rows.columns:
    if c in _TEXT_COLUMNS:
      rows[c] = rows[c].fillna("").astype(str)
  rows.index = pd.RangeIndex(2, len(rows) + 2, name="line")  # line numbers in the file
  return rows


def _require_column(rows: pd.DataFrame, col: str, path: str) -> None:
  if col not in rows:
    raise InputError(f"missing column {col!r}, expected case_id, slide_id, survival_months, "
                     "censorship or event, and gene columns", path=path)


def _parse_times(rows: pd.DataFrame, path: str) -> np.ndarray:
  out = np.empty(len(rows))
  for r, raw in enumerate(rows["survival_months"]):
    try:
      t = float(raw)
    except ValueError:
      t = None
    if t is None or not np.isfinite(t) or t <= 0:
      what = "missing" if not raw.strip() else repr(raw)
      raise InputError(f"line {rows.index[r]}: survival_months is {what}, expected a "
                       "number > 0", path=path, case_id=rows["case_id"].iat[r])
    out[r] = t
  return out


def _parse_binary(rows: pd.DataFrame, col: str, path: str) -> np.ndarray:
  out = np.empty(len(rows), dtype=bool)
  for r, raw in enumerate(rows[col]):
    try:
      v = float(raw)
    except ValueError:
      v = None
    if v not in (0.0, 1.0):
      raise InputError(f"line {rows.index[r]}: {col} is {raw!r}, expected 0 or 1",
                       path=path, case_id=rows["case_id"].iat[r])
    out[r] = v == 1.0
  return out


def _parse_events(rows: pd.DataFrame, path: str) -> np.ndarray:
  event = None if "event" not in rows else _parse_binary(rows, "event", path)
  if "censorship" in rows:
    from_cens = ~_parse_binary(rows, "censorship", path)
    if event is not None and (event != from_cens).any():
      r = int(np.argmax(event != from_cens))
      raise InputError(f"line {rows.index[r]}: event and censorship disagree, expected "
                       "event = 1 - censorship", path=path, case_id=rows["case_id"].iat[r])
    event = from_cens
  return event


def _parse_numeric_block(rows: pd.DataFrame, columns: Sequence[str], path: str,
                         what: str = "gene") -> np.ndarray:
  """float32 ``[rows, len(columns)]``, NaN for empty cells; errors on other text."""
  if not columns:
    return np.zeros((len(rows), 0), np.float32)
  values = np.empty((len(rows), len(columns)), np.float64)
  for j, col in enumerate(columns):
    series = rows[col]
    if pd.api.types.is_numeric_dtype(series.dtype):
      values[:, j] = series.to_numpy(dtype=np.float64, na_value=np.nan)
      continue
    num = pd.to_numeric(series, errors="coerce")
    bad = num.isna() & series.notna()
    if bad.any():
      r = int(np.argmax(bad.to_numpy()))
      raise InputError(f"line {rows.index[r]}: {what} column {col!r} is "
                       f"{series.iat[r]!r}, expected a number", path=path,
                       case_id=rows["case_id"].iat[r])
    values[:, j] = num.to_numpy(dtype=np.float64, na_value=np.nan)
  if np.isinf(values).any():
    r, c = np.argwhere(np.isinf(values))[0]
    raise InputError(f"line {rows.index[r]}: {what} column {columns[c]!r} is inf, "
                     "expected a finite number", path=path, case_id=rows["case_id"].iat[r])
  return values.astype(np.float32)


def _check_duplicate_slides(rows: pd.DataFrame, path: str) -> None:
  slides = rows["slide_id"]
  dup = slides.duplicated(keep="first") & (slides != "")
  if dup.any():
    r = int(np.argmax(dup.to_numpy()))
    raise InputError(f"line {rows.index[r]}: slide_id {slides.iat[r]!r} listed twice, "
                     "expected one row per slide", path=path, case_id=rows["case_id"].iat[r])


def _check_case_agrees(cid, idx, values, what, path, rows, names=None) -> None:
  """Rows ``idx`` of one case must carry the same ``values`` (NaN == NaN)."""
  if len(idx) < 2:
    return
  ref = values[idx[0]]
  for r in idx[1:]:
    if not np.array_equal(values[r], ref, equal_nan=True):
      col = what
      if names is not None:
        c = int(np.argmax(~((values[r] == ref) | (np.isnan(values[r]) & np.isnan(ref)))))
        col = f"{what} column {names[c]!r}"
      raise InputError(f"line {rows.index[r]}: {col} differs from line "
                       f"{rows.index[idx[0]]} of the same case, expected every slide "
                       "row of a case to agree", path=path, case_id=cid)


# --------------------------------------------------------------------------- signatures


def read_signatures_csv(path, columns: Sequence[str], *,
                        clinical_csv=None) -> tuple[tuple[str, tuple[int, ...]], ...]:
  """Maps MCAT gene families onto clinical-CSV gene columns.

  The signatures CSV has one column per family (MCAT's six: Tumor Suppressor Genes,
  Oncogenes, Protein Kinases, Cell Differentiation Markers, Transcription Factors,
  Cytokines_and_Growth_Factors), each listing gene symbols, ragged (empty cells below
  shorter columns). As in MCAT, a family's token uses every column among
  ``<gene>_rnaseq``, ``<gene>_cnv`` and ``<gene>_mut`` that exists, sorted by name; a
  column may belong to several families.

  Args:
    path: the signatures CSV.
    columns: the gene column names of the clinical CSV.
    clinical_csv: the clinical CSV's path, named in errors.

  Returns:
    ``((family, indices into columns), ...)`` in the file's column order.

  Raises:
    InputError: missing or empty file, or a family that matches no column.
  """
  path = str(path)
  if not os.path.isfile(path):
    raise InputError("file not found, expected a signatures CSV", path=path)
  try:
    sig = pd.read_csv(path, dtype=str, keep_default_na=False)
  except pd.errors.EmptyDataError:
    raise InputError("empty file, expected one column of gene symbols per family", path=path)
  except Exception as e:
    raise InputError(f"cannot read CSV ({type(e).__name__}: {e})", path=path) from e
  families = [c for c in sig.columns if not str(c).startswith("Unnamed:")]
  if not families:
    raise InputError("no family columns, expected one column of gene symbols per family",
                     path=path)
  index = {c: i for i, c in enumerate(columns)}
  groups = []
  for fam in families:
    genes = [g.strip() for g in sig[fam] if g.strip() and g.strip() not in _NA_STRINGS]
    names = sorted({g + s for g in genes for s in GENE_SUFFIXES} & index.keys())
    if not names:
      where = f" of {clinical_csv}" if clinical_csv else ""
      raise InputError(f"family {str(fam).strip()!r} ({len(genes)} genes, e.g. "
                       f"{', '.join(genes[:3]) or 'none'}) matches no column{where}, expected "
                       "<gene>_rnaseq, <gene>_cnv or <gene>_mut columns", path=path)
    groups.append((str(fam).strip(), tuple(index[n] for n in names)))
  return tuple(groups)


def suffix_groups(columns: Sequence[str]) -> tuple[tuple[str, tuple[int, ...]], ...]:
  """Without a signatures file: one token per suffix (rnaseq, cnv, mut) that occurs."""
  groups = []
  for suffix in GENE_SUFFIXES:
    idx = tuple(i for i, c in enumerate(columns) if c.endswith(suffix))
    if idx:
      groups.append((suffix[1:], idx))
  return tuple(groups)


# --------------------------------------------------------------------------- cohort


def load_file_cohort(clinical_csv, *, name: str, features_dir=None, signatures_csv=None,
                     radiology_dir=None, tiles_dir=None, tiles_count: int = 4,
                     tile_size: int = 64,
                     tabular: Mapping[str, Sequence[str] | Mapping[str, Sequence[str]]]
                     | None = None,
                     feature_ext: Sequence[str] = FEATURE_EXTENSIONS,
                     expected_dim: int | None = None,
                     allow_missing: Sequence[str] = (),
                     impute: str = "error",
                     labels: bool = True,
                     tabular_columns: Mapping[str, Sequence[str]] | None = None,
                     progress: bool = False) -> Cohort:
  """Loads a cohort from a clinical CSV and feature directories (module docstring).

  Modalities, in this order, each only when its source is given:

  * ``pathology`` (bag, float16): every slide of a case, concatenated in CSV row order,
    from ``features_dir/<slide_id>{ext}`` (first ``ext`` of ``feature_ext`` that exists;
    also looked up under ``h5_files/`` and ``pt_files/``).
  * ``genomics`` (tokens): the gene columns; one token per signatures family (only the
    columns some family uses are kept) or, without ``signatures_csv``, one per suffix
    (rnaseq, cnv, mut). A case whose gene cells are all empty is unavailable when
    ``"genomics"`` is in ``allow_missing``.
  * ``radiology`` (bag, float16): ``radiology_dir/<case_id>{ext}``, slice embeddings
    ``[T, D]``; a case without a file is unavailable.
  * ``tiles`` (patches, uint8 ``[tiles_count, tile_size, tile_size, 3]``): raw WSI tiles
    of each case's slides from ``tiles_dir/<slide_id>.h5`` (CLAM's ``imgs`` dataset) or
    ``tiles_dir/<slide_id>/`` (image files), `survjax.data.tiles`; a case without any is
    unavailable.
  * one tokens modality per ``tabular`` entry: ``{"clinical": ["age", "stage"]}`` makes
    one token per column; ``{"clinical": {"demo": ["age", "sex"], "tumor": ["stage"]}}``
    makes one token per group. Non-numeric columns are one-hot encoded (columns
    ``stage=II``, ... sorted by category). Values are kept raw (no scaling). A case with
    every cell of the modality empty is unavailable; a partly empty row is an error
    unless ``impute`` says otherwise.

  Args:
    clinical_csv: the clinical CSV.
    name: the cohort name (written to results).
    features_dir: directory of per-slide feature files; None = no pathology modality.
    signatures_csv: optional MCAT signatures CSV for the genomic tokens.
    radiology_dir: optional directory of per-case radiology embeddings.
    tabular: optional extra tokens modalities from CSV columns (above).
    feature_ext: feature file extensions, in order of preference.
    expected_dim: required pathology feature dimension (default: the first file's).
    allow_missing: modality names whose absence for a case marks it unavailable instead
      of raising: ``"pathology"`` (no slide id, or no file for any of its slides) and
      ``"genomics"``; radiology and tabular modalities may always be missing (naming
      them is accepted and changes nothing).
    impute: partly empty rows of the genomics and tabular modalities: ``"error"``
      (default), or ``"train_mean"`` / ``"train_median"``: the row stays available, its
      empty cells are recorded in ``cohort.imputation`` (value 0 until imputed) and filled
      per column with the mean / median of the observed cells of each training fold
      (`impute_fold`, called by the cross-validation harness and by predict mode). A row
      with every cell empty stays unavailable, never imputed.
    labels: False: survival columns are optional (`read_clinical_csv`); a cohort without
      them is validated as if labelled and returned unlabelled (predict mode).
    tabular_columns: optional ``{modality: encoded column names}`` of another cohort
      (the training one, predict mode): text columns are one-hot encoded over *its*
      categories, in its order, so both cohorts get the same columns; a category it never
      had is an error.
    progress: show a tqdm progress bar over cases on stderr while reading features.

  Returns:
    The validated `Cohort`, cases in order of first appearance in the CSV.

  Raises:
    InputError: any bad input, naming the file and the case.
  """
  if impute not in IMPUTE_POLICIES:
    raise InputError(f"impute is {impute!r}, expected one of {list(IMPUTE_POLICIES)}",
                     path="config.data.files.impute")
  table = read_clinical_csv(clinical_csv, slides=features_dir is not None or tiles_dir is not None,
                            labels=labels)
  path = table.path
  allow = _check_allow_missing(allow_missing, tabular, path)
  gaps: dict[str, np.ndarray] = {}
  modalities = {}
  if features_dir is not None:
    modalities["pathology"] = _pathology(table, Path(features_dir), tuple(feature_ext),
                                         expected_dim, "pathology" in allow, progress)
  genomics = _genomics(table, signatures_csv, "genomics" in allow, impute, gaps)
  if genomics is not None:
    modalities["genomics"] = genomics
  if radiology_dir is not None:
    modalities["radiology"] = _radiology(table, Path(radiology_dir), tuple(feature_ext))
  if tiles_dir is not None:
    from survjax.data.tiles import tiles_modality
    modalities["tiles"] = tiles_modality(table.case_ids, table.slide_ids, tiles_dir,
                                         count=int(tiles_count), tile_size=int(tile_size))
  for mod_name, spec in (tabular or {}).items():
    if mod_name in modalities or mod_name in ("pathology", "genomics", "radiology", "tiles"):
      raise InputError(f"tabular modality name {mod_name!r} is taken, expected a new name",
                       path=path)
    modalities[mod_name] = _tabular(table, mod_name, spec, impute, gaps,
                                    (tabular_columns or {}).get(mod_name))
  cohort = Cohort(name=name, case_ids=table.case_ids, time=table.time, event=table.event,
                  modalities=modalities)
  validate_cohort(cohort, path, labels)
  if impute != "error":
    cohort.imputation = {"policy": impute, "cells": gaps}
  return cohort


def validate_cohort(cohort, source, labels: bool = True) -> None:
  """`Cohort.validate`; with ``labels=False`` a cohort without any survival label is
  validated as if every patient had one (everything but the labels is checked)."""
  if labels or cohort.labelled.any():
    cohort.validate(source=source)
    return
  Cohort(name=cohort.name, case_ids=cohort.case_ids, time=np.ones(len(cohort)),
         event=np.zeros(len(cohort), bool), modalities=cohort.modalities).validate(source)


# --------------------------------------------------------------------------- imputation

IMPUTE_POLICIES = ("error", "train_mean", "train_median")


def imputation_summary(cohort) -> str | None:
  """One line for the load summary: cells to impute per modality, or None."""
  imp = getattr(cohort, "imputation", None)
  if not imp:
    return None
  counts = ", ".join(f"{m} {int(c.sum())}" for m, c in imp["cells"].items())
  return (f"  imputed cells ({imp['policy']}, fitted on each training fold): "
          f"{counts or 'none'}")


def impute_fold(cohort, train_idx, *, reference=None):
  """``cohort`` with its recorded empty cells filled from training patients ``train_idx``.

  Per column, the mean (``train_mean``) or median (``train_median``) of the observed cells
  of ``reference`` (default ``cohort``) at rows ``train_idx`` (available rows whose cell
  is not empty), so held-out patients never influence the values. Returns ``cohort``
  itself when it has nothing to impute; otherwise a shallow copy (bags shared) whose
  imputed modalities have new ``values``. ``reference`` is the training cohort when
  ``cohort`` is a new one (predict mode); its policy is used.

  Raises:
    InputError: a column with empty cells to fill and no observed value in the
      training patients.
  """
  import dataclasses as dc
  imp = getattr(cohort, "imputation", None)
  if not imp or not any(c.any() for c in imp["cells"].values()):
    return cohort
  ref = reference if reference is not None else cohort
  ref_imp = getattr(ref, "imputation", None) or imp
  policy = ref_imp["policy"]
  if policy not in ("train_mean", "train_median"):
    raise InputError(f"the cohort has empty cells and the run's impute policy is {policy!r}, "
                     "expected train_mean or train_median", path="config.data.files.impute")
  idx = np.asarray(train_idx)
  mods = dict(cohort.modalities)
  for name, cells in imp["cells"].items():
    if not cells.any():
      continue
    rmod = ref.modalities[name]
    rcells = ref_imp["cells"].get(name, np.zeros_like(rmod.values, bool))
    rows = idx[rmod.available[idx]]
    vals = rmod.values[rows].astype(np.float64)
    observed = ~rcells[rows]
    fill = np.empty(vals.shape[1])
    for j in range(vals.shape[1]):
      col = vals[observed[:, j], j]
      if cells[:, j].any() and col.size == 0:
        raise InputError(f"{name} column {rmod.columns[j] if rmod.columns else j!r} has empty "
                         "cells and no value among the training patients, expected at least "
                         "one", path="config.data.files.impute")
      fill[j] = 0.0 if col.size == 0 else (np.mean(col) if policy == "train_mean"
                                           else np.median(col))
    values = cohort.modalities[name].values.copy()
    values[cells] = np.broadcast_to(fill, values.shape)[cells].astype(values.dtype)
    mods[name] = dc.replace(cohort.modalities[name], values=values)
  out = copy.copy(cohort)   # keeps the other per-fold flags (``standardize``)
  out.modalities = mods
  out.imputation = {"policy": policy, "cells": {k: np.zeros_like(v) for k, v in
                                                imp["cells"].items()}, "filled": True}
  return out


def standardize_fold(cohort, train_idx, *, reference=None):
  """``cohort`` with its flagged columns z-scored with training patients ``train_idx``.

  A loader flags the columns to standardise in ``cohort.standardize`` (modality name ->
  bool mask over its columns, e.g. `survjax.data.breast`) rather than z-scoring them over
  all patients, which would let the held-out patients shift the training features. Per
  flagged column, ``(x - mean) / std`` with the mean and standard deviation (ddof 0) of
  the rows ``train_idx`` of ``reference`` (default ``cohort``) that have the modality; a
  constant column is only centred; rows of patients without the modality stay 0.
  ``reference`` is the training cohort, imputed for the fold, when ``cohort`` is a new one
  (predict mode): its flags and statistics are used. Call after `impute_fold` (the
  statistics include the filled cells, as scikit-learn's imputer then scaler), once.
  Returns ``cohort`` itself when nothing is flagged, else a shallow copy with new
  ``values`` for the flagged modalities.

  Raises:
    InputError: a flagged modality that no training patient has.
  """
  ref = reference if reference is not None else cohort
  flags = getattr(ref, "standardize", None)
  if not flags:
    return cohort
  idx = np.asarray(train_idx)
  mods = dict(cohort.modalities)
  for name, cols in flags.items():
    if name not in mods or not np.any(cols):
      continue
    rmod = ref.modalities[name]
    fit = rmod.values[idx[rmod.available[idx]]][:, cols].astype(np.float64)
    if not len(fit):
      raise InputError(f"no training patient has {name}, expected at least one to "
                       "standardise its columns on", path=cohort.name)
    std = fit.std(axis=0)
    values = mods[name].values.copy()
    cell = np.ix_(mods[name].available, np.asarray(cols, bool))
    values[cell] = (values[cell] - fit.mean(axis=0)) / np.where(std > 0, std, 1.0)
    mods[name] = dataclasses.replace(mods[name], values=values)
  out = copy.copy(cohort)
  out.modalities = mods
  return out


def _check_allow_missing(allow_missing, tabular, path) -> frozenset:
  """Known names only; radiology and tabular modalities may always be missing."""
  allow = frozenset(allow_missing)
  known = {"pathology", "genomics", "radiology", *(tabular or {})}
  unknown = sorted(allow - known)
  if unknown:
    raise InputError(f"allow_missing names {unknown[0]!r}, expected some of {sorted(known)}",
                     path=path)
  return allow


def _slide_candidates(features_dir: Path, slide_id: str, exts) -> list[Path]:
  stems = [slide_id]
  if slide_id.lower().endswith(WSI_EXTENSIONS):
    stems.append(os.path.splitext(slide_id)[0])
  dirs = [features_dir, features_dir / "h5_files", features_dir / "pt_files"]
  return [d / (s + e) for e in exts for s in stems for d in dirs]


def _find_file(candidates: list[Path]) -> Path | None:
  for c in candidates:
    if c.is_file():
      return c
  return None


def _pathology(table: ClinicalTable, features_dir: Path, exts, expected_dim, allow,
               progress) -> Modality:
  if not features_dir.is_dir():
    raise InputError("features directory not found, expected a directory of "
                     "<slide_id>.h5/.pt/.npy files", path=features_dir)
  cases = range(len(table.case_ids))
  if progress:
    from tqdm import tqdm
    cases = tqdm(cases, desc="reading slide features", unit="case", file=sys.stderr)
  return _read_bags(
      table, cases,
      lambda i: _case_slide_files(table, table.case_ids[i], table.slide_ids[i],
                                  features_dir, exts, allow),
      expected_dim=expected_dim, missing_path=features_dir,
      missing_msg=f"no feature file for any case, expected <slide_id>{exts[0]} files")


def _read_bags(table: ClinicalTable, cases, case_files, *, expected_dim=None, missing_path,
               missing_msg: str) -> Modality:
  """A bag modality from per-case feature files (pathology slides, radiology volumes).

  ``case_files(i)`` gives case ``i``'s files, read and concatenated in order, or None if
  the case has none (unavailable, an empty bag). Every file must have the feature
  dimension ``expected_dim`` or, without it, that of the first file read.

  Args:
    table: the clinical table (case ids for the errors, number of cases).
    cases: the case indices to read, in order (``range(n)``, possibly in a progress bar).
    case_files: ``i -> list[Path] | None``.
    expected_dim: the configured feature dimension, or None.
    missing_path: the file or directory named when no case has a file.
    missing_msg: the message then.

  Returns:
    ``Modality(kind="bag")`` of float16 bags.

  Raises:
    InputError: from `read_features`, or when no case has a file.
  """
  bags, available = [], np.zeros(len(table.case_ids), dtype=bool)
  dim = expected_dim
  source = None if expected_dim is None else "the configured feature_dim"
  for i in cases:
    cid = table.case_ids[i]
    files = case_files(i)
    if files is None:
      bags.append(None)
      continue
    parts = []
    for f in files:
      parts.append(read_features(f, expected_dim=dim, case_id=cid, dim_source=source))
      if source is None:
        dim, source = parts[-1].shape[1], f"the dimension of {f}"
    bags.append(np.concatenate(parts, axis=0) if len(parts) > 1 else parts[0])
    available[i] = True
  if not available.any():
    raise InputError(missing_msg, path=missing_path)
  bags = [np.zeros((0, dim), np.float16) if b is None else b for b in bags]
  return Modality(kind="bag", available=available, bags=bags)


def _case_slide_files(table, cid, slides, features_dir, exts, allow) -> list[Path] | None:
  """The case's feature files in slide order, or None if it has none and may miss."""
  if not slides:
    if allow:
      return None
    raise InputError("no slide_id, expected at least one slide per case (or allow_missing="
                     "('pathology',))", path=table.path, case_id=cid)
  files = [_find_file(_slide_candidates(features_dir, s, exts)) for s in slides]
  missing = [s for s, f in zip(slides, files) if f is None]
  if missing and not (allow and len(missing) == len(slides)):
    expected = features_dir / f"{missing[0]}{{{','.join(exts)}}}"
    raise InputError(f"feature file for slide {missing[0]!r} not found, expected a file",
                     path=expected, case_id=cid)
  return None if missing else files


def _genomics(table: ClinicalTable, signatures_csv, allow, impute="error",
              gaps=None) -> Modality | None:
  columns = table.gene_columns
  if not columns:
    if signatures_csv is not None:
      raise InputError("no gene columns, expected columns ending in _rnaseq, _cnv or _mut "
                       "to match the signatures", path=table.path)
    return None
  if signatures_csv is not None:
    groups = read_signatures_csv(signatures_csv, columns, clinical_csv=table.path)
    used = sorted({i for _, idx in groups for i in idx})
    remap = {old: new for new, old in enumerate(used)}
    groups = tuple((fam, tuple(remap[i] for i in idx)) for fam, idx in groups)
  else:
    used = list(range(len(columns)))
    groups = suffix_groups(columns)
  values = table.genes[:, used]
  available = _rows_available(values, table, "genomics", [columns[i] for i in used], allow,
                              impute != "error")
  if gaps is not None:
    gaps["genomics"] = np.isnan(values) & available[:, None]
  values = np.where(available[:, None] & ~np.isnan(values), values, 0).astype(np.float32)
  return Modality(kind="tokens", available=available, values=values, groups=groups,
                  columns=tuple(columns[i] for i in used))


def _rows_available(values, table, what, names, allow_empty, allow_partial=False
                    ) -> np.ndarray:
  """True where a row has a value (complete, or partly empty with ``allow_partial``);
  all-empty rows are unavailable if allowed, else an error; partly empty rows an error
  unless ``allow_partial`` (imputation)."""
  nan = np.isnan(values)
  empty = nan.all(axis=1) if values.shape[1] else np.zeros(len(values), bool)
  partial = nan.any(axis=1) & ~empty & (not allow_partial)
  bad = partial | (empty & (not allow_empty))
  if bad.any():
    i = int(np.argmax(bad))
    col = names[int(np.argmax(nan[i]))]
    hint = (" (or data.files.impute='train_mean' / 'train_median')" if partial[i]
            else f" (or allow_missing=('{what}',))")
    raise InputError(f"{what} column {col!r} is empty, expected a number{hint}",
                     path=table.path, case_id=table.case_ids[i])
  return ~empty


def _radiology(table: ClinicalTable, radiology_dir: Path, exts) -> Modality:
  if not radiology_dir.is_dir():
    raise InputError("radiology directory not found, expected a directory of "
                     "<case_id>.h5/.pt/.npy files", path=radiology_dir)

  def case_files(i):
    f = _find_file([radiology_dir / (table.case_ids[i] + e) for e in exts])
    return None if f is None else [f]

  return _read_bags(
      table, range(len(table.case_ids)), case_files, missing_path=radiology_dir,
      missing_msg=f"no radiology file for any case, expected <case_id>{exts[0]} files")


def _tabular(table: ClinicalTable, mod_name: str, spec, impute="error", gaps=None,
             reference_columns=None) -> Modality:
  if hasattr(spec, "to_dict"):  # an ml_collections ConfigDict from a config file
    spec = spec.to_dict()
  if isinstance(spec, str) or not isinstance(spec, (Mapping, Sequence)) or not spec:
    raise InputError(f"tabular[{mod_name!r}] is {spec!r}, expected a list of columns or a "
                     "dict of token name -> columns", path=table.path)
  tokens = dict(spec) if isinstance(spec, Mapping) else {c: [c] for c in spec}
  rows, first = table.rows, np.asarray([idx[0] for idx in table.case_rows])
  blocks, names, groups = [], [], []
  for token, cols in tokens.items():
    cols = [cols] if isinstance(cols, str) else list(cols)
    start = len(names)
    for col in cols:
      _require_column(rows, col, table.path)
      cats = None
      if reference_columns:
        cats = [c.split("=", 1)[1] for c in reference_columns if c.startswith(col + "=")]
      block, col_names = _encode_column(table, col, cats or None)
      blocks.append(block)
      names.extend(col_names)
    groups.append((str(token), tuple(range(start, len(names)))))
  values = np.concatenate(blocks, axis=1)
  for cid, idx in zip(table.case_ids, table.case_rows):
    _check_case_agrees(cid, idx, values, mod_name, table.path, rows, names=names)
  values = values[first]
  available = _rows_available(values, table, mod_name, names, allow_empty=True,
                              allow_partial=impute != "error")
  if gaps is not None:
    gaps[mod_name] = np.isnan(values) & available[:, None]
  values = np.where(available[:, None] & ~np.isnan(values), values, 0).astype(np.float32)
  return Modality(kind="tokens", available=available, values=values, groups=tuple(groups),
                  columns=tuple(names))


def _encode_column(table: ClinicalTable, col: str, categories=None
                   ) -> tuple[np.ndarray, list[str]]:
  """Numeric column -> ``[rows, 1]``; text column -> one-hot ``[rows, n_categories]``
  (over ``categories`` when given: the training cohort's)."""
  series = table.rows[col]
  num = pd.to_numeric(series, errors="coerce")
  text = series.astype(object).where(series.notna(), None)
  text = text.map(lambda v: None if v is None or str(v).strip() in _NA_STRINGS
                  else str(v).strip())
  if categories is None and (num.notna() | text.isna()).all():
    vals = num.to_numpy(dtype=np.float64)
    if np.isinf(vals).any():
      r = int(np.argmax(np.isinf(vals)))
      raise InputError(f"line {table.rows.index[r]}: column {col!r} is inf, expected "
                       "a finite number", path=table.path,
                       case_id=table.rows["case_id"].iat[r])
    return vals[:, None], [col]
  cats = sorted(set(text.dropna()))
  if categories is not None:
    unseen = sorted(set(cats) - set(categories))
    if unseen:
      r = int(np.argmax((text == unseen[0]).to_numpy()))
      raise InputError(f"line {table.rows.index[r]}: column {col!r} is {unseen[0]!r}, a "
                       f"category the training cohort never had, expected one of "
                       f"{list(categories)}", path=table.path,
                       case_id=table.rows["case_id"].iat[r])
    cats = list(categories)
  onehot = np.stack([(text == c).to_numpy(dtype=np.float64) for c in cats], axis=1)
  onehot[text.isna().to_numpy()] = np.nan
  return onehot, [f"{col}={c}" for c in cats]
