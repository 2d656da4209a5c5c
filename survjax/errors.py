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
