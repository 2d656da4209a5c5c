"""Missing-modality scenarios: which modalities each test patient keeps.

Names (the `results.json` contract):

* ``full``: every modality of the method.
* ``missing_<name>``: ``<name>`` withheld from every test patient (``missing_pathology``,
  ``missing_genomics``, ``missing_radiology``, ...).
* ``missing_<p>pct_<name>``: each test patient independently loses ``<name>`` with
  probability ``p``/100.
* ``missing_<p>pct_mixed``: each test patient independently loses one modality, chosen
  uniformly among the method's, with probability ``p``/100.

The ratio families are drawn per patient from its case id and the split seed (not the
fold or the method), so every method loses the same modality of the same patients: their
rows are paired. "auto" expands to ``full`` plus ``missing_<m>`` for every modality of a
method with two or more modalities.
"""

from __future__ import annotations

import hashlib
import re

import numpy as np

from survjax.errors import InputError

_RATIO = re.compile(r"^missing_(\d+)pct_(\w+)$")


def expand(names, modalities) -> list[str]:
  out = []
  for name in names:
    if name == "auto":
      out.append("full")
      if len(modalities) > 1:
        out += [f"missing_{m}" for m in modalities]
    elif name not in out:
      out.append(name)
  for name in out:
    hidden_for(name, modalities, ["check"], 0)  # validates the name
  return list(dict.fromkeys(out))


def _uniforms(case_ids, seed: int, tag: str, draws: int) -> np.ndarray:
  """``[n, draws]`` uniforms in [0, 1), a function of (case id, seed, tag) only."""
  out = np.empty((len(case_ids), draws))
  for i, cid in enumerate(case_ids):
    digest = hashlib.sha256(f"{seed}|{tag}|{cid}".encode()).digest()
    out[i] = np.frombuffer(digest[:8 * draws], dtype="<u8") / 2.0**64
  return out


def hidden_for(name: str, modalities, case_ids, seed: int) -> list[frozenset]:
  """Per patient of ``case_ids``, the set of modalities the scenario withholds."""
  n = len(case_ids)
  modalities = tuple(modalities)
  if name == "full":
    return [frozenset()] * n
  ratio = _RATIO.match(name)
  if ratio and (ratio.group(2) == "mixed" or ratio.group(2) in modalities):
    p = int(ratio.group(1)) / 100.0
    which = ratio.group(2)
    if p > 1 or (which == "mixed" and len(modalities) < 2):
      raise InputError(f"scenario {name!r} is out of range, expected p <= 100 and, for "
                       "'mixed', a method with two or more modalities",
                       path="config.eval.scenarios")
    u = _uniforms(case_ids, seed, f"{p}|{which}", 2)
    lose = u[:, 0] < p
    if which == "mixed":
      pick = np.minimum((u[:, 1] * len(modalities)).astype(int), len(modalities) - 1)
      return [frozenset({modalities[w]}) if l else frozenset() for l, w in zip(lose, pick)]
    return [frozenset({which}) if l else frozenset() for l in lose]
  if name.startswith("missing_") and name[len("missing_"):] in modalities:
    return [frozenset({name[len("missing_"):]})] * n
  raise InputError(f"unknown scenario {name!r}, expected 'full', 'auto', "
                   f"'missing_<modality>' with a modality in {list(modalities)}, "
                   "'missing_<p>pct_<modality>' or 'missing_<p>pct_mixed'",
                   path="config.eval.scenarios")


def revealed_key(revealed) -> str:
  """`Cohort.true_risk` key of the oracle given the modalities ``revealed``."""
  return "+".join(sorted(revealed))


def oracle_risk(true_risk: dict | None, modalities, hidden: list[frozenset], idx,
                cohort_modalities=(), constant_fill: bool = False) -> np.ndarray | None:
  """The known true risk given what each patient's scenario reveals, if the data has one.

  ``true_risk`` is keyed by the revealed modalities (`revealed_key`); older cohorts
  (tfds builds) keyed ``full`` / ``missing_<m>`` relative to ``cohort_modalities`` are
  read too. ``constant_fill``: the oracle with each withheld modality's specific factors
  at their mean (keys ``const:<revealed>``), the best any constant fill can do. None where
  any needed key is absent.
  """
  if not true_risk:
    return None
  out = np.empty(len(idx))
  for j, (i, h) in enumerate(zip(idx, hidden)):
    revealed = set(modalities) - set(h)
    key = ("const:" if constant_fill else "") + revealed_key(revealed)
    if constant_fill and key not in true_risk:
      return None
    if key not in true_risk:
      withheld = set(cohort_modalities) - revealed
      key = "full" if not withheld else "missing_" + "_".join(sorted(withheld))
    if key not in true_risk:
      return None
    out[j] = true_risk[key][i]
  return out
