"""Read rate of the `hdf5:` dataset on SBOW-shaped files, plain and gzip.

Writes one synthetic file of bag-of-visual-words histograms in the layout of
tools/convert_sbow.py (features [n, 1000] float32 word counts in chunks of
1024 rows, int64 labels) twice into a temporary directory: uncompressed
(the converter's default) and gzip level 1 with byte shuffle (its
--compression=gzip). Each image's histogram counts ~1000 words drawn from a
Zipf law over the 1000 words (`sbow.histograms`), as SIFT words are.

Then, in interleaved rounds (the order rotates every round; this 2-core
machine's speed drifts by +-25% over minutes and other processes share it:
the load average is printed), one shuffled epoch of each file through
`tfcapacity.data.get('hdf5:FILE', 'train').batches(128, shuffle=True,
epoch=e)` (a new epoch, so a new order, on every read), consumed two ways:
  graph   `Dataset.reduce` counting examples, all in the graph, as the
          training loop's `tf.function` consumes its iterator;
  numpy   `as_numpy_iterator()` in Python (each batch copied to numpy).
A warm-up round (page cache, tracing) is not counted. Printed: bytes per row
on disk, the median over rounds of examples/s of each contender, and the
medians (quartiles) of the per-round ratios uncompressed / gzip.

Printed, never asserted:
  python benchmarks/hdf5_read.py [--rows=65536] [--rounds=6]
"""

import os
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
import h5py  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))))

import common  # noqa: E402  # benchmarks/common.py
from tfcapacity import config  # noqa: E402
from tfcapacity import data as data_lib  # noqa: E402
from tfcapacity.data import sbow  # noqa: E402

_ROWS = flags.DEFINE_integer("rows", 65536, "Images in the synthetic file.",
                             lower_bound=1024)
_ROUNDS = flags.DEFINE_integer("rounds", 6,
                               "Timed rounds (after one warm-up round).",
                               lower_bound=1)
_BATCH = flags.DEFINE_integer("batch_size", 128, "Examples per batch.")
CHUNK_ROWS = 1024  # The converter's default --chunk_rows.
WORDS_PER_IMAGE = 1000
ZIPF_EXPONENT = 1.1
FILTERS = {"uncompressed": {},
           "gzip": {"compression": "gzip", "compression_opts": 1,
                    "shuffle": True}}


def synthetic_histograms(rows: int, seed: int = 0):
  """[rows, 1000] word counts and labels, written block by block."""
  rng = np.random.default_rng(seed)
  p = 1.0 / np.arange(1, sbow.NUM_WORDS + 1) ** ZIPF_EXPONENT
  p /= p.sum()
  perm = rng.permutation(sbow.NUM_WORDS)  # Frequent words spread out.
  for start in range(0, rows, CHUNK_ROWS):
    n = min(CHUNK_ROWS, rows - start)
    lengths = rng.poisson(WORDS_PER_IMAGE, size=n)
    words = [perm[rng.choice(sbow.NUM_WORDS, size=k, p=p)] for k in lengths]
    yield sbow.histograms(words), rng.integers(0, sbow.NUM_CLASSES, size=n)


def write_files(directory: str, rows: int) -> dict[str, str]:
  paths = {name: os.path.join(directory, f"sbow_{name}.h5")
           for name in FILTERS}
  files = {name: h5py.File(path, "w") for name, path in paths.items()}
  for name, f in files.items():
    f.create_dataset("features", (rows, sbow.NUM_WORDS), np.float32,
                     chunks=(CHUNK_ROWS, sbow.NUM_WORDS), **FILTERS[name])
    f.create_dataset("labels", (rows,), np.int64)
    f.attrs["num_classes"] = sbow.NUM_CLASSES
  start = 0
  for x, y in synthetic_histograms(rows):
    for f in files.values():
      f["features"][start:start + len(x)] = x
      f["labels"][start:start + len(x)] = y
    start += len(x)
  for f in files.values():
    f.close()
  return paths


def load_average() -> str:
  return " ".join(f"{v:.1f}" for v in os.getloadavg())


def main(argv):
  del argv
  rows, batch = _ROWS.value, _BATCH.value
  with tempfile.TemporaryDirectory() as tmp:
    start = time.perf_counter()
    paths = write_files(tmp, rows)
    print(f"wrote {rows} rows x {sbow.NUM_WORDS} words twice in "
          f"{time.perf_counter() - start:.1f} s")
    for name, path in paths.items():
      print(f"  {name}: {os.path.getsize(path) / rows / 1e3:.2f} kB per row")
    cfg = config.make()
    datasets = {name: data_lib.get(f"hdf5:{path}", "train", cfg)
                for name, path in paths.items()}

    def reader(ds, graph):
      epochs = iter(range(1, 1 << 30))  # A new shuffle on every read.

      def read_epoch():
        batches = ds.batches(batch, shuffle=True, seed=0, epoch=next(epochs))
        if graph:
          count = int(batches.reduce(tf.constant(0, tf.int64), lambda c, b: (
              c + tf.shape(b[0], out_type=tf.int64)[0])))
        else:
          count = sum(len(x) for x, _ in batches.as_numpy_iterator())
        assert count == rows, count
        return count
      return read_epoch

    contenders = {f"{name} {way}": reader(ds, way == "graph")
                  for way in ("graph", "numpy")
                  for name, ds in datasets.items()}
    common.rounds(contenders, 1, 1)  # Warm-up: page cache, tracing.
    times = common.rounds(contenders, _ROUNDS.value, 1)
    print(f"load average after the rounds: {load_average()}")
    print(f"\nhdf5: shuffled batches of {batch}, {rows} SBOW-shaped rows, "
          f"medians of {_ROUNDS.value} interleaved rounds:")
    for k, v in times.items():
      print(f"  {k}: {np.median(rows / v):,.0f} examples/s")
    for way in ("graph", "numpy"):
      ratio, (q1, q3) = common.ratio_quartiles(
          times[f"gzip {way}"], times[f"uncompressed {way}"])
      print(f"  uncompressed / gzip ({way}): {ratio:.2f}x (quartiles "
            f"{q1:.2f}-{q3:.2f})")


if __name__ == "__main__":
  app.run(main)
