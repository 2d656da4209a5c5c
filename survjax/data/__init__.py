"""Cohort sources: the embedded synthetic cohort, user files, a tfds build, sksurv data."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from survjax.data.cohort import Cohort, Modality  # noqa: F401
from survjax.errors import InputError, check_count

# numexpr (imported by pandas) logs "NumExpr defaulting to N threads." at INFO on import;
# under absl that is a line on stderr before any error of ours, which must stay the only
# line a bad input prints.
logging.getLogger("numexpr.utils").setLevel(logging.WARNING)


def check_plain_name(name: str, path: str) -> None:
  """An `InputError` at ``path`` unless the cohort name ``name`` is a plain folder name
  (it names the split and output folders; ``../x`` would write outside them)."""
  if Path(name).name != name or name in ("", ".", ".."):
    raise InputError(f"cohort name {name!r} is a path, expected a plain name (it names the "
                     "split and output folders)", path=path)


def load_cohort(data, *, labels: bool = True, tabular_columns=None) -> Cohort:
  """The cohort a config's ``data`` block names, validated.

  ``labels=False`` (predict mode): a files cohort may come without survival columns;
  ``tabular_columns``: the training cohort's encoded tabular columns (one-hot categories).

  Raises:
    InputError: unknown source or any bad input in the files.
  """
  source = data.source
  if data.get("name"):
    check_plain_name(data.name, "config.data.name")
  if source == "synthetic":
    from survjax.data.synthetic import SyntheticSpec, make_synthetic_cohort
    known = {f.name for f in dataclasses.fields(SyntheticSpec)}
    kw = dict(data.synthetic)
    unknown = sorted(set(kw) - known)
    if unknown:
      raise InputError(f"unknown synthetic option {unknown[0]!r}, expected one of {sorted(known)}",
                       path="config.data.synthetic")
    spec = SyntheticSpec(**kw)
    try:
      cohort = make_synthetic_cohort(spec, name=data.name or
                                     f"synthetic-n{spec.n_patients}-seed{spec.seed}")
    except ValueError as e:  # an out-of-range knob, e.g. coupling
      raise InputError(str(e), path="config.data.synthetic") from e
  elif source == "files":
    from survjax.data.formats import load_file_cohort
    f = data.files
    if not f.clinical_csv:
      raise InputError("data.source='files' needs data.files.clinical_csv", path="config")
    check_count(f.get("feature_dim", 0), "config.data.files.feature_dim", 0,
                "a feature width", hint="0: as the files have it")
    cohort = load_file_cohort(
        f.clinical_csv, name=data.name or "cohort", features_dir=f.features_dir or None,
        signatures_csv=f.signatures_csv or None, radiology_dir=f.radiology_dir or None,
        tiles_dir=f.get("tiles_dir", "") or None, tiles_count=f.get("tiles_count", 4),
        tile_size=f.get("tile_size", 64),
        expected_dim=f.feature_dim or None, allow_missing=tuple(f.allow_missing),
        impute=f.get("impute", "error"), labels=labels, tabular_columns=tabular_columns,
        tabular=dict(f.get("tabular", {})) or None)
  elif source == "tfds":
    from survjax.data.tfds_builder import load_tfds_cohort
    if not data.tfds.get("name"):
      raise InputError("data.source='tfds' needs the dataset's name (the --name given to "
                       "survjax.data.prepare)", path="config.data.tfds.name")
    cohort = load_tfds_cohort(data.tfds.data_dir, data.tfds.name)
    if data.name:
      cohort.name = data.name
  elif source == "sksurv_breast":
    from survjax.data.breast import load_breast_cancer_cohort
    cohort = load_breast_cancer_cohort()
  else:
    raise InputError(f"unknown data.source {source!r}, expected synthetic, files, tfds or "
                     "sksurv_breast", path="config")
  from survjax.data.formats import validate_cohort
  validate_cohort(cohort, getattr(data.files, "clinical_csv", "") or source, labels)
  return cohort
