"""MNIST-1D, generated locally and cached on disk.

MNIST-1D (Greydanus & Kobak 2024, "Scaling down deep learning with MNIST-1D",
ICML; https://github.com/greydanus/mnist1d) turns ten hand-made 1-D digit
templates into length-40 signals by random padding, scaling, translation,
correlated and i.i.d. noise and shear. We build it with the package's
`mnist1d.data.make_dataset` and never call its `get_dataset`, which
downloads a pickle and writes it into the working directory.

Generation arguments are the package defaults (`get_dataset_args()`) except:
`num_samples=--mnist1d_examples`, `train_split=1 - --mnist1d_test_fraction`
and `seed=--data_seed`. The package makes `num_samples // 10` examples per
class, shuffles them, and puts the first `int(n * train_split)` in the
training split.

Deviations from the package:

* Normalisation. `make_dataset` standardises all signals with one scalar
  mean and standard deviation computed over train and test together, which
  leaks test statistics into the inputs. We standardise its output again
  with the scalar mean and standard deviation of the training split (in
  float64). Standardisation is affine, so this gives exactly the raw signals
  standardised with training statistics, whatever the package did first;
  the training split then has mean 0 and standard deviation 1 over all its
  values, the test split only approximately.
* Global state. `make_dataset` seeds numpy's and `random`'s global
  generators; we save their states before the call and restore them after,
  so loading data does not change any random stream of the caller.
* Caching. Generation costs about 0.25 ms per example, so the final arrays
  are stored in `<cache>/mnist1d-<hash>.npz`, the hash covering every
  generation argument, the package version and the version of this
  processing. `<cache>` is `--cache_dir`, else `$TFCAPACITY_CACHE`, else
  `~/.cache/tfcapacity`. The file is written to a temporary name and renamed
  into place, so a killed process leaves either no cache or a whole one.

Inputs are float32 vectors of shape (40,); 10 classes.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import tempfile

from absl import logging
import numpy as np

from tfcapacity import config as config_lib
from tfcapacity.data import arrays
from tfcapacity.data.base import ArrayDataset
from tfcapacity.errors import UserError

NAME = "mnist1d"
NUM_CLASSES = 10
# Bump when the processing after `make_dataset` changes: old caches then
# stop matching instead of silently serving differently processed data.
_FORMAT = 1
_KEYS = ("x_train", "y_train", "x_test", "y_test")


def cache_dir(cfg: config_lib.Config) -> str:
  """The directory of generated data: --cache_dir, $TFCAPACITY_CACHE, ~."""
  path = (cfg.cache_dir or os.environ.get("TFCAPACITY_CACHE")
          or os.path.join("~", ".cache", "tfcapacity"))
  return os.path.expanduser(path)


def generation_args(cfg: config_lib.Config) -> dict:
  """The arguments of `make_dataset` for `cfg`, as a plain dict."""
  from mnist1d import data as mnist1d_data
  args = mnist1d_data.get_dataset_args(as_dict=True)
  # The download address does not affect generation; keeping it out of the
  # cache key means a changed default URL does not invalidate caches.
  args.pop("url", None)
  args.update(num_samples=int(cfg.mnist1d_examples),
              train_split=1.0 - float(cfg.mnist1d_test_fraction),
              seed=int(cfg.data_seed))
  return args


def _cache_key(args: dict) -> str:
  from importlib import metadata
  blob = json.dumps({"args": args, "format": _FORMAT,
                     "mnist1d": metadata.version("mnist1d")},
                    sort_keys=True)
  return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _check_sizes(args: dict) -> None:
  per_class = args["num_samples"] // NUM_CLASSES
  n = per_class * NUM_CLASSES
  n_train = int(n * args["train_split"])
  if per_class == 0 or n_train == 0:
    raise UserError(
        f"--mnist1d_examples={args['num_samples']} with "
        f"--mnist1d_test_fraction={1 - args['train_split']:g} leaves no "
        f"training examples; raise --mnist1d_examples (examples are made "
        f"in whole multiples of {NUM_CLASSES})")


def _generate(args: dict) -> dict:
  """Runs `make_dataset` with the caller's global random state preserved."""
  from mnist1d import data as mnist1d_data
  from mnist1d import utils as mnist1d_utils
  np_state, py_state = np.random.get_state(), random.getstate()
  try:
    out = mnist1d_data.make_dataset(mnist1d_utils.ObjectView(dict(args)))
  finally:
    np.random.set_state(np_state)
    random.setstate(py_state)
  x_train = np.asarray(out["x"], np.float64)
  x_test = np.asarray(out["x_test"], np.float64)
  # Re-standardise with training statistics only (see the module docstring).
  mean, std = x_train.mean(), x_train.std()
  return {"x_train": ((x_train - mean) / std).astype(np.float32),
          "y_train": np.asarray(out["y"], np.int64),
          "x_test": ((x_test - mean) / std).astype(np.float32),
          "y_test": np.asarray(out["y_test"], np.int64)}


def _read(path: str) -> dict | None:
  try:
    with np.load(path) as f:
      return {k: f[k] for k in _KEYS}
  except FileNotFoundError:
    return None
  except Exception as e:  # pylint: disable=broad-except
    # Renames are atomic, so this means outside damage; regenerating is
    # cheap and the new file replaces the bad one.
    logging.warning("Ignoring unreadable MNIST-1D cache %s (%s)", path, e)
    return None


def _write_atomic(path: str, arrays_: dict) -> None:
  directory = os.path.dirname(path)
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=".mnist1d-",
                             suffix=".npz.tmp")
  try:
    with os.fdopen(fd, "wb") as f:
      np.savez(f, **arrays_)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    try:
      os.unlink(tmp)
    except OSError:
      pass
    raise


def arrays_for(cfg: config_lib.Config) -> dict:
  """The generated splits for `cfg`, from the cache or freshly made.

  Returns:
    A dict with float32 `x_train`, `x_test` of shape [n, 40] and int64
    `y_train`, `y_test`.

  Raises:
    UserError: the flags leave no training examples.
  """
  args = generation_args(cfg)
  _check_sizes(args)
  path = os.path.join(cache_dir(cfg), f"mnist1d-{_cache_key(args)}.npz")
  data = _read(path)
  if data is None:
    logging.info("Generating MNIST-1D (%d examples, seed %d) into %s",
                 args["num_samples"], args["seed"], path)
    data = _generate(args)
    try:
      _write_atomic(path, data)
    except OSError as e:
      # An unwritable cache costs time on the next run, not correctness.
      logging.warning("Could not cache MNIST-1D at %s (%s)", path, e)
  return data


def load(arg, split: str, cfg: config_lib.Config) -> ArrayDataset:
  """The `split` of MNIST-1D (`arg` is unused: the name takes no argument)."""
  del arg
  d = arrays_for(cfg)
  return arrays.make_array_split(NAME, split, d["x_train"], d["y_train"],
                                 d["x_test"], d["y_test"], NUM_CLASSES, cfg)
