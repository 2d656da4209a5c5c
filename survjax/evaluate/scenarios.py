"""Missing-modality scenarios: which modalities each test patient keeps.

Names (the `results.json` contract):

* ``full``: every modality of the method.
* ``missing_<name>``: ``<name>`` withheld from every test patient (``missing_pathology``,
  ``missing_genomics``, ``missing_radiology``, ...).
* ``missing_<p>pct_mixed``: each test patient independently loses one randomly chosen
  modality with probability ``p``/100 (seeded; the same patients lose the same
  modality for every method).

"auto" expands to ``full`` plus ``missing_<m>`` for every modality of a method with two
or more modalities.
"""

from __future__ import annotations

import re

import numpy as np

from survjax.errors import InputError

_MIXED = re.compile(r"^missing_(\d+)pct_mixed$")


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
    hidden_for(name, modalities, 1, 0)  # validates the name
  return list(dict.fromkeys(out))


def hidden_for(name: str, modalities, n: int, seed: int) -> list[frozenset]:
  """Per patient, the set of modalities the scenario withholds."""
  if name == "full":
    return [frozenset()] * n
  mixed = _MIXED.match(name)
  if mixed:
    p = int(mixed.group(1)) / 100.0
    rng = np.random.default_rng([seed, int(mixed.group(1)), 7919])
    lose = rng.uniform(size=n) < p
    which = rng.integers(0, len(modalities), size=n)
    return [frozenset({modalities[w]}) if l else frozenset() for l, w in zip(lose, which)]
  if name.startswith("missing_") and name[len("missing_"):] in modalities:
    return [frozenset({name[len("missing_"):]})] * n
  raise InputError(f"unknown scenario {name!r}, expected 'full', 'auto', "
                   f"'missing_<modality>' with a modality in {list(modalities)}, or "
                   "'missing_<p>pct_mixed'", path="config.eval.scenarios")


def oracle_risk(true_risk: dict | None, hidden: list[frozenset], idx) -> np.ndarray | None:
  """The known true risk for each patient's pattern of withheld modalities, if any."""
  if not true_risk:
    return None
  out = np.empty(len(idx))
  for j, (i, h) in enumerate(zip(idx, hidden)):
    key = "full" if not h else "missing_" + "_".join(sorted(h))
    if key not in true_risk:
      return None
    out[j] = true_risk[key][i]
  return out
