"""Data sources behind one registry: `get(name, split, cfg)`.

Names: `digits`, `mnist1d`, `synthetic`, `hdf5:<path>`, `tfds:<name>`. Each
source module has `load(arg, split, cfg) -> Dataset`, where `arg` is the part
after the colon (or None) and `cfg` a `tfcapacity.config.Config` holding the
data flags (`--random_labels`, `--label_noise`, `--train_subset`, ...).
Label transforms and subsets apply to the `train` split only.
"""

from __future__ import annotations

import importlib

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
  prefix, sep, arg = name.partition(":")
  key = prefix + sep
  if key not in _SOURCES or (sep and not arg):
    raise choices_error("dataset", name, names())
  if key in _STREAMED:
    for flag, value, default in (
        ("task", getattr(cfg, "task", "classes"), "classes"),
        ("unit_norm_inputs", getattr(cfg, "unit_norm_inputs", False), False)):
      if value != default:
        raise UserError(f"--{flag} applies to in-memory datasets (digits, "
                        f"mnist1d, synthetic), not --dataset={name}; drop it")
  module = importlib.import_module(_SOURCES[key])
  return module.load(arg or None, split, cfg)
