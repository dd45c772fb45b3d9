"""The one exception type for mistakes a user can fix.

Command-line mains catch `UserError` and print its message as a single line
(no traceback) before exiting with status 2. The message names the problem and
the fix, e.g. "unknown dataset 'cifar'; choose one of: digits, hdf5:<path>, ...".
"""


class UserError(ValueError):
  """A problem with the user's input (flags, files, data), not a bug."""


def choices_error(kind: str, name: str, choices) -> UserError:
  """Returns the standard error for an unknown registry name."""
  return UserError(
      f"unknown {kind} {name!r}; choose one of: {', '.join(sorted(choices))}")
