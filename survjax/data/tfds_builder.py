"""Pack a `Cohort` once into a tensorflow-datasets build (array_record), read it without TF.

Building and reading need ``tensorflow-datasets`` and ``array_record`` only, never
TensorFlow: the builder writes ``array_record`` files and `load_tfds_cohort` reads them
through tfds' random-access data source (``builder.as_data_source``, what
``tfds.data_source`` does), using the ``features.json`` stored with the data, so the
reader does not even need this module's builder class.

On disk (``<data_dir>/survjax_cohort/<name>/1.0.0/``)::

  survjax_cohort-patients.array_record-00000-of-0000N   one example per patient, in order
  features.json  dataset_info.json                      tfds' own metadata
  metadata.json                                         survjax's: modality names/kinds/groups

One example per patient, split ``"patients"`` (cross-validation splits are made later,
from the cohort): ``index`` (row in the cohort), ``case_id``, ``time`` (float64),
``event`` (bool), and per modality ``m<k>`` (k = position in the cohort's modality
order) ``available`` plus ``bag`` (float16 ``[N_i, D]``; ``[0, D]`` when missing) or
``values`` (the row of a tokens/vector/patches block, in its own dtype); optional
``true_risk/r<j>`` oracle risks. Every numeric feature is stored as raw bytes
(``Encoding.BYTES``): tfds' default encoding would round float64 to float32 and widen
bools and ints; raw bytes make the round trip bit-identical. One example must stay under
protobuf's 2 GiB (a bag of 1M x 1024 float16 values is exactly that).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds

from survjax.data.cohort import Cohort, Modality
from survjax.errors import InputError

BUILDER_NAME = "survjax_cohort"
SPLIT = "patients"
VERSION = "1.0.0"
FORMAT = "survjax-cohort/1"
_NAME_RE = re.compile(r"^[A-Za-z0-9_.+-]+$")
_BYTES = tfds.features.Encoding.BYTES


def _tensor(shape, dtype) -> tfds.features.Tensor:
  return tfds.features.Tensor(shape=tuple(shape), dtype=np.dtype(dtype), encoding=_BYTES)


def cohort_metadata(cohort: Cohort) -> dict:
  """The JSON description of a cohort that the features alone do not carry."""
  mods = []
  for name, mod in cohort.modalities.items():
    entry = {"name": name, "kind": mod.kind, "columns": list(mod.columns),
             "groups": [[g, [int(i) for i in idx]] for g, idx in mod.groups]}
    if mod.kind == "bag":
      entry["dim"] = mod.dim
    else:
      entry["dtype"] = np.dtype(mod.values.dtype).str
      entry["shape"] = list(mod.values.shape[1:])
    mods.append(entry)
  risks = [] if cohort.true_risk is None else [
      {"name": k, "dtype": np.asarray(v).dtype.str} for k, v in cohort.true_risk.items()]
  return {"format": FORMAT, "name": cohort.name, "n_patients": len(cohort),
          "modalities": mods, "true_risk": risks}


def cohort_features(meta: dict) -> tfds.features.FeaturesDict:
  """The tfds features of one patient, from `cohort_metadata`."""
  feats = {"index": _tensor((), np.int64), "case_id": tfds.features.Text(),
           "time": _tensor((), np.float64), "event": _tensor((), np.bool_)}
  for k, mod in enumerate(meta["modalities"]):
    entry = {"available": _tensor((), np.bool_)}
    if mod["kind"] == "bag":
      entry["bag"] = _tensor((None, mod["dim"]), np.float16)
    else:
      entry["values"] = _tensor(mod["shape"], mod["dtype"])
    feats[f"m{k}"] = tfds.features.FeaturesDict(entry)
  if meta["true_risk"]:
    feats["true_risk"] = tfds.features.FeaturesDict(
        {f"r{j}": _tensor((), r["dtype"]) for j, r in enumerate(meta["true_risk"])})
  return tfds.features.FeaturesDict(feats)


def patient_example(cohort: Cohort, i: int) -> dict:
  """Patient ``i`` of ``cohort`` as a tfds example (see the module docstring)."""
  ex = {"index": np.int64(i), "case_id": str(cohort.case_ids[i]),
        "time": np.float64(cohort.time[i]), "event": np.bool_(cohort.event[i])}
  for k, mod in enumerate(cohort.modalities.values()):
    entry = {"available": np.bool_(mod.available[i])}
    if mod.kind == "bag":
      entry["bag"] = np.asarray(mod.bags[i], dtype=np.float16).reshape(-1, mod.dim)
    else:
      entry["values"] = np.asarray(mod.values[i])
    ex[f"m{k}"] = entry
  if cohort.true_risk:
    ex["true_risk"] = {f"r{j}": np.asarray(v)[i] for j, v in
                       enumerate(cohort.true_risk.values())}
  return ex


class SurvjaxCohort(tfds.core.GeneratorBasedBuilder):
  """tfds builder that packs one in-memory `Cohort` into ``array_record`` files.

  The cohort travels as a constructor argument; the builder config is named after the
  dataset (``survjax_cohort/<name>``), so many cohorts live side by side in one
  ``data_dir``. Usage (or simply `build_tfds_cohort`)::

    builder = SurvjaxCohort(cohort=cohort, config="tcga_brca", data_dir="data",
                            file_format="array_record")
    builder.download_and_prepare()

  Reading never needs this class: see `load_tfds_cohort`.
  """

  VERSION = tfds.core.Version(VERSION)
  RELEASE_NOTES = {str(VERSION): "One example per patient: every modality, availability, "
                                 "time, event, case id; numeric features as raw bytes."}
  # tfds locates a builder's checksums file through `code_path`, which for a class in an
  # installed package imports `importlib_resources`, a module tfds 4.9.x does not declare
  # on Python >= 3.9 (tensorflow/datasets#11212). Nothing is downloaded here, so no
  # checksums file is needed: shadow the class property.
  code_path = None

  def __init__(self, *, cohort: Cohort, config: str | None = None, **kwargs):
    name = config or cohort.name
    check_dataset_name(name)
    self._cohort = cohort
    self._meta = cohort_metadata(cohort)
    config = tfds.core.BuilderConfig(name=name, version=VERSION, tags=[],
                                     description=f"survjax cohort {cohort.name!r}")
    super().__init__(config=config, **kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=f"survjax cohort {self._cohort.name!r}: {len(self._cohort)} patients, "
                    f"modalities {list(self._cohort.modalities)}.",
        features=cohort_features(self._meta),
        metadata=tfds.core.MetadataDict(survjax=self._meta),
        disable_shuffling=True,
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download: the cohort is already in memory.
    return {SPLIT: self._generate_examples()}

  def _generate_examples(self):
    for i in range(len(self._cohort)):
      yield i, patient_example(self._cohort, i)


def check_dataset_name(name: str) -> None:
  """Raises `InputError` unless ``name`` is a valid tfds config name."""
  if not _NAME_RE.match(name or ""):
    raise InputError(f"dataset name {name!r}, expected letters, digits and _ . + - only",
                     path="name")


def dataset_dir(data_dir, name: str) -> Path:
  """Where `build_tfds_cohort` puts cohort ``name``: ``<data_dir>/survjax_cohort/<name>/1.0.0``."""
  return Path(data_dir) / BUILDER_NAME / name / VERSION


def build_tfds_cohort(cohort: Cohort, data_dir, *, name: str | None = None,
                      overwrite: bool = False) -> Path:
  """Validates ``cohort`` and packs it under ``data_dir``; returns the dataset directory.

  The build goes to a temporary directory inside ``data_dir`` and is moved into place
  only when complete, so an interrupted build leaves nothing half-written (tfds' scratch
  ``downloads/`` folder goes with it). tfds shows progress bars while generating.

  Args:
    cohort: the cohort to pack.
    data_dir: the tfds data directory.
    name: dataset (config) name; default ``cohort.name``.
    overwrite: replace an existing build of the same name.

  Raises:
    InputError: invalid cohort or name, or an existing build without ``overwrite``.
  """
  name = name or cohort.name
  check_dataset_name(name)
  cohort.validate(source=f"cohort {cohort.name}")
  final = dataset_dir(data_dir, name)
  if final.exists() and not overwrite:
    raise InputError("dataset already exists, expected a new name or overwrite=True "
                     "(--overwrite)", path=final)
  Path(data_dir).mkdir(parents=True, exist_ok=True)
  scratch = Path(tempfile.mkdtemp(prefix=".build-", dir=data_dir))
  try:
    builder = SurvjaxCohort(cohort=cohort, config=name, data_dir=scratch,
                            file_format="array_record")
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
        try_download_gcs=False))
    final.parent.mkdir(parents=True, exist_ok=True)
    _swap_into_place(scratch / BUILDER_NAME / name / VERSION, final)
  finally:
    shutil.rmtree(scratch, ignore_errors=True)
  return final


def _swap_into_place(built: Path, final: Path) -> None:
  """Moves ``built`` to ``final``, replacing an old build only after the new one is there."""
  old = None
  if final.exists():
    old = final.with_name(f".{final.name}.old-{os.getpid()}")
    os.replace(final, old)
  os.replace(built, final)
  if old is not None:
    shutil.rmtree(old, ignore_errors=True)


def load_tfds_cohort(data_dir, name: str) -> Cohort:
  """Reads a cohort packed by `build_tfds_cohort` (random access, no TensorFlow).

  Args:
    data_dir: the tfds data directory.
    name: the dataset (config) name.

  Returns:
    A `Cohort` equal to the packed one: same order, case ids, times, events,
    availability, bit-identical arrays, groups, columns and oracle risks.

  Raises:
    InputError: no such build, or a build that is not a survjax cohort.
  """
  check_dataset_name(name)
  path = dataset_dir(data_dir, name)
  if not (path / "dataset_info.json").is_file():
    raise InputError(f"no tfds build of cohort {name!r}, expected {path}/dataset_info.json "
                     "(build it with python -m survjax.data.prepare)", path=data_dir)
  with _unreadable_as_input_error(path):
    builder = tfds.builder_from_directory(str(path))
    meta = dict(builder.info.metadata or {}).get("survjax")
  if not meta or meta.get("format") != FORMAT:
    raise InputError(f"metadata.json has no {FORMAT!r} entry, expected a survjax cohort build",
                     path=path)
  with _unreadable_as_input_error(path):
    source = builder.as_data_source(split=SPLIT)
    n = len(source)
    if n != meta["n_patients"]:
      raise InputError(f"{n} examples, expected {meta['n_patients']} patients", path=path)
    examples = [source[i] for i in range(n)]
  order = np.argsort([int(ex["index"]) for ex in examples], kind="stable")
  examples = [examples[i] for i in order]
  return _cohort_from_examples(meta, examples)


@contextlib.contextmanager
def _unreadable_as_input_error(path: Path):
  """A build tfds cannot read (a truncated or damaged ``array_record`` file, a broken
  ``dataset_info.json`` or ``features.json``) as one `InputError` naming the folder;
  the readers raise RuntimeError, ValueError, protobuf and JSON errors for these."""
  try:
    yield
  except InputError:
    raise
  except Exception as e:
    first = (str(e).strip().splitlines() or [""])[0][:200]
    raise InputError(f"cannot read this tfds build ({type(e).__name__}: {first}), expected "
                     "the files python -m survjax.data.prepare writes (rebuild it with "
                     "--overwrite)", path=path) from e


def _cohort_from_examples(meta: dict, examples: list[dict]) -> Cohort:
  modalities = {}
  for k, spec in enumerate(meta["modalities"]):
    parts = [ex[f"m{k}"] for ex in examples]
    available = np.array([bool(p["available"]) for p in parts], dtype=bool)
    groups = tuple((g, tuple(idx)) for g, idx in spec["groups"])
    if spec["kind"] == "bag":
      mod = Modality(kind="bag", available=available, bags=[
          np.asarray(p["bag"], np.float16).reshape(-1, spec["dim"]) for p in parts])
    else:
      values = np.stack([np.asarray(p["values"]) for p in parts]).astype(
          np.dtype(spec["dtype"]), copy=False)
      mod = Modality(kind=spec["kind"], available=available, values=values, groups=groups)
    mod.groups, mod.columns = groups, tuple(spec["columns"])
    modalities[spec["name"]] = mod
  true_risk = None
  if meta["true_risk"]:
    true_risk = {r["name"]: np.array([ex["true_risk"][f"r{j}"] for ex in examples],
                                     dtype=np.dtype(r["dtype"]))
                 for j, r in enumerate(meta["true_risk"])}
  case_ids = [ex["case_id"] for ex in examples]
  case_ids = [c.decode("utf-8") if isinstance(c, bytes) else str(c) for c in case_ids]
  return Cohort(name=meta["name"], case_ids=np.array(case_ids, dtype=str),
                time=np.array([ex["time"] for ex in examples], dtype=np.float64),
                event=np.array([bool(ex["event"]) for ex in examples], dtype=bool),
                modalities=modalities, true_risk=true_risk)
