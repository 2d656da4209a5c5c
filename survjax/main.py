"""survjax command line: ``python -m survjax.main --config=configs/must.py``.

Flags map onto one library call (`survjax.evaluate.cv.run_cv`):

* ``--config=configs/<x>.py[:variant]`` an ml_collections config file (locked: an unknown
  key such as ``--config.train.epoch=3`` is an error), with ``--config.a.b=v`` overrides;
* ``--workdir`` output directory (default ``runs/<method>``);
* ``--mode`` ``cv`` (train + evaluate every fold, the default), ``train``, ``eval``,
  ``predict`` (use the trained run in ``--workdir`` on a new cohort: `survjax.predict`);
* ``--predict.data=<config.py>[:variant]`` (that config's ``data`` section) or
  ``--predict.clinical_csv=... --predict.features_dir=... [--predict.signatures_csv=...]``
  (the training ``data`` section with these files) names the new cohort;
  ``--predict.out`` (default ``<workdir>/predictions/<cohort>``), ``--predict.attention``
  (MIL attention per slide), ``--predict.bootstrap`` (resamples for the intervals);
* ``--restart`` moves an existing run in the workdir aside and starts afresh (a run
  directory refuses a resume under a different training configuration);
* ``--distributed`` calls ``jax.distributed.initialize()`` first (pods, SLURM);
* ``--verbosity=1`` also shows JAX's INFO lines at start-up (hidden by default).

Exit status: 0 done; 2 bad input (one line on stderr naming file, patient and what was
expected); 3 training diverged.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

warnings.filterwarnings("ignore", category=DeprecationWarning, module="jaxopt")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_BAD_FLAG = (flags.Error, KeyError, AttributeError, ValueError, TypeError, OSError,
             SyntaxError, ImportError)


def _bad_command_line(e: Exception):
  # A config file that raises comes back as absl's first line plus a traceback whose
  # last line holds the reason ("ValueError: unknown variant ..."): keep both.
  lines = [line.strip() for line in str(e).splitlines() if line.strip()]
  msg = " ".join(dict.fromkeys([lines[0], lines[-1]])) if lines else type(e).__name__
  print(f"survjax: bad command line or config: {msg}", file=sys.stderr)
  sys.exit(2)


_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory (default runs/<method>).")
_MODE = flags.DEFINE_enum("mode", "cv", ["cv", "train", "eval", "predict", "tune"],
                          "What to run.")


def _predict_defaults():
  import ml_collections
  return ml_collections.ConfigDict(dict(
      data="", clinical_csv="", features_dir="", signatures_csv="", radiology_dir="",
      name="", out="", attention=False, bootstrap=200))


try:   # the overrides on the command line (--predict.<field>) are checked here
  _PREDICT = config_flags.DEFINE_config_dict("predict", _predict_defaults(),
                                             "--mode=predict: the new cohort and outputs.",
                                             lock_config=True)
except (KeyError, AttributeError) as e:
  reason = str(e).strip("'\"").replace("\\n", " ").replace("\\'", "'")
  _bad_command_line(ValueError(f"unknown --predict field {reason}"))
_RESTART = flags.DEFINE_bool("restart", False, "Move an existing run in --workdir aside "
                             "(<workdir>.old-<time>) and start afresh.")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize().")
_COORDINATOR = flags.DEFINE_string("coordinator", None, "host:port of process 0 (multi-host "
                                   "without auto-detection).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")


def _parse_flags(argv):
  try:
    argv = flags.FLAGS(argv)
    for flag in (_CONFIG, _PREDICT):   # a config file's load failure surfaces on first use
      if flag.value is not None:
        flag.value.keys()
    return argv
  except _BAD_FLAG as e:
    _bad_command_line(e)


def main(argv):
  if len(argv) > 1:
    print(f"survjax: bad command line: unexpected argument {argv[1]!r}, expected --flags only",
          file=sys.stderr)
    return 2
  import jax
  from survjax.errors import InputError
  from survjax.train.trainer import TrainingDiverged

  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
  logging.getLogger("absl").setLevel(logging.WARNING)
  if flags.FLAGS.verbosity < 1:
    # Quiet start: JAX's INFO lines (backends it could not initialise: tpu, proxy, ...)
    # only with --verbosity=1 (or -v 1); survjax's own progress lines stay.
    logging.getLogger("jax").setLevel(logging.WARNING)
  config = _CONFIG.value
  if config is None:
    print("survjax: --config is required, e.g. --config=configs/must.py", file=sys.stderr)
    return 2
  try:
    if _DISTRIBUTED.value:
      from survjax.train.sharding import initialize_distributed
      initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    # Persistent XLA compilation cache (a second run of a config skips compiling); off
    # with compilation_cache_dir "" or "none". results.json's config names the directory.
    cache_dir = str(config.get("compilation_cache_dir") or "").strip()
    if cache_dir.lower() in ("", "none"):
      cache_dir = ""
    else:
      cache_dir = os.path.abspath(os.path.expanduser(cache_dir))
      try:
        os.makedirs(cache_dir, exist_ok=True)
        jax.config.update("jax_compilation_cache_dir", cache_dir)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
      except OSError as e:
        print(f"survjax: compilation cache off, cannot create {cache_dir}: {e}",
              file=sys.stderr)
        cache_dir = ""
    if "compilation_cache_dir" in config:
      config.compilation_cache_dir = cache_dir
    from survjax.data import load_cohort
    from survjax.evaluate.cv import run_cv
    from survjax.models import get_method

    if _MODE.value == "predict":
      return _predict(config)
    method = get_method(config)
    cohort = load_cohort(config.data)
    if jax.process_index() == 0:
      from survjax.data.formats import imputation_summary
      print("\n".join(filter(None, [cohort.summary(), imputation_summary(cohort)])),
            flush=True)
    workdir = _WORKDIR.value or os.path.join("runs", config.method)
    results = run_cv(method, cohort, config, workdir, mode=_MODE.value, restart=_RESTART.value)
    if _MODE.value == "tune" and jax.process_index() == 0:
      for point in results["points"]:
        print(f"{point['overrides']}: validation C-index {point['val_c_index_mean']:.4f}")
      print(f"chosen: {results['cv_flags']}\nwrote {os.path.join(workdir, 'tune.json')}")
    elif results and jax.process_index() == 0:
      for name, v in results["scenarios"].items():
        oracle = f" (oracle {v['oracle_c_index']:.3f})" if "oracle_c_index" in v else ""
        print(f"{name:32s} C-index {v['c_index_mean']:.3f} ± {v['c_index_std']:.3f}{oracle}")
      print(f"wrote {os.path.join(workdir, 'results.json')} and report.md")
  except InputError as e:
    print(f"survjax: bad input: {e}", file=sys.stderr)
    return 2
  except TrainingDiverged as e:
    print(f"survjax: training diverged: {e}", file=sys.stderr)
    return 3
  return 0


def _predict(config):
  from survjax.predict import data_section, predict_run
  p = _PREDICT.value
  workdir = _WORKDIR.value or os.path.join("runs", config.method)
  res = predict_run(config, workdir, data_section(config, p), out_dir=p.out or None,
                    attention=p.attention, bootstrap=p.bootstrap)
  print(f"predicted {res['n_patients']} patients of {res['cohort']} with folds "
        f"{res['folds']} of {workdir}")
  ev = res.get("external_validation")
  if ev:
    m, ci = ev["metrics"], ev["bootstrap_ci95"]
    for key, label in (("c_index", "C-index (Harrell)"), ("uno_c", "C-index (Uno)"),
                       ("td_auc_mean", "td-AUC (mean)"), ("ibs", "integrated Brier")):
      if key in m:
        interval = f" [{ci[key][0]:.3f}, {ci[key][1]:.3f}]" if key in ci else ""
        print(f"{label:20s} {m[key]:.3f}{interval}")
    p_value = ev["logrank_p"]
    print(f"log-rank p (training cut-off) {p_value:.3g}" if p_value is not None
          else "log-rank p (training cut-off) n/a")
  print(f"wrote {os.path.join(res['out_dir'], 'predictions.csv')} and predictions.json"
        + (", report.md, km_external.png" if ev else ""))
  return 0


def run():
  app.run(lambda argv: sys.exit(main(argv)), flags_parser=_parse_flags)


if __name__ == "__main__":
  run()
