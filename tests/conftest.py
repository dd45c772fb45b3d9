"""Shared test set-up: quiet TF, two logical CPUs for MirroredStrategy tests."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

# Two logical CPU devices, so MirroredStrategy with 2 replicas runs in-process.
_cpus = tf.config.list_physical_devices("CPU")
tf.config.set_logical_device_configuration(
    _cpus[0], [tf.config.LogicalDeviceConfiguration()] * 2)


@pytest.fixture
def tiny_cfg():
  """A Config for tiny, fast runs; tests override what they exercise."""
  from tfcapacity import config
  return config.make(width=8, depth=1, epochs=1, batch_size="32",
                     eval_batch_size=256, progress_bar=False, export=False)


def assert_one_line_error(proc, *fragments, prog=None):
  """A user error: exit status 2 and one line on stderr, no traceback; the
  line starts with '<prog>: error: ' when `prog` is given and holds every
  fragment."""
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1, proc.stderr[-2000:]
  if prog:
    assert lines[0].startswith(f"{prog}: error: "), lines[0]
  for fragment in fragments:
    assert fragment in lines[0], lines[0]


def write_digits_probe(path, n, seed):
  """An HDF5 file of n random digits-shaped examples (64 features, labels
  0-9) for the analysis tools' --dataset=hdf5: contract; returns (x, y)."""
  import h5py
  rng = np.random.default_rng(seed)
  x = rng.uniform(0.0, 3.0, size=(n, 64)).astype(np.float32)
  y = rng.integers(0, 10, size=n)
  with h5py.File(path, "w") as f:
    f["features"] = x
    f["labels"] = y
  return x, y


def synthetic_cfg(tmp_path, name="run", **overrides):
  """A tiny synthetic-data run in tmp_path/name (training-loop tests)."""
  from tfcapacity import config
  base = dict(dataset="synthetic", synthetic_examples=96,
              synthetic_test_examples=32, synthetic_dim=6,
              synthetic_classes=3, width=8, depth=1, batch_size="16",
              epochs=2, eval_batch_size=64, learning_rate=0.1,
              progress_bar=False, export=False, steps_per_loop=4,
              model_dir=str(tmp_path / name))
  base.update(overrides)
  return config.make(**base)


_MIRRORED = []


def two_replicas() -> tf.distribute.MirroredStrategy:
  """One MirroredStrategy over the two logical CPUs for the whole session.

  Each new MirroredStrategy numbers its collectives from the same keys; after
  several strategies have all-reduced tensors of different shapes in one
  process, a new one can hit "Shape mismatch in the collective instance".
  Sharing one strategy keeps the keys increasing, as in a real run (one
  strategy per process).
  """
  if not _MIRRORED:
    _MIRRORED.append(tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]))
  return _MIRRORED[0]


TOOL_ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="")


def run_tool(module: str, *args, env=None):
  """`python -m <module> ARGS` in a subprocess (the analysis CLIs)."""
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  return subprocess.run([sys.executable, "-m", module, *args],
                        capture_output=True, text=True,
                        env=env or TOOL_ENV, timeout=300)


def compute_tool(module, *args):
  """An analysis tool's result in-process, through its own flag parsing."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  fv = flags.FlagValues()
  module.define_flags(fv)
  fv(["prog", "--output=/nonexistent/unused.json", "--noprogress_bar",
      *args])
  return module.compute(fv)


def snapshot(root) -> dict:
  """{path relative to `root`: sha256 of its bytes} of every file under
  `root` (a directory or one file), and `path/` for every directory: equal
  snapshots before and after a command mean it changed nothing there."""
  import hashlib
  root = str(root)
  if os.path.isfile(root):
    with open(root, "rb") as f:
      return {".": hashlib.sha256(f.read()).hexdigest()}
  out = {}
  for directory, dirs, files in os.walk(root):
    rel = os.path.relpath(directory, root)
    out[rel + "/"] = ""
    for name in files:
      path = os.path.join(directory, name)
      with open(path, "rb") as f:
        out[os.path.join(rel, name)] = hashlib.sha256(f.read()).hexdigest()
  return out


CLI_ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="")


def run_cli(*argv, timeout=300, env=None, cwd=None):
  """Runs `python ARGV...` (e.g. "-m", "tfcapacity.train", ...) or a tool
  script path in a subprocess; returns the CompletedProcess (text)."""
  import subprocess
  import sys
  return subprocess.run([sys.executable, *map(str, argv)],
                        capture_output=True, text=True, timeout=timeout,
                        env=env or CLI_ENV, cwd=cwd)


def readonly_argv(directory, argv):
  """`argv` (a python command) run with `directory` mounted read-only in a
  private mount namespace (root can write through chmod, not through a
  read-only mount); None where namespaces are unavailable (the test then
  skips)."""
  import shutil
  import subprocess
  import sys
  if not shutil.which("unshare"):
    return None
  probe = subprocess.run(
      ["unshare", "-m", "--propagation", "private", "sh", "-c",
       f"mount --bind -o ro '{directory}' '{directory}'"],
      capture_output=True)
  if probe.returncode != 0:
    return None
  quoted = " ".join(f"'{a}'" for a in map(str, [sys.executable, *argv]))
  return ["unshare", "-m", "--propagation", "private", "sh", "-c",
          f"mount --bind -o ro '{directory}' '{directory}' && exec {quoted}"]
