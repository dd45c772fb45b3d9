"""What every tfcapacity command-line main shares: one-line errors.

A user's mistake ends a command with one line on stderr, `<prog>: error:
<what is wrong and how to fix it>`, and exit status 2; never a traceback.
TensorFlow's native libraries write a few lines to stderr when they load and
when devices are first listed, whatever TF_CPP_MIN_LOG_LEVEL says (TF 2.21),
so mains load TensorFlow inside `quiet_native_stderr()`.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from typing import Callable, Iterator, NoReturn

from absl import flags

from tfcapacity.errors import UserError


def fail(prog: str, message: str, status: int = 2) -> NoReturn:
  print(f"{prog}: error: {message}", file=sys.stderr)
  sys.exit(status)


def flags_parser(prog: str, fv: flags.FlagValues = flags.FLAGS,
                 rewrite: Callable[[list[str]], list[str]] | None = None):
  """absl's parser for `app.run`, but a bad flag is one line and status 2.

  It also makes --help list tfcapacity's flags when the program is a console
  script: absl lists the flags of the module named by sys.argv[0], which for
  `tfcapacity-confusion` is the script, not the modules defining them.
  """
  def parse(argv):
    main = argv[0] if argv else sys.argv[0]
    for module, module_flags in fv.flags_by_module_dict().items():
      if module.startswith("tfcapacity.") and module != main:
        for flag in module_flags:
          fv.register_key_flag_for_module(main, flag)
    try:
      return fv(rewrite(argv) if rewrite else argv)
    except flags.Error as e:
      fail(prog, f"{e}; see --helpfull")
  return parse


def no_arguments(prog: str, argv: list[str]) -> None:
  if len(argv) > 1:
    fail(prog, f"unexpected arguments {argv[1:]}; all options are --flags")


@contextlib.contextmanager
def quiet_native_stderr() -> Iterator[None]:
  """Silences file descriptor 2 (native libraries' logging) for a block.

  What was written is replayed if the block raises anything but SystemExit
  or UserError (one line by design), so a real failure keeps its context.
  """
  sys.stderr.flush()
  saved = os.dup(2)
  with tempfile.TemporaryFile() as captured:
    os.dup2(captured.fileno(), 2)
    try:
      yield
    except (SystemExit, UserError):
      raise
    except BaseException:
      sys.stderr.flush()
      os.dup2(saved, 2)
      captured.seek(0)
      sys.stderr.write(captured.read().decode(errors="replace"))
      raise
    finally:
      sys.stderr.flush()
      os.dup2(saved, 2)
      os.close(saved)
