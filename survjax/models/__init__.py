"""Method registry: ``config.method`` names a module whose ``make(config)`` returns the
method object (see `survjax.method.Method`).

``config.method = "must"`` imports ``survjax.models.must``; any other importable module
name (``"my_method"``, ``"mypackage.my_method"``) is imported as it is, so a method can
live outside survjax with no edit here. The unimodal baselines share one module
(`ALIASES`).
"""

from __future__ import annotations

import importlib
import pkgutil

from survjax.errors import InputError

ALIASES = {"abmil": "baselines", "transmil": "baselines", "snn": "baselines", "mlp": "baselines"}


def available() -> list[str]:
  """Method names ``config.method`` accepts (besides dotted module paths)."""
  names = {m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_")}
  return sorted((names - set(ALIASES.values())) | set(ALIASES))


def get_method(config):
  name = config.method
  candidates = [f"survjax.models.{ALIASES.get(name, name)}"] if "." not in name else []
  for module_name in candidates + [name]:
    try:
      module = importlib.import_module(module_name)
      break
    except ModuleNotFoundError as e:
      if e.name is None or not module_name.startswith(e.name):
        raise  # the method's own module failed to import something: not the user's input
  else:
    raise InputError(f"unknown method {name!r}, expected one of {', '.join(available())} "
                     "or an importable module with make(config)", path="config.method")
  if not hasattr(module, "make"):
    raise InputError(f"module {module_name} has no make(config)", path="config.method")
  return module.make(config)
