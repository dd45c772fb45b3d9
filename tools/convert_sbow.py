"""Converts the LSVRC-2010 SBOW features into an HDF5 file for `hdf5:<path>`.

  python tools/convert_sbow.py --sbow_dir=sbow/train --devkit_dir=devkit-1.0 \
      --split=train --output=data/sbow/sbow_train.h5
  python tools/convert_sbow.py --sbow_dir=sbow/val --devkit_dir=devkit-1.0 \
      --split=val --output=data/sbow/sbow_val.h5

The files feed Dauphin & Bengio's (2013) capacity study
(flags/capacity_imagenet_sbow.flags). Features are raw visual-word counts by
default; `--normalize=l2` gives the unit-L2 histograms of the devkit's demo
classifier. A thin main around `tfcapacity.data.sbow`, which documents the
release layout and the output format.

Rerunning an interrupted or failed command resumes `<output>.partial` after
the last completed source file. A partial file started with other source
files (paths, sizes, modification times), another devkit or other output
options is refused, never appended to nor replaced: delete it to start
afresh, or rerun with the original inputs. A refused command changes no
file.

Exit status: 0 done, 2 bad input, 130 interrupted. An error is one line on
stderr, `convert_sbow: error: <problem and fix>`, naming the partial file
when one is kept; the log (resume notes, the summary) goes to stdout, so a
note logged before an error never adds a line to stderr.
"""

import os
import sys

# tools/ is not a package: make the repository's tfcapacity importable when
# the script runs from a checkout without an installed package.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from absl import logging  # noqa: E402

from tfcapacity import cli  # noqa: E402
from tfcapacity.data import sbow  # noqa: E402  (numpy, scipy, h5py only)
from tfcapacity.errors import UserError  # noqa: E402

PROG = "convert_sbow"

flags.DEFINE_string("sbow_dir", None,
                    "Required. Directory of the split's .sbow.mat files "
                    "(<WNID>.sbow.mat for train, val.NNNN.sbow.mat for val), "
                    "or its parent holding train/ or val/.")
flags.DEFINE_string("devkit_dir", None,
                    "Required. The LSVRC-2010 devkit, holding data/meta.mat "
                    "and data/ILSVRC2010_validation_ground_truth.txt.")
flags.DEFINE_enum("split", None, sbow.SPLITS,
                  "Required. Which split to convert.")
flags.DEFINE_string("output", None, "Required. The HDF5 file to write.")
flags.DEFINE_enum("normalize", "none", sbow.NORMALIZE,
                  "none: word counts; l1/l2: histograms scaled to unit norm "
                  "(the devkit's demo uses l2).")
flags.DEFINE_integer("chunk_rows", 1024, "Rows per HDF5 chunk of the outputs.",
                     lower_bound=1)
flags.DEFINE_enum("compression", "none", sbow.COMPRESSION,
                  "HDF5 filter for the features. gzip (level 1) makes the "
                  "file ~7x smaller but training reads ~4x slower; see "
                  "tfcapacity/data/sbow.py.")
flags.DEFINE_bool("overwrite", False, "Replace an existing --output.")
flags.DEFINE_bool("progress", True,
                  "Progress bar on stderr (only when it is a terminal).")
# Checked in main, all together: absl reports each missing required flag
# on a line of its own.
REQUIRED = ("sbow_dir", "devkit_dir", "split", "output")
FLAGS = flags.FLAGS


def main(argv):
  cli.no_arguments(PROG, argv)
  missing = [f"--{name}" for name in REQUIRED if FLAGS[name].value is None]
  if missing:
    names = (", ".join(missing[:-1]) + " and " if len(missing) > 1
             else "") + missing[-1]
    cli.fail(PROG, f"{names} {'are' if len(missing) > 1 else 'is'} "
             f"required; see --help")
  # stderr is for the one-line error (and a terminal's progress bar): the
  # log goes to stdout, unless --logtostderr asks otherwise.
  logging.get_absl_handler().python_handler.stream = sys.stdout
  try:
    sbow.convert(
        FLAGS.sbow_dir, FLAGS.devkit_dir, FLAGS.split, FLAGS.output,
        normalize=FLAGS.normalize, chunk_rows=FLAGS.chunk_rows,
        compression=FLAGS.compression, overwrite=FLAGS.overwrite,
        progress=FLAGS.progress and sys.stderr.isatty())
  except UserError as e:
    cli.fail(PROG, " ".join(str(e).splitlines()))
  except OSError as e:
    first = str(e).splitlines()[0] if str(e) else type(e).__name__
    cli.fail(PROG, f"{first}; check the paths, permissions and free disk space")
  except KeyboardInterrupt:
    partial = FLAGS.output + sbow.PARTIAL_SUFFIX
    kept = (f"; rerun the same command to resume {partial}, or delete it to "
            f"start afresh" if os.path.exists(partial) else "")
    cli.fail(PROG, f"interrupted{kept}", status=130)


if __name__ == "__main__":
  app.run(main, flags_parser=cli.flags_parser(PROG))
