"""The LSVRC-2010 SBOW converter on a tiny fake release written with savemat.

The fake devkit's leaf synsets have ILSVRC2010_IDs whose order differs from
the sorted order of their WNIDs, and internal nodes (ids above the leaves,
with children) come first in meta.mat, so code that ranks WNIDs or keeps
internal nodes gives wrong labels. Histograms are checked against a plain
Python count over the words written.
"""

import os
import shutil
import subprocess
import sys

import h5py
import numpy as np
import pytest
import scipy.io

from tfcapacity import config
from tfcapacity import data as data_lib
from tfcapacity.data import sbow
from tfcapacity.errors import UserError
import conftest  # tests/ is on sys.path (pytest rootdir conftest)

PROG = "convert_sbow"

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="")

# (ILSVRC2010_ID, WNID, num_children): leaves 1..4 in an order unlike their
# sorted WNIDs, then internal nodes.
SYNSETS = [
    (5, "n00001740", 3),
    (6, "n00002000", 2),
    (1, "n04000000", 0),
    (2, "n01000000", 0),
    (3, "n03000000", 0),
    (4, "n02000000", 0),
]
LEAVES = {wnid: ident - 1 for ident, wnid, children in SYNSETS if not children}


def sbow_struct(words, dtype):
  """The `sbow` field of one image: `word` plus position fields to ignore."""
  s = np.zeros((1,), dtype=[("x", object), ("y", object), ("word", object)])
  words = np.asarray(words, dtype=dtype).reshape(-1, 1)
  s[0]["x"] = np.arange(len(words), dtype=np.float64).reshape(-1, 1)
  s[0]["y"] = np.zeros((len(words), 1))
  s[0]["word"] = words if len(words) else np.zeros((0, 0))
  return s


def write_sbow(path, images, dtype=np.uint16):
  """A .sbow.mat file of (ID, words) pairs, as MATLAB's struct array."""
  arr = np.zeros((len(images),), dtype=[("ID", object), ("sbow", object)])
  for i, (name, words) in enumerate(images):
    arr[i]["ID"] = name
    arr[i]["sbow"] = sbow_struct(words, dtype)
  scipy.io.savemat(path, {"image_sbow": arr})


def write_devkit(devkit, val_ids):
  os.makedirs(devkit / "data", exist_ok=True)
  syn = np.zeros((len(SYNSETS),), dtype=[
      ("ILSVRC2010_ID", object), ("WNID", object), ("words", object),
      ("num_children", object)])
  for i, (ident, wnid, children) in enumerate(SYNSETS):
    syn[i] = (float(ident), wnid, f"synset {wnid}", float(children))
  scipy.io.savemat(devkit / "data" / "meta.mat", {"synsets": syn})
  (devkit / sbow.GROUND_TRUTH_FILE).write_text(
      "".join(f"{i}\n" for i in val_ids))


def fake_images(rng, prefix, n, special=False):
  """`n` (ID, words) pairs; with `special`, one empty and one single word."""
  images = []
  for j in range(n):
    size = int(rng.integers(2, 40))
    words = rng.integers(0, sbow.NUM_WORDS, size=size)
    words[0] = sbow.NUM_WORDS - 1  # The top word id must be accepted.
    images.append((f"{prefix}_{j + 1}", words))
  if special:
    images[1] = (images[1][0], np.zeros(0, np.int64))
    images[2] = (images[2][0], np.array([7]))
  return images


def make_release(root, seed=0, train_subdir=False):
  """Writes a fake release; returns ({split: sbow_dir}, devkit_dir, expected).

  `expected[split]` is the list of (ID, words, label) in output order. Train
  files store words as uint16, validation files as double (MATLAB's
  default); the last validation file holds a single image, which loadmat's
  squeeze_me returns as a struct rather than an array.
  """
  rng = np.random.default_rng(seed)
  train_dir = root / "sbow" / "train" if train_subdir else root / "sbow"
  val_dir = root / "sbow_val"
  os.makedirs(train_dir)
  os.makedirs(val_dir)
  train = []
  for wnid, label in sorted(LEAVES.items(), key=lambda kv: kv[1]):
    images = fake_images(rng, wnid, 3 + label, special=label == 2)
    write_sbow(train_dir / f"{wnid}.sbow.mat", images)
    train += [(name, words, label) for name, words in images]
  val = []
  for k in range(1, 4):
    images = fake_images(rng, f"ILSVRC2010_val_{k}", 4 if k < 3 else 1,
                         special=k == 2)
    write_sbow(val_dir / f"val.{k:04d}.sbow.mat", images, np.float64)
    val += [(name, words, int(rng.integers(0, 4))) for name, words in images]
  devkit = root / "devkit"
  write_devkit(devkit, [label + 1 for _, _, label in val])
  sbow_dir = root / "sbow"
  return ({"train": str(sbow_dir), "val": str(val_dir)}, str(devkit),
          {"train": train, "val": val})


def brute_counts(words):
  counts = [0.0] * sbow.NUM_WORDS
  for w in words:
    counts[int(w)] += 1
  return counts


def read(path):
  with h5py.File(path, "r") as f:
    return (f["features"][()], f["labels"][()],
            [s.decode() for s in f["ids"][()]], dict(f.attrs))


@pytest.fixture(scope="module")
def release(tmp_path_factory):
  return make_release(tmp_path_factory.mktemp("release"))


def test_fake_release_has_the_documented_layout(release):
  dirs, _, expected = release
  m = scipy.io.loadmat(os.path.join(dirs["train"], "n03000000.sbow.mat"),
                       squeeze_me=True, struct_as_record=False)
  images = m["image_sbow"]
  first = 3 + 4  # After the 3 images of class 0 and 4 of class 1.
  assert images[0].ID == expected["train"][first][0]
  np.testing.assert_array_equal(images[0].sbow.word,
                                expected["train"][first][1])
  assert np.asarray(images[1].sbow.word).size == 0
  assert np.ndim(images[2].sbow.word) == 0  # One descriptor: a scalar.
  m = scipy.io.loadmat(os.path.join(dirs["val"], "val.0003.sbow.mat"),
                       squeeze_me=True, struct_as_record=False)
  single = m["image_sbow"]  # One image: a struct, not an array of them.
  assert not isinstance(single, np.ndarray)
  assert single.sbow.word.dtype == np.float64


@pytest.mark.parametrize("split", ["train", "val"])
def test_conversion_labels_counts_ids_and_order(release, tmp_path, split):
  dirs, devkit, expected = release
  out = str(tmp_path / f"{split}.h5")
  summary = sbow.convert(dirs[split], devkit, split, out)
  assert summary["complete"] and not os.path.exists(out + ".partial")
  x, y, ids, attrs = read(out)
  want = expected[split]
  assert ids == [name for name, _, _ in want]
  np.testing.assert_array_equal(y, [label for _, _, label in want])
  np.testing.assert_array_equal(x, [brute_counts(w) for _, w, _ in want])
  assert x.dtype == np.float32 and y.dtype == np.int64
  assert attrs["split"] == split and attrs["num_classes"] == 1000
  assert attrs["num_words"] == 1000 and attrs["normalize"] == "none"
  assert attrs["num_files"] == (4 if split == "train" else 3)
  assert attrs["num_empty"] == 1
  assert attrs["num_descriptors"] == sum(len(w) for _, w, _ in want)
  assert attrs["format_version"] == sbow.FORMAT_VERSION


def test_train_files_in_a_train_subdirectory(tmp_path):
  dirs, devkit, expected = make_release(tmp_path, train_subdir=True)
  out = str(tmp_path / "t.h5")
  sbow.convert(dirs["train"], devkit, "train", out)
  _, y, ids, _ = read(out)
  assert ids == [name for name, _, _ in expected["train"]]
  np.testing.assert_array_equal(y, [lab for _, _, lab in expected["train"]])


@pytest.mark.parametrize("normalize", ["l1", "l2"])
def test_normalisation(release, tmp_path, normalize):
  dirs, devkit, expected = release
  out = str(tmp_path / "n.h5")
  sbow.convert(dirs["train"], devkit, "train", out, normalize=normalize,
               compression="none")
  x, _, _, attrs = read(out)
  counts = np.array([brute_counts(w) for _, w, _ in expected["train"]])
  order = 1 if normalize == "l1" else 2
  norms = np.linalg.norm(counts, ord=order, axis=1, keepdims=True)
  want = np.divide(counts, norms, out=np.zeros_like(counts), where=norms > 0)
  np.testing.assert_allclose(x, want, rtol=1e-6)
  assert attrs["normalize"] == normalize
  assert not x[3 + 4 + 1].any()  # The image without descriptors.


def test_readable_by_the_hdf5_dataset(release, tmp_path):
  dirs, devkit, expected = release
  train, val = str(tmp_path / "train.h5"), str(tmp_path / "val.h5")
  sbow.convert(dirs["train"], devkit, "train", train, chunk_rows=4)
  sbow.convert(dirs["val"], devkit, "val", val, chunk_rows=4)
  cfg = config.make(dataset="hdf5:" + train, test_dataset="hdf5:" + val)
  for split, name in (("train", "train"), ("test", "val")):
    ds = data_lib.get(cfg.dataset, split, cfg)
    assert ds.info.num_classes == 1000
    assert ds.info.input_shape == (1000,)
    xs, ys = zip(*ds.batches(5).as_numpy_iterator())
    want = expected[name]
    np.testing.assert_array_equal(np.concatenate(ys),
                                  [label for _, _, label in want])
    np.testing.assert_array_equal(np.concatenate(xs),
                                  [brute_counts(w) for _, w, _ in want])


# -- bad input -----------------------------------------------------------


def run_cli(*args):
  return subprocess.run(
      [sys.executable, "tools/convert_sbow.py", *args], cwd=REPO, env=ENV,
      capture_output=True, text=True, timeout=120)


def test_cli_converts_then_refuses_to_clobber(release, tmp_path):
  dirs, devkit, expected = release
  out = str(tmp_path / "val.h5")
  args = [f"--sbow_dir={dirs['val']}", f"--devkit_dir={devkit}",
          "--split=val", f"--output={out}", "--normalize=l2"]
  done = run_cli(*args)
  assert done.returncode == 0, done.stderr
  _, y, _, attrs = read(out)
  assert attrs["normalize"] == "l2" and len(y) == len(expected["val"])
  conftest.assert_one_line_error(run_cli(*args), "already exists",
                                 "--overwrite", prog=PROG)
  conftest.assert_one_line_error(run_cli(*args[:-1], "--normalize=l3"),
                                 "normalize", prog=PROG)
  conftest.assert_one_line_error(run_cli(*args[1:]), "sbow_dir", prog=PROG)


def test_cli_malformed_file_keeps_the_finished_output(tmp_path):
  dirs, devkit, _ = make_release(tmp_path)
  out = tmp_path / "train.h5"
  sbow.convert(dirs["train"], devkit, "train", str(out))
  before = out.read_bytes()
  write_sbow(os.path.join(dirs["train"], "n02000000.sbow.mat"),
             [("n02000000_1", [3, 1000])])
  proc = run_cli(f"--sbow_dir={dirs['train']}", f"--devkit_dir={devkit}",
                 "--split=train", f"--output={out}", "--overwrite")
  conftest.assert_one_line_error(proc, "n02000000_1", "1000", prog=PROG)
  assert out.read_bytes() == before


@pytest.mark.parametrize("content, fragment", [
    ({"something_else": np.zeros(3)}, "no variable 'image_sbow'"),
    (None, "not a readable MATLAB v5 file"),
])
def test_malformed_mat_files(release, tmp_path, content, fragment):
  _, devkit, _ = release
  d = tmp_path / "sbow"
  d.mkdir()
  path = d / "n01000000.sbow.mat"
  if content is None:
    path.write_bytes(b"not a MATLAB file" * 20)
  else:
    scipy.io.savemat(path, content)
  with pytest.raises(UserError, match=fragment):
    sbow.convert(str(d), devkit, "train", str(tmp_path / "o.h5"))
  assert not os.path.exists(tmp_path / "o.h5")


def test_missing_field_is_reported(release, tmp_path):
  _, devkit, _ = release
  d = tmp_path / "sbow"
  d.mkdir()
  arr = np.zeros((1,), dtype=[("ID", object), ("hist", object)])
  arr[0] = ("n01000000_1", np.ones(3))
  scipy.io.savemat(d / "n01000000.sbow.mat", {"image_sbow": arr})
  with pytest.raises(UserError, match="no field 'sbow'"):
    sbow.convert(str(d), devkit, "train", str(tmp_path / "o.h5"))


def test_unknown_wnid(release, tmp_path):
  dirs, devkit, _ = release
  d = tmp_path / "sbow"
  d.mkdir()
  # An internal node of meta.mat is not a class either.
  write_sbow(d / "n00001740.sbow.mat", [("n00001740_1", [1, 2])])
  with pytest.raises(UserError, match="n00001740 is not a leaf synset"):
    sbow.convert(str(d), devkit, "train", str(tmp_path / "o.h5"))


def test_missing_devkit_file(release, tmp_path):
  dirs, devkit, _ = release
  empty = tmp_path / "devkit"
  (empty / "data").mkdir(parents=True)
  with pytest.raises(UserError, match="meta.mat not found"):
    sbow.convert(dirs["train"], str(empty), "train", str(tmp_path / "o.h5"))
  shutil.copy(os.path.join(devkit, sbow.META_FILE), empty / sbow.META_FILE)
  with pytest.raises(UserError, match="ground_truth.txt not found"):
    sbow.convert(dirs["val"], str(empty), "val", str(tmp_path / "o.h5"))
  proc = run_cli(f"--sbow_dir={dirs['val']}", f"--devkit_dir={tmp_path}",
                 "--split=val", f"--output={tmp_path / 'o.h5'}")
  conftest.assert_one_line_error(proc, "meta.mat not found", "--devkit_dir",
                                 prog=PROG)


@pytest.mark.parametrize("delta", [-1, 1])
def test_wrong_number_of_ground_truth_lines(release, tmp_path, delta):
  dirs, devkit, expected = release
  bad = tmp_path / "devkit"
  (bad / "data").mkdir(parents=True)
  shutil.copy(os.path.join(devkit, sbow.META_FILE), bad / sbow.META_FILE)
  labels = [label + 1 for _, _, label in expected["val"]]
  labels = labels[:-1] if delta < 0 else labels + [1]
  (bad / sbow.GROUND_TRUTH_FILE).write_text("\n".join(map(str, labels)))
  out = tmp_path / "o.h5"
  with pytest.raises(UserError, match=f"has {len(labels)} lines"):
    sbow.convert(dirs["val"], str(bad), "val", str(out))
  assert not out.exists()


def test_ground_truth_label_outside_the_leaves(release, tmp_path):
  dirs, devkit, _ = release
  bad = tmp_path / "devkit"
  (bad / "data").mkdir(parents=True)
  shutil.copy(os.path.join(devkit, sbow.META_FILE), bad / sbow.META_FILE)
  (bad / sbow.GROUND_TRUTH_FILE).write_text("1\n5\n")
  with pytest.raises(UserError, match="line 2"):
    sbow.convert(dirs["val"], str(bad), "val", str(tmp_path / "o.h5"))


@pytest.mark.parametrize("names, fragment", [
    (["val.0001", "val.0003"], "number 2 is missing"),
    (["val.0001", "val.1", "val.0002"], "two files have number 1"),
])
def test_gap_in_validation_files(release, tmp_path, names, fragment):
  _, devkit, _ = release
  d = tmp_path / "val"
  d.mkdir()
  for name in names:
    write_sbow(d / f"{name}.sbow.mat", [(name, [1])])
  with pytest.raises(UserError, match=fragment):
    sbow.convert(str(d), devkit, "val", str(tmp_path / "o.h5"))


# -- resume ----------------------------------------------------------------


class LoadCounter:
  """Counts read_sbow calls by file name."""

  def __init__(self, monkeypatch):
    self.names = []
    original = sbow.read_sbow

    def counted(path):
      self.names.append(os.path.basename(path))
      return original(path)

    monkeypatch.setattr(sbow, "read_sbow", counted)


# Train files in class order (ids 1..4) and their sizes: 3, 4, 5, 6 images.
TRAIN_FILES = ["n04000000.sbow.mat", "n01000000.sbow.mat",
               "n03000000.sbow.mat", "n02000000.sbow.mat"]


@pytest.mark.parametrize("chunk_rows, resumed_at", [
    (1, 2),  # Every file's rows reach the disk: resume after file 2.
    (3, 1),  # 3 + 4 rows: 6 on disk, file 2's last row in memory is lost.
])
def test_resume_after_stop_equals_fresh_conversion(
    release, tmp_path, monkeypatch, chunk_rows, resumed_at):
  dirs, devkit, _ = release
  fresh = str(tmp_path / "fresh.h5")
  sbow.convert(dirs["train"], devkit, "train", fresh, chunk_rows=chunk_rows)
  out = str(tmp_path / "out.h5")
  loads = LoadCounter(monkeypatch)
  summary = sbow.convert(dirs["train"], devkit, "train", out,
                         chunk_rows=chunk_rows, stop_after_files=2)
  assert not summary["complete"] and not os.path.exists(out)
  assert loads.names == TRAIN_FILES[:2]
  # A kill while writing the third file leaves rows beyond the checkpoint.
  with h5py.File(out + ".partial", "r+") as f:
    for name in ("features", "labels", "ids"):
      f[name].resize(f[name].shape[0] + chunk_rows, axis=0)
    f["labels"][-chunk_rows:] = 99
  loads.names.clear()
  summary = sbow.convert(dirs["train"], devkit, "train", out,
                         chunk_rows=chunk_rows, progress=True)
  assert summary["complete"] and summary["resumed_at"] == resumed_at
  assert loads.names == TRAIN_FILES[resumed_at:]
  got, want = read(out), read(fresh)
  for a, b in zip(got[:3], want[:3]):
    np.testing.assert_array_equal(a, b)
  for key in ("fingerprint", "num_descriptors", "num_empty", "num_examples"):
    assert got[3][key] == want[3][key]


@pytest.mark.parametrize("damage", ["truncate", "garble_last_chunk"])
def test_damaged_partial_file_is_restarted(release, tmp_path, damage):
  dirs, devkit, _ = release
  fresh = str(tmp_path / "fresh.h5")
  sbow.convert(dirs["train"], devkit, "train", fresh, compression="gzip")
  out = tmp_path / "out.h5"
  sbow.convert(dirs["train"], devkit, "train", str(out), compression="gzip",
               chunk_rows=2, stop_after_files=3)
  partial = tmp_path / "out.h5.partial"
  with h5py.File(partial, "r") as f:
    dset = f["features"]
    last = dset.id.get_chunk_info(dset.id.get_num_chunks() - 1)
  with open(partial, "r+b") as f:
    if damage == "truncate":  # As if killed while the file grew.
      f.truncate(os.path.getsize(partial) // 2)
    else:
      f.seek(last.byte_offset)
      f.write(b"\xff" * last.size)
  sbow.convert(dirs["train"], devkit, "train", str(out), compression="gzip",
               chunk_rows=2)
  for a, b in zip(read(out)[:3], read(fresh)[:3]):
    np.testing.assert_array_equal(a, b)


def test_partial_file_of_other_arguments_is_refused(release, tmp_path,
                                                    monkeypatch):
  dirs, devkit, expected = release
  out = str(tmp_path / "out.h5")
  sbow.convert(dirs["train"], devkit, "train", out, chunk_rows=1,
               stop_after_files=3)
  before = conftest.snapshot(tmp_path)
  loads = LoadCounter(monkeypatch)
  with pytest.raises(UserError, match=r"out\.h5\.partial: it was started "
                     r"with --normalize=none, not --normalize=l1; delete it"):
    sbow.convert(dirs["train"], devkit, "train", out, chunk_rows=1,
                 normalize="l1")
  assert not loads.names and conftest.snapshot(tmp_path) == before
  summary = sbow.convert(dirs["train"], devkit, "train", out, chunk_rows=1)
  assert summary["complete"] and loads.names == TRAIN_FILES[3:]
  x, y, _, attrs = read(out)
  assert attrs["normalize"] == "none" and len(y) == len(expected["train"])
  np.testing.assert_array_equal(
      x, [brute_counts(w) for _, w, _ in expected["train"]])


def test_unreadable_partial_file_is_restarted(release, tmp_path):
  dirs, devkit, expected = release
  out = tmp_path / "out.h5"
  (tmp_path / "out.h5.partial").write_bytes(b"\x89HDF\r\n garbage" * 10)
  sbow.convert(dirs["val"], devkit, "val", str(out))
  assert len(read(out)[1]) == len(expected["val"])
