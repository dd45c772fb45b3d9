"""Converts the LSVRC-2010 SBOW features into an HDF5 file for `hdf5:<path>`.

  python tools/convert_sbow.py --sbow_dir=sbow/train --devkit_dir=devkit-1.0 \
      --split=train --output=data/sbow/sbow_train.h5
  python tools/convert_sbow.py --sbow_dir=sbow/val --devkit_dir=devkit-1.0 \
      --split=val --output=data/sbow/sbow_val.h5

The files feed Dauphin & Bengio's (2013) capacity study
(flags/capacity_imagenet_sbow.flags). Features are raw visual-word counts by
default; `--normalize=l2` gives the unit-L2 histograms of the devkit's demo
classifier. A thin main around `tfcapacity.data.sbow`, which documents the
release layout and the output format. Rerunning an interrupted command
resumes after the last completed source file.

Exit status: 0 done, 2 bad input (one line on stderr).
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# tools/ is not a package: make the repository's tfcapacity importable when
# the script runs from a checkout without an installed package.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app  # noqa: E402
from absl import flags  # noqa: E402

from tfcapacity.errors import UserError  # noqa: E402


def _import_sbow():
  """tfcapacity.data.sbow, imported with file descriptor 2 silenced.

  Importing tfcapacity.data loads TensorFlow, whose native libraries log a
  few lines to stderr whatever TF_CPP_MIN_LOG_LEVEL says (TF 2.21), and which
  registers an absl init callback that probes for GPUs (and logs a failed
  cuInit on machines without one). Imported inside `main`, after absl's
  initialisation, that callback runs here too, so an error stays one line.
  """
  saved = os.dup(2)
  devnull = os.open(os.devnull, os.O_WRONLY)
  try:
    os.dup2(devnull, 2)
    from tfcapacity.data import sbow  # pylint: disable=g-import-not-at-top
  finally:
    os.dup2(saved, 2)
    os.close(saved)
    os.close(devnull)
  return sbow


flags.DEFINE_string("sbow_dir", None,
                    "Directory of the split's .sbow.mat files (<WNID>.sbow.mat "
                    "for train, val.NNNN.sbow.mat for val), or its parent "
                    "holding train/ or val/.")
flags.DEFINE_string("devkit_dir", None,
                    "The LSVRC-2010 devkit, holding data/meta.mat and "
                    "data/ILSVRC2010_validation_ground_truth.txt.")
flags.DEFINE_enum("split", None, ["train", "val"], "Which split to convert.")
flags.DEFINE_string("output", None, "The HDF5 file to write.")
flags.DEFINE_enum("normalize", "none", ["none", "l1", "l2"],
                  "none: word counts; l1/l2: histograms scaled to unit norm "
                  "(the devkit's demo uses l2).")
flags.DEFINE_integer("chunk_rows", 1024, "Rows per HDF5 chunk of the outputs.",
                     lower_bound=1)
flags.DEFINE_enum("compression", "none", ["none", "gzip", "lzf"],
                  "HDF5 filter for the features. gzip (level 1) makes the "
                  "file ~7x smaller but training reads ~4x slower; see "
                  "tfcapacity/data/sbow.py.")
flags.DEFINE_bool("overwrite", False, "Replace an existing --output.")
flags.DEFINE_bool("progress", True,
                  "Progress bar on stderr (only when it is a terminal).")
for _name in ("sbow_dir", "devkit_dir", "split", "output"):
  flags.mark_flag_as_required(_name)
FLAGS = flags.FLAGS


def fail(message: str):
  print(f"convert_sbow: error: {message}", file=sys.stderr)
  sys.exit(2)


def main(argv):
  if len(argv) > 1:
    fail(f"unexpected arguments {argv[1:]}; all options are --flags")
  sbow = _import_sbow()
  try:
    sbow.convert(
        FLAGS.sbow_dir, FLAGS.devkit_dir, FLAGS.split, FLAGS.output,
        normalize=FLAGS.normalize, chunk_rows=FLAGS.chunk_rows,
        compression=FLAGS.compression, overwrite=FLAGS.overwrite,
        progress=FLAGS.progress and sys.stderr.isatty())
  except UserError as e:
    fail(str(e))
  except OSError as e:
    first = str(e).splitlines()[0] if str(e) else type(e).__name__
    fail(f"{first}; check the paths, permissions and free disk space")


def parse_flags(argv):
  """absl's parser, but a bad flag is one line on stderr and status 2."""
  try:
    return FLAGS(argv)
  except flags.Error as e:
    fail(f"{e}; see --helpfull")


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
