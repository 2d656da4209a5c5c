"""Method registry: ``config.method`` -> a method object (see `survjax.method.Method`)."""

from __future__ import annotations

from survjax.errors import InputError


def get_method(config):
  name = config.method
  if name == "must":
    from survjax.models.must import MUST
    return MUST(config.model, config.train)
  if name in ("abmil", "transmil", "snn", "mlp"):
    from survjax.models import baselines
    return baselines.make(name, config)
  raise InputError(f"unknown method {name!r}, expected one of must, abmil, transmil, snn, mlp",
                   path="config.method")
