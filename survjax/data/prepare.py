"""Pack a cohort from files into a tfds build, once.

Usage::

  python -m survjax.data.prepare --clinical_csv=tcga_brca.csv --features_dir=feats/ \\
      [--signatures_csv=signatures.csv] [--radiology_dir=rad/] [--feature_dim=1024] \\
      [--allow_missing=pathology] [--tabular='{"clinical": ["age", "stage"]}'] \\
      --data_dir=tfds_data --name=tcga_brca [--overwrite]

It reads the files with `survjax.data.formats.load_file_cohort` (progress bar over
cases), validates them, and writes ``<data_dir>/survjax_cohort/<name>/1.0.0/`` with
`survjax.data.tfds_builder.build_tfds_cohort` (tfds' progress bars). Train from it with
``--config.data.source=tfds --config.data.tfds.data_dir=... --config.data.tfds.name=...``.

Exit status: 0 done; 2 bad input, reported as one line on stderr naming the file, the
patient and what was expected; nothing is left half-written.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from absl import app, flags, logging  # noqa: E402

_CLINICAL = flags.DEFINE_string("clinical_csv", None, "Clinical/genomic CSV, one row per "
                                "slide.")
_FEATURES = flags.DEFINE_string("features_dir", None, "Directory of <slide_id>.h5/.pt/.npy.")
_SIGNATURES = flags.DEFINE_string("signatures_csv", None, "MCAT signatures CSV (gene "
                                  "families); default: one token per rnaseq/cnv/mut.")
_RADIOLOGY = flags.DEFINE_string("radiology_dir", None, "Directory of <case_id>.h5/.pt/.npy.")
_TABULAR = flags.DEFINE_string("tabular", None, "JSON: modality -> list of columns, or "
                               "modality -> {token: [columns]}.")
_FEATURE_DIM = flags.DEFINE_integer("feature_dim", None, "Required pathology feature "
                                    "dimension.")
_ALLOW_MISSING = flags.DEFINE_list("allow_missing", [], "Modalities a case may lack: "
                                   "pathology, genomics.")
_FEATURE_EXT = flags.DEFINE_list("feature_ext", [".h5", ".pt", ".npy"], "Feature file "
                                 "extensions, in order of preference.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "tfds data directory to write into.")
_NAME = flags.DEFINE_string("name", None, "Dataset name (letters, digits, _ . + -).")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an existing build of this name.")


def _tabular_spec():
  from survjax.errors import InputError
  if not _TABULAR.value:
    return None
  try:
    spec = json.loads(_TABULAR.value)
  except json.JSONDecodeError as e:
    raise InputError(f"not valid JSON ({e.msg}), expected e.g. "
                     "'{\"clinical\": [\"age\", \"stage\"]}'", path="--tabular") from e
  if not isinstance(spec, dict):
    raise InputError("expected a JSON object: modality -> columns", path="--tabular")
  return spec


def prepare() -> str:
  """Loads the flags' cohort and builds it; returns the dataset directory."""
  from survjax.data.formats import load_file_cohort
  from survjax.data.tfds_builder import build_tfds_cohort, check_dataset_name, dataset_dir
  from survjax.errors import InputError
  check_dataset_name(_NAME.value)
  from survjax.rundir import check_creatable
  check_creatable(Path(_DATA_DIR.value), "--data_dir")
  target = dataset_dir(_DATA_DIR.value, _NAME.value)
  if target.exists() and not _OVERWRITE.value:  # Say so before reading every slide.
    raise InputError("dataset already exists, expected a new --name or --overwrite",
                     path=target)
  cohort = load_file_cohort(
      _CLINICAL.value, name=_NAME.value, features_dir=_FEATURES.value,
      signatures_csv=_SIGNATURES.value, radiology_dir=_RADIOLOGY.value,
      tabular=_tabular_spec(), feature_ext=tuple(_FEATURE_EXT.value),
      expected_dim=_FEATURE_DIM.value, allow_missing=tuple(_ALLOW_MISSING.value),
      progress=True)
  print(cohort.summary(), flush=True)
  return str(build_tfds_cohort(cohort, _DATA_DIR.value, name=_NAME.value,
                               overwrite=_OVERWRITE.value))


def main(argv) -> int:
  if len(argv) > 1:
    print(f"survjax.data.prepare: unexpected arguments {argv[1:]}", file=sys.stderr)
    return 2
  missing = [f"--{f.name}" for f in (_CLINICAL, _DATA_DIR, _NAME) if not f.value]
  if missing:
    print(f"survjax.data.prepare: {', '.join(missing)} required", file=sys.stderr)
    return 2
  from survjax.errors import InputError
  logging.set_verbosity(logging.ERROR)  # tfds' "custom data configuration" warning.
  try:
    path = prepare()
  except InputError as e:
    print(f"survjax: bad input: {e}", file=sys.stderr)
    return 2
  print(f"wrote {path}", flush=True)
  return 0


def _parse_flags(argv):
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    print(f"survjax.data.prepare: bad command line: {str(e).strip().splitlines()[0]}",
          file=sys.stderr)
    sys.exit(2)


def run():
  app.run(lambda argv: sys.exit(main(argv)), flags_parser=_parse_flags)


if __name__ == "__main__":
  run()
