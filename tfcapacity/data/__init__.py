"""Data sources behind one registry: `get(name, split, cfg)`.

Names: `digits`, `mnist1d`, `synthetic`, `hdf5:<path>`, `tfds:<name>`. Each
source module has `load(arg, split, cfg) -> Dataset`, where `arg` is the part
after the colon (or None) and `cfg` a `tfcapacity.config.Config` holding the
data flags (`--random_labels`, `--label_noise`, `--train_subset`, ...).
Label transforms and subsets apply to the `train` split only.

`check_name(name, cfg)` checks a name and the files it points to without
loading anything (no TensorFlow, no h5py), so that the command-line mains
refuse a mistyped name or a missing file before TensorFlow loads.
"""

from __future__ import annotations

import importlib

import os

from tfcapacity import config as config_lib
from tfcapacity.errors import UserError, choices_error

# name -> module; a trailing colon marks a prefix that takes an argument.
_SOURCES = {
    "digits": "tfcapacity.data.digits",
    "mnist1d": "tfcapacity.data.mnist1d",
    "synthetic": "tfcapacity.data.synthetic",
    "hdf5:": "tfcapacity.data.hdf5",
    "tfds:": "tfcapacity.data.tfds_source",
}
SPLITS = ("train", "test")
# Sources that stream their examples: the in-memory flags do not apply.
_STREAMED = ("hdf5:", "tfds:")


def __getattr__(name):
  # The base classes import TensorFlow; tools that only convert files (the
  # SBOW converter) import tfcapacity.data.<module> without it.
  if name in ("Dataset", "DatasetInfo"):
    return getattr(importlib.import_module("tfcapacity.data.base"), name)
  raise AttributeError(name)


def draw_indices(seed: int, num_examples: int, size: int):
  """`size` examples of `num_examples` drawn with `seed`, in drawn order.

  The one draw of fixed examples that the curvature measurements share: the
  analysis tools (`tfcapacity.rundir.load`, `--seed`, `--num_examples`) and
  the curvature callback (the run's `--seed`, `--curvature_examples`) pick
  the same examples for the same seed and count. The order is the draw's,
  not storage order, so that batches of a class-sorted file mix classes.
  """
  import numpy as np  # pylint: disable=g-import-not-at-top
  size = min(int(size), int(num_examples))
  return np.random.default_rng(int(seed)).permutation(int(num_examples))[:size]


def names() -> list[str]:
  return [n + ("<path>" if n == "hdf5:" else "<name>" if n == "tfds:" else "")
          for n in _SOURCES]


def check_file(path: str, what: str) -> None:
  """Raises a one-line UserError unless `path` is an existing file.

  Args:
    path: the file, as given (relative paths start in the working
      directory).
    what: the flag to check, for the message (e.g. '--test_dataset').
  """
  if os.path.isdir(path):
    raise UserError(f"{path} is a directory, not an HDF5 file; check {what}")
  if not os.path.isfile(path):
    where = "" if os.path.isabs(path) else f" (looked in {os.getcwd()})"
    raise UserError(f"HDF5 file not found: {path}{where}; check {what}")


def hdf5_path(flag_value: str) -> str:
  """The path of an HDF5 flag value: `hdf5:<path>` or a bare path."""
  return (flag_value[len("hdf5:"):] if flag_value.startswith("hdf5:")
          else flag_value)


def check_name(name: str, cfg: config_lib.Config | None = None) -> None:
  """Checks dataset `name` without loading anything (no TensorFlow).

  The syntax of the name, the flags that do not apply to it and, for
  `hdf5:<path>`, that the files of `--dataset` and `--test_dataset` exist
  (whether they hold what is needed is checked at load). A `tfds:` name is
  checked for syntax only: whether tensorflow-datasets knows it needs
  TensorFlow.

  Args:
    name: a dataset name, e.g. 'digits', 'hdf5:/data/sbow.h5'.
    cfg: the other flag values (--test_dataset, --task, ...); None: only
      the name and its file are checked.

  Raises:
    UserError: an unknown or incomplete name, a flag that does not apply to
      it, a missing file.
  """
  prefix, sep, arg = (name or "").partition(":")
  key = prefix + sep
  if key not in _SOURCES or (sep and not arg.strip()):
    raise choices_error("dataset", name, names())
  if cfg is not None and key in _STREAMED:
    for flag, value, default in (
        ("task", getattr(cfg, "task", "classes"), "classes"),
        ("unit_norm_inputs", getattr(cfg, "unit_norm_inputs", False), False)):
      if value != default:
        raise UserError(f"--{flag} applies to in-memory datasets (digits, "
                        f"mnist1d, synthetic), not --dataset={name}; drop it")
  test_dataset = getattr(cfg, "test_dataset", None) if cfg else None
  if test_dataset and key != "hdf5:":
    raise UserError(f"--test_dataset is the test split of an hdf5: dataset; "
                    f"--dataset={name} has its own test split; drop "
                    f"--test_dataset")
  if key == "hdf5:":
    check_file(arg, "--dataset=hdf5:<path>")
    if test_dataset:
      check_file(hdf5_path(test_dataset), "--test_dataset")


def get(name: str, split: str, cfg: config_lib.Config | None = None,
        **overrides) -> Dataset:
  """The `split` ('train' or 'test') of dataset `name`.

  Args:
    name: a registered name, e.g. 'digits', 'hdf5:/data/sbow.h5'.
    split: 'train' or 'test'.
    cfg: flag values; defaults to the CLI defaults.
    **overrides: flag values overriding `cfg` (e.g. input_format='image').

  Raises:
    UserError: unknown name or split, missing files, bad labels or features.
  """
  if split not in SPLITS:
    raise choices_error("split", split, SPLITS)
  if cfg is None:
    cfg = config_lib.make(**overrides)
  elif overrides:
    cfg = cfg.replace(**overrides)
  check_name(name, cfg)
  prefix, sep, arg = name.partition(":")
  module = importlib.import_module(_SOURCES[prefix + sep])
  return module.load(arg or None, split, cfg)
