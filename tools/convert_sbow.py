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

# tools/ is not a package: make the repository's tfcapacity importable when
# the script runs from a checkout without an installed package.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app  # noqa: E402
from absl import flags  # noqa: E402

from tfcapacity import cli  # noqa: E402
from tfcapacity.data import sbow  # noqa: E402  (numpy, scipy, h5py only)
from tfcapacity.errors import UserError  # noqa: E402

PROG = "convert_sbow"

flags.DEFINE_string("sbow_dir", None,
                    "Directory of the split's .sbow.mat files (<WNID>.sbow.mat "
                    "for train, val.NNNN.sbow.mat for val), or its parent "
                    "holding train/ or val/.")
flags.DEFINE_string("devkit_dir", None,
                    "The LSVRC-2010 devkit, holding data/meta.mat and "
                    "data/ILSVRC2010_validation_ground_truth.txt.")
flags.DEFINE_enum("split", None, sbow.SPLITS, "Which split to convert.")
flags.DEFINE_string("output", None, "The HDF5 file to write.")
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
for _name in ("sbow_dir", "devkit_dir", "split", "output"):
  flags.mark_flag_as_required(_name)
FLAGS = flags.FLAGS


def main(argv):
  cli.no_arguments(PROG, argv)
  try:
    sbow.convert(
        FLAGS.sbow_dir, FLAGS.devkit_dir, FLAGS.split, FLAGS.output,
        normalize=FLAGS.normalize, chunk_rows=FLAGS.chunk_rows,
        compression=FLAGS.compression, overwrite=FLAGS.overwrite,
        progress=FLAGS.progress and sys.stderr.isatty())
  except UserError as e:
    cli.fail(PROG, str(e))
  except OSError as e:
    first = str(e).splitlines()[0] if str(e) else type(e).__name__
    cli.fail(PROG, f"{first}; check the paths, permissions and free disk space")


if __name__ == "__main__":
  app.run(main, flags_parser=cli.flags_parser(PROG))
