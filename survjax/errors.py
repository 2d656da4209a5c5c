"""The one error type that bad input raises.

Every problem a user can fix (a missing file, a wrong feature dimension, NaN in a bag,
a negative time, a fold with no events, an unknown config key) raises `InputError` with a
single line naming the file, the patient and what was expected. `survjax.main` turns it
into that line on stderr and exit status 2; nothing is written before input is validated,
and everything written after goes through `survjax.io.atomic_write*`.
"""


class InputError(ValueError):
  """User-fixable bad input. The message is one line: where, who, what was expected."""

  def __init__(self, message: str, *, path=None, case_id=None):
    parts = []
    if path is not None:
      parts.append(str(path))
    if case_id is not None:
      parts.append(f"case {case_id}")
    parts.append(message)
    super().__init__(": ".join(parts).replace("\n", " "))
    self.path = path
    self.case_id = case_id


def check_count(value, path: str, low: int, what: str, hint: str = "") -> None:
  """An `InputError` at ``path`` unless ``value`` is an integer (not a bool) ``>= low``;
  ``what`` names it ("a batch size"), ``hint`` is added in parentheses."""
  if isinstance(value, bool) or not isinstance(value, int) or value < low:
    raise InputError(f"{value!r} is not {what}, expected an integer >= {low}"
                     + (f" ({hint})" if hint else ""), path=path)
