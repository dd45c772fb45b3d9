"""The one exception type for mistakes a user can fix.

Command-line mains catch `UserError` and print its message as a single line
(no traceback) before exiting with status 2. The message names the problem and
the fix, e.g. "unknown dataset 'cifar'; choose one of: digits, hdf5:<path>,
...".

A UserError raised where TensorFlow runs Python code for us (the generator of
`tf.data.Dataset.from_generator`, `tf.py_function`) does not reach the caller
as itself: TensorFlow raises a `tf.errors.OpError` whose message holds the
Python exception as text. `user_error_from` recovers the UserError from such
an error, so mains catch both with one clause:

    except Exception as e:  # pylint: disable=broad-except
      user = errors.user_error_from(e)
      if user is None:
        raise
      cli.fail(PROG, str(user))

This module imports nothing from TensorFlow (or anything else), so that any
layer may import it.
"""

from __future__ import annotations

import re


class UserError(ValueError):
  """A problem with the user's input (flags, files, data), not a bug."""


def choices_error(kind: str, name: str, choices) -> UserError:
  """Returns the standard error for an unknown registry name."""
  return UserError(
      f"unknown {kind} {name!r}; choose one of: {', '.join(sorted(choices))}")


def first_line(e: BaseException) -> str:
  """The first line of an exception's message (its type if empty)."""
  text = str(e).strip()
  return text.splitlines()[0] if text else type(e).__name__


# "UserError: <message>" as TensorFlow writes a Python exception raised in a
# py_func: "<type name>: <message>" at the start of a line, after the op name
# ("{{function_node ...}} UserError: ...") or a status ("INVALID_ARGUMENT:
# UserError: ..."), and as the qualified last line of the traceback
# ("tfcapacity.errors.UserError: ...").
_USER_ERROR_LINE = re.compile(r"(?:^|(?<=[\s.}]))UserError: ([^\n]*)", re.M)
# Python's words between a chained exception and the one raised after it:
# a UserError line followed by these is a cause or context, not the error
# that ended the generator.
_CHAINED = ("The above exception was the direct cause of the following "
            "exception", "During handling of the above exception, another "
            "exception occurred")
# What TensorFlow may append to a one-line message.
_TF_SUFFIX = re.compile(r"\s*\[Op:[^\]]*\](?: name: .*)?$")


def user_error_from(exc: BaseException) -> UserError | None:
  """The UserError behind `exc`, or None if `exc` is not a user's mistake.

  Returns `exc` itself if it is a UserError. Otherwise looks in its message
  for a UserError that TensorFlow turned into text: a generator of
  `tf.data.Dataset.from_generator` (or a `tf.py_function`) that raises
  `UserError("msg")` makes iteration, eager or inside a `tf.function`, on
  one device or under a distribution strategy, raise a `tf.errors.OpError`
  whose message contains a line "UserError: msg" and the generator's
  traceback. The result is then a new UserError with the one-line message
  "msg" and `exc` as its `__cause__`.

  A UserError in the text counts only if it is the exception that ended the
  Python code: one followed by "During handling of the above exception,
  another exception occurred" (a bug in an except clause) is not returned,
  so real failures keep their traceback. The match is on the class name
  `UserError`: subclasses raised inside TensorFlow are not recognised.
  `__cause__` and `__context__` of `exc` are not followed: an exception
  deliberately raised from a UserError is not a UserError.

  Args:
    exc: any exception, typically caught around a training or analysis run.

  Returns:
    A UserError whose `str()` is one line, or None.
  """
  if isinstance(exc, UserError):
    return exc
  try:
    text = getattr(exc, "message", None)
    if not isinstance(text, str):
      text = str(exc)
  except Exception:  # pylint: disable=broad-except  # A broken __str__.
    return None
  if "UserError: " not in text:
    return None
  matches = list(_USER_ERROR_LINE.finditer(text))
  for match, after in zip(matches, matches[1:] + [None]):
    rest = text[match.end():after.start() if after else len(text)]
    if any(words in rest for words in _CHAINED):
      continue
    message = _TF_SUFFIX.sub("", match.group(1)).strip()
    if message:
      error = UserError(message)
      error.__cause__ = exc
      return error
  return None
