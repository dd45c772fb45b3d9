"""LSVRC-2010 SIFT bag-of-words (SBOW) release -> one HDF5 file for `hdf5:`.

Dauphin & Bengio (2013, "Big neural networks waste capacity", section 2)
train their MLPs on the features that the Large Scale Visual Recognition
Challenge 2010 distributed with its images: SIFT descriptors quantised by
K-means into a vocabulary of 1000 visual words. This module turns that
release into the flat features/labels file that `tfcapacity.data.hdf5` reads
lazily (`--dataset=hdf5:sbow_train.h5 --test_dataset=hdf5:sbow_val.h5`).

The release, as documented in the LSVRC-2010 development kit:

* `<WNID>.sbow.mat`, one per training synset (in the SBOW directory or its
  `train/` subdirectory), and `val.0001.sbow.mat`, `val.0002.sbow.mat`, ...
  for the validation images, in order. Each is a MATLAB v5 file holding a
  struct array `image_sbow` with fields `ID` (the image name, e.g.
  'n03710721_67') and `sbow`, a struct whose field `word` lists the 0-based
  visual word (0..999) of each of the image's descriptors; its other fields
  (descriptor positions and so on) are not used here.
* The devkit's `data/meta.mat`: a struct array `synsets` with fields
  `ILSVRC2010_ID` (1-based), `WNID`, `num_children`, ... The 1000 classes are
  the leaf synsets (no children), ILSVRC2010_ID 1..1000; the other entries
  are internal nodes of the hierarchy (in the release, ids 1001 and up). A
  training image's class index is its synset's ILSVRC2010_ID - 1, not the
  rank of its WNID in sorted order.
* The devkit's `data/ILSVRC2010_validation_ground_truth.txt`: the
  ILSVRC2010_ID of each validation image, one per line, in the order of the
  validation files and of the images within them.

Output layout (FORMAT_VERSION 1): `features` [n, 1000] float32, the word
histogram of each image (counts, or scaled to unit L1 or L2 norm; the devkit's
demo classifier uses L2), chunked by `chunk_rows` rows; `labels` [n] int64
class indices; `ids` [n] UTF-8 image names; file attributes `num_classes`
(which `hdf5:` reads), `num_words`, `split`, `normalize`, `num_files`,
`num_descriptors`, `num_empty`, `format_version`, `fingerprint` (a
SHA-256 of the `inputs` record below) and the converter's checkpoint
(`files_done`, `resume_file`, ...); `inputs`, a JSON string: the record of
the options and input files the file was made from. Training images are
ordered by class index, then by position in their file; validation images
keep the release's order.

Features are stored uncompressed by default, in chunks of 1024 rows (4 MB;
four chunks make one read block of the `hdf5:` reader): about 4 kB per row
(5 GB for the 1.26M training images), against about 0.55 kB with gzip.
`python benchmarks/hdf5_read.py` measures what each costs in read speed
through the `hdf5:` dataset (docs/capacity.md has its figures).
Compression more than halved the read rate there, so it is an option, not
the default.

Conversion streams one source file at a time into `<output>.partial` and
renames it to `<output>` only when complete. Rows reach the file in whole
chunks, each written once; after each source file a checkpoint (the first
source file with rows still in memory, and the rows on disk) is stored and
the file is flushed. The same command resumes from the checkpoint, dropping
rows written after it and re-reading only the one or two files whose rows
were still in memory.

A partial file is resumed only with the inputs and options it was started
with (--overwrite and --progress may differ). Its `inputs` record holds the
options that change the output (split, normalize, chunk_rows,
compression), every source file's real path, class label, size and
modification time (hashing the files would cost as much as converting
them) and a SHA-256 of the devkit files read. A partial file whose record
differs, or that holds none, is refused with one line saying what differs:
delete it to start afresh, or rerun with the original inputs. It is only
read until every check has passed, so a refused command leaves it, like
the output, byte for byte as it was. A partial file that a kill left
unreadable (HDF5 files are not crash-safe: it does not open, or its record
or last chunk does not read back) is ours and is started afresh, with a
warning. A source file that changes while it is read stops the conversion.
An error after the partial file was opened says where it is.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import sys

from absl import logging
import h5py
import numpy as np
import scipy.io

from tfcapacity.errors import UserError

NUM_WORDS = 1000
NUM_CLASSES = 1000
FORMAT_VERSION = 1
SPLITS = ("train", "val")
NORMALIZE = ("none", "l1", "l2")
# HDF5 filters of the features by --compression (see the module docstring).
_FILTERS = {"none": {}, "gzip": {"compression": "gzip", "compression_opts": 1},
            "lzf": {"compression": "lzf"}}
COMPRESSION = tuple(_FILTERS)
META_FILE = os.path.join("data", "meta.mat")
GROUND_TRUTH_FILE = os.path.join("data",
                                 "ILSVRC2010_validation_ground_truth.txt")
PARTIAL_SUFFIX = ".partial"

_TRAIN_NAME = re.compile(r"^(n\d+)\.sbow\.mat$")
_VAL_NAME = re.compile(r"^val\.(\d+)\.sbow\.mat$")


@dataclasses.dataclass(frozen=True)
class Source:
  """One `.sbow.mat` file and, for training files, its class index."""
  path: str
  label: int | None = None


# -- reading the release -------------------------------------------------


def _loadmat(path: str, variable: str, what: str) -> dict:
  """The MATLAB variable `variable` of `path`, as nested mat_structs."""
  if not os.path.isfile(path):
    raise UserError(f"{path} not found; {what}")
  try:
    contents = scipy.io.loadmat(path, squeeze_me=True, struct_as_record=False,
                                variable_names=[variable])
  # scipy raises many types (ValueError, MatReadError, NotImplementedError for
  # v7.3 files, zlib and struct errors) on a file it cannot parse.
  except Exception as e:  # pylint: disable=broad-except
    first = str(e).splitlines()[0] if str(e) else type(e).__name__
    raise UserError(f"{path} is not a readable MATLAB v5 file ({first}); "
                    f"{what}") from None
  if variable not in contents:
    raise UserError(f"{path} holds no variable {variable!r}; {what}")
  return contents[variable]


def _records(value) -> list:
  """The elements of a struct array loaded with squeeze_me (0, 1 or more)."""
  if isinstance(value, np.ndarray):
    return list(value.reshape(-1))
  return [value]


def _field(record, name: str, path: str, where: str):
  if not hasattr(record, name):
    fields = getattr(record, "_fieldnames", None)
    raise UserError(
        f"{path}: {where} has no field {name!r} (fields: {fields}); the file "
        f"does not follow the LSVRC-2010 SBOW layout")
  return getattr(record, name)


def _integer(value, path: str, where: str) -> int:
  arr = np.asarray(value)
  if (arr.size != 1 or arr.dtype.kind not in "biuf"
      or not np.isfinite(arr).all() or arr.reshape(-1)[0] % 1):
    raise UserError(f"{path}: {where} must be one integer, found {value!r}; "
                    f"the file does not follow the LSVRC-2010 devkit layout")
  return int(arr.reshape(-1)[0])


def read_synsets(devkit_dir: str) -> dict[str, int]:
  """The class index (ILSVRC2010_ID - 1) of each leaf synset, by WNID.

  Args:
    devkit_dir: the LSVRC-2010 devkit, holding `data/meta.mat`.

  Raises:
    UserError: a missing or malformed meta.mat.
  """
  path = os.path.join(devkit_dir, META_FILE)
  what = "point --devkit_dir at the unpacked LSVRC-2010 devkit"
  records = _records(_loadmat(path, "synsets", what))
  classes, seen = {}, set()
  for i, rec in enumerate(records):
    where = f"synsets({i + 1})"
    ident = _integer(_field(rec, "ILSVRC2010_ID", path, where), path,
                     where + ".ILSVRC2010_ID")
    wnid = _field(rec, "WNID", path, where)
    if not isinstance(wnid, str) or not wnid:
      raise UserError(f"{path}: {where}.WNID must be a string, found "
                      f"{wnid!r}; the file is not the devkit's meta.mat")
    children = 0
    if hasattr(rec, "num_children"):
      children = _integer(rec.num_children, path, where + ".num_children")
    if children or not 1 <= ident <= NUM_CLASSES:
      continue  # An internal node of the hierarchy, not a class.
    if ident in seen or wnid in classes:
      raise UserError(f"{path}: ILSVRC2010_ID {ident} or WNID {wnid} appears "
                      f"twice among the leaf synsets; the file is corrupt")
    seen.add(ident)
    classes[wnid] = ident - 1
  if not classes:
    raise UserError(f"{path} lists no synset with ILSVRC2010_ID in "
                    f"1..{NUM_CLASSES}; {what}")
  return classes


def read_val_labels(devkit_dir: str, classes: dict[str, int]) -> np.ndarray:
  """Class indices of the validation images, in the release's order.

  Args:
    devkit_dir: the LSVRC-2010 devkit, holding
      `data/ILSVRC2010_validation_ground_truth.txt`.
    classes: `read_synsets(devkit_dir)`, to check that labels are classes.

  Raises:
    UserError: a missing file, or a line that is not a leaf ILSVRC2010_ID.
  """
  path = os.path.join(devkit_dir, GROUND_TRUTH_FILE)
  if not os.path.isfile(path):
    raise UserError(f"{path} not found; point --devkit_dir at the unpacked "
                    f"LSVRC-2010 devkit")
  with open(path, encoding="ascii", errors="replace") as f:
    lines = f.read().splitlines()
  while lines and not lines[-1].strip():
    lines.pop()
  known = set(classes.values())
  labels = np.empty(len(lines), np.int64)
  for i, line in enumerate(lines):
    text = line.strip()
    if not re.fullmatch(r"\d+", text) or int(text) - 1 not in known:
      raise UserError(
          f"{path}, line {i + 1}: expected the ILSVRC2010_ID of a leaf "
          f"synset of meta.mat, found {text!r}; use the devkit's ground-truth "
          f"file")
    labels[i] = int(text) - 1
  if not len(labels):
    raise UserError(f"{path} is empty; use the devkit's ground-truth file")
  return labels


def _source_dir(sbow_dir: str, split: str, pattern) -> tuple[str, list[str]]:
  """The directory holding the split's files (sbow_dir or sbow_dir/<split>)."""
  if not os.path.isdir(sbow_dir):
    raise UserError(f"--sbow_dir={sbow_dir} is not a directory; point it at "
                    f"the unpacked SBOW release")
  for directory in (sbow_dir, os.path.join(sbow_dir, split)):
    if os.path.isdir(directory):
      names = [n for n in os.listdir(directory) if pattern.match(n)]
      if names:
        return directory, names
  example = "n01440764.sbow.mat" if split == "train" else "val.0001.sbow.mat"
  raise UserError(f"no {split} SBOW files (like {example}) in {sbow_dir} or "
                  f"{os.path.join(sbow_dir, split)}; point --sbow_dir at the "
                  f"unpacked {split} SBOW files")


def list_sources(sbow_dir: str, split: str,
                 classes: dict[str, int]) -> list[Source]:
  """The split's source files in output order.

  Training files are ordered by class index and labelled with it; validation
  files by their number, which must run 1, 2, ... without gaps.

  Raises:
    UserError: no files, a training WNID that is not a class, or a gap.
  """
  if split == "train":
    directory, names = _source_dir(sbow_dir, split, _TRAIN_NAME)
    sources = []
    for name in names:
      wnid = _TRAIN_NAME.match(name).group(1)
      if wnid not in classes:
        raise UserError(
            f"{os.path.join(directory, name)}: WNID {wnid} is not a leaf "
            f"synset (ILSVRC2010_ID 1..{NUM_CLASSES}) of the devkit's "
            f"meta.mat; remove the file or use the matching devkit")
      sources.append(Source(os.path.join(directory, name), classes[wnid]))
    sources.sort(key=lambda s: s.label)
    if len(sources) < len(classes):
      logging.warning("%d of the %d classes have no training file in %s.",
                      len(classes) - len(sources), len(classes), directory)
    return sources
  directory, names = _source_dir(sbow_dir, split, _VAL_NAME)
  numbered = sorted((int(_VAL_NAME.match(n).group(1)), n) for n in names)
  for expected, (number, name) in enumerate(numbered, start=1):
    if number != expected:
      problem = (f"two files have number {number} ({name} and "
                 f"{numbered[expected - 2][1]})" if number < expected else
                 f"validation file number {expected} is missing (next is "
                 f"{name})")
      raise UserError(
          f"{directory}: {problem}; the files must be numbered 1, 2, ... "
          f"without gaps or duplicates: copy the complete release")
  return [Source(os.path.join(directory, n)) for _, n in numbered]


def read_sbow(path: str) -> tuple[list[str], list[np.ndarray]]:
  """The image names and visual-word arrays (int64) of one .sbow.mat file.

  Raises:
    UserError: an unreadable file, a missing field, or a word outside
      0..NUM_WORDS-1.
  """
  what = "replace it with the file from the LSVRC-2010 SBOW release"
  records = _records(_loadmat(path, "image_sbow", what))
  ids, words = [], []
  for i, rec in enumerate(records):
    where = f"image_sbow({i + 1})"
    name = _field(rec, "ID", path, where)
    if not isinstance(name, str):
      raise UserError(f"{path}: {where}.ID must be a string, found "
                      f"{name!r}; {what}")
    sbow = _field(rec, "sbow", path, where)
    if isinstance(sbow, np.ndarray) and sbow.size == 0:
      word = np.zeros(0)  # An image without descriptors.
    else:
      word = _field(sbow, "word", path, f"{where}.sbow")
    # squeeze_me turns one descriptor into a scalar and none into [].
    word = np.asarray(word).reshape(-1)
    if word.dtype.kind not in "biuf":
      raise UserError(f"{path}: {where}.sbow.word ({name}) must be numeric, "
                      f"found dtype {word.dtype}; {what}")
    bad = (word < 0) | (word >= NUM_WORDS)
    if word.dtype.kind == "f":
      with np.errstate(invalid="ignore"):
        bad |= ~np.isfinite(word) | (word % 1 != 0)
    if bad.any():
      raise UserError(
          f"{path}: image {name} has visual word {word[bad][0].item()!r}, "
          f"not an integer in 0..{NUM_WORDS - 1}; {what}")
    ids.append(name)
    words.append(word.astype(np.int64))
  return ids, words


# -- histograms ------------------------------------------------------------


def histograms(words: list[np.ndarray], normalize: str = "none") -> np.ndarray:
  """[len(words), NUM_WORDS] float32 word counts, optionally L1/L2-scaled.

  A histogram of an image without descriptors stays zero under either norm.
  """
  if normalize not in NORMALIZE:
    raise UserError(f"unknown normalize {normalize!r}; choose one of: "
                    f"{', '.join(NORMALIZE)}")
  n = len(words)
  lengths = np.array([len(w) for w in words], np.int64)
  flat = np.concatenate(words) if n else np.zeros(0, np.int64)
  rows = np.repeat(np.arange(n, dtype=np.int64), lengths)
  counts = np.bincount(rows * NUM_WORDS + flat, minlength=n * NUM_WORDS)
  hist = counts.reshape(n, NUM_WORDS).astype(np.float64)
  if normalize != "none":
    norm = (hist.sum(axis=1) if normalize == "l1"
            else np.sqrt(np.square(hist).sum(axis=1)))
    hist /= np.where(norm > 0, norm, 1.0)[:, None]
  return hist.astype(np.float32)


# -- writing -------------------------------------------------------------

_DATASETS = ("features", "labels", "ids")
# The arguments that change the output, named as the converter's flags.
_OPTIONS = ("split", "normalize", "chunk_rows", "compression")
# The dataset of the partial (and final) file that records its inputs.
_INPUTS = "inputs"


def _file_digest(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


def _stat(path: str) -> list[int]:
  """[size, modification time in ns]: what the record holds of a source."""
  st = os.stat(path)
  return [st.st_size, st.st_mtime_ns]


def _inputs(options: dict, devkit_dir: str, sources: list[Source]) -> dict:
  """The record of everything that determines the output's contents.

  Source files are recorded by real path, label, size and modification
  time (hashing their contents would take about as long as converting
  them); the small devkit files by a SHA-256 of their bytes, so that a moved
  but unchanged devkit still matches.
  """
  truth = None
  if options["split"] == "val":
    truth = _file_digest(os.path.join(devkit_dir, GROUND_TRUTH_FILE))
  return {
      "format_version": FORMAT_VERSION,
      "options": {k: options[k] for k in _OPTIONS},
      "devkit": {"meta.mat": _file_digest(os.path.join(devkit_dir,
                                                       META_FILE)),
                 "ground_truth": truth},
      "sources": [[os.path.realpath(s.path), s.label, *_stat(s.path)]
                  for s in sources],
  }


def _fingerprint(inputs: dict) -> str:
  """The digest of `_inputs`: the files' `fingerprint` attribute."""
  text = json.dumps(inputs, sort_keys=True)
  return hashlib.sha256(text.encode()).hexdigest()


def _differences(old: dict, new: dict) -> list[str]:
  """What differs between the recorded inputs `old` and `new`, in words."""
  if old["format_version"] != new["format_version"]:
    return [f"it was written in format {old['format_version']}, not "
            f"{new['format_version']}"]
  why = []
  changed = [k for k in _OPTIONS if old["options"][k] != new["options"][k]]
  if changed:
    was = " ".join(f"--{k}={old['options'][k]}" for k in changed)
    now = " ".join(f"--{k}={new['options'][k]}" for k in changed)
    why.append(f"it was started with {was}, not {now}")
  old_paths = [s[0] for s in old["sources"]]
  new_paths = [s[0] for s in new["sources"]]
  if old_paths != new_paths:
    old_set, new_set = set(old_paths), set(new_paths)
    gone = [p for p in old_paths if p not in new_set]
    added = [p for p in new_paths if p not in old_set]
    if gone:
      detail = (f"{len(gone)} of its {len(old_paths)}, e.g. {gone[0]}, are "
                f"not among the {len(new_paths)} now listed")
    elif added:
      detail = (f"{len(added)} of the {len(new_paths)} now listed, e.g. "
                f"{added[0]}, were not among its {len(old_paths)}")
    else:
      detail = "in another order"
    why.append(f"it was started from other source files ({detail})")
  else:
    if [s[1] for s in old["sources"]] != [s[1] for s in new["sources"]]:
      why.append("its source files had other class labels")
    modified = [n[0] for o, n in zip(old["sources"], new["sources"])
                if o[2:] != n[2:]]
    if modified:
      more = (f" (and {len(modified) - 1} more)" if len(modified) > 1
              else "")
      why.append(f"source file {modified[0]}{more} changed since it was "
                 f"started (size or modification time)")
  for name, path in (("meta.mat", META_FILE),
                     ("ground_truth", GROUND_TRUTH_FILE)):
    if old["devkit"][name] != new["devkit"][name]:
      why.append(f"the devkit's {path} differs from the one it was started "
                 f"with")
  return why


def _create(path, chunk_rows, compression, attrs, inputs) -> h5py.File:
  f = h5py.File(path, "w")
  comp = _FILTERS[compression]
  f.create_dataset("features", (0, NUM_WORDS), np.float32,
                   maxshape=(None, NUM_WORDS), chunks=(chunk_rows, NUM_WORDS),
                   shuffle=bool(comp), **comp)
  f.create_dataset("labels", (0,), np.int64, maxshape=(None,),
                   chunks=(chunk_rows,))
  f.create_dataset("ids", (0,), h5py.string_dtype("utf-8"),
                   maxshape=(None,), chunks=(chunk_rows,))
  f.create_dataset(_INPUTS, data=json.dumps(inputs, sort_keys=True),
                   dtype=h5py.string_dtype("utf-8"))
  f.attrs.update(attrs)
  f.attrs.update(files_done=0, resume_file=0, resume_skip=0, disk_rows=0,
                 num_descriptors=0, num_empty=0)
  f.flush()
  return f


def _damage(f: h5py.File, num_sources: int, chunk_rows: int) -> str | None:
  """Why the partial file `f` cannot continue from its checkpoint, or None.

  Reads only: rows written after the checkpoint are dropped later, by
  `_reopen`.
  """
  a = f.attrs
  done, first, skip = (int(a[k]) for k in ("files_done", "resume_file",
                                            "resume_skip"))
  rows = int(a["disk_rows"])
  if not 0 <= first <= done <= num_sources or skip < 0 or rows < 0:
    return "its checkpoint is inconsistent"
  for name in _DATASETS:
    dset = f[name]
    if dset.shape[0] < rows:
      return f"{name} holds fewer rows than its checkpoint"
    # Rows up to the checkpoint fill whole chunks (but the last), each
    # written once; chunks beyond it are dropped on resuming.
    kept = sum(dset.id.get_chunk_info(i).chunk_offset[0] < rows
               for i in range(dset.id.get_num_chunks()))
    if kept != -(-rows // chunk_rows):
      return f"chunks of {name} are missing"
    if rows:
      dset[max(0, rows - chunk_rows):rows]  # The last chunk must decode.
  return None


def _first_line(e: BaseException) -> str:
  return str(e).splitlines()[0] if str(e) else type(e).__name__


def _inspect_partial(path: str, inputs: dict,
                     chunk_rows: int) -> tuple[bool, str | None]:
  """Whether to resume the partial file at `path`, and what to log about it.

  The file is only read, so a refused command leaves it byte for byte as it
  was. It is resumed when it records exactly `inputs` and its checkpoint is
  intact. HDF5 files are not crash-safe: one that a kill left unreadable
  (it does not open, or its record or checkpoint does not read back) is
  ours to start afresh, with a warning.

  Returns:
    (resume, note): note is the warning to log once every check passed.

  Raises:
    UserError: the file records other inputs or options, or none (an older
      converter's file, or not one of the converter's), is locked by another
      process, or is not a file.
  """
  if not os.path.lexists(path):
    return False, None
  if not os.path.isfile(path):
    raise UserError(f"{path} is in the way of the partial output and is not "
                    f"a file; remove it")
  afresh = f"Starting afresh: the partial file {path} is unreadable"
  try:
    f = h5py.File(path, "r")
  except OSError as e:
    if "unable to lock" in str(e).lower():
      raise UserError(f"{path} is locked: is another conversion writing it? "
                      f"Wait for it, or choose another --output") from None
    return False, f"{afresh} ({_first_line(e)})."
  fix = ("delete it to start afresh, or rerun with the inputs and options "
         "it was started with")
  with f:
    # Any failure to read our own record means the file is damaged.
    try:
      text = f[_INPUTS].asstr()[()] if _INPUTS in f else None
    except Exception as e:  # pylint: disable=broad-except
      return False, f"{afresh} ({type(e).__name__}: {_first_line(e)})."
    try:
      why = (["it holds no record of its inputs (an older converter wrote "
              "it, or it is not a partial output)"] if text is None
             else _differences(json.loads(text), inputs))
    except (ValueError, KeyError, TypeError, IndexError):
      why = ["its record of its inputs is malformed"]
    if why:
      raise UserError(f"cannot resume {path}: {'; '.join(why)}; {fix}")
    try:
      damage = _damage(f, len(inputs["sources"]), chunk_rows)
    except Exception as e:  # pylint: disable=broad-except
      damage = f"it is damaged ({type(e).__name__}: {_first_line(e)})"
  if damage:
    return False, f"Starting afresh: cannot resume {path}: {damage}."
  return True, None


def _reopen(path: str) -> h5py.File:
  """The partial file `path`, checked by `_inspect_partial`, cut back to its
  checkpoint: rows written after it are dropped without reading them."""
  f = h5py.File(path, "r+")
  rows = int(f.attrs["disk_rows"])
  for name in _DATASETS:
    if f[name].shape[0] > rows:
      f[name].resize(rows, axis=0)
  return f


@dataclasses.dataclass
class _Piece:
  """The rows of one source file that are not on disk yet."""
  index: int
  size: int
  hist: np.ndarray
  labels: np.ndarray
  ids: np.ndarray
  descriptors: int
  empty: int


class _Writer:
  """Appends rows to the partial file in whole chunks, each written once.

  Rows that do not fill a chunk wait in memory, so a kill never leaves a
  half-rewritten chunk behind the checkpoint. The checkpoint names the first
  source file with rows not on disk (`resume_file`) and how many of its rows
  are (`resume_skip`): a resumed conversion re-reads only the files with
  rows in the lost tail (one or two) and never touches chunks on disk.
  `num_descriptors` and `num_empty` cover the files before `resume_file`.
  """

  def __init__(self, f: h5py.File, chunk_rows: int):
    self.f, self.chunk_rows = f, chunk_rows
    self.disk_rows = int(f.attrs["disk_rows"])
    self.descriptors = int(f.attrs["num_descriptors"])
    self.empty = int(f.attrs["num_empty"])
    self.pieces: list[_Piece] = []

  def _pending(self) -> int:
    return sum(len(p.labels) for p in self.pieces)

  def _write(self, n: int) -> None:
    """Moves the first `n` pending rows to disk."""
    if not n:
      return
    lo, hi = self.disk_rows, self.disk_rows + n
    for name in ("hist", "labels", "ids"):
      values = np.concatenate([getattr(p, name) for p in self.pieces])[:n]
      dset = self.f["features" if name == "hist" else name]
      dset.resize(hi, axis=0)
      dset[lo:hi] = values
    self.disk_rows = hi
    for p in self.pieces:
      taken = min(n, len(p.labels))
      n -= taken
      p.hist, p.labels, p.ids = p.hist[taken:], p.labels[taken:], p.ids[taken:]

  def add(self, piece: _Piece) -> None:
    """Queues a file's rows and writes all whole chunks."""
    self.pieces.append(piece)
    self._write(self._pending() // self.chunk_rows * self.chunk_rows)

  def finish(self) -> None:
    """Writes the last, partial chunk."""
    self._write(self._pending())

  def checkpoint(self, files_done: int) -> None:
    """Records the resume point after `files_done` source files, flushed."""
    while self.pieces and not len(self.pieces[0].labels):
      done = self.pieces.pop(0)
      self.descriptors += done.descriptors
      self.empty += done.empty
    first = self.pieces[0] if self.pieces else None
    self.f.attrs.update(
        files_done=files_done,
        resume_file=first.index if first else files_done,
        resume_skip=first.size - len(first.labels) if first else 0,
        disk_rows=self.disk_rows, num_descriptors=self.descriptors,
        num_empty=self.empty)
    self.f.flush()


def convert(sbow_dir: str, devkit_dir: str, split: str, output: str, *,
            normalize: str = "none", chunk_rows: int = 1024,
            compression: str = "none", overwrite: bool = False,
            progress: bool = False, stop_after_files: int | None = None
            ) -> dict:
  """Converts one split of the SBOW release into the HDF5 file `output`.

  All input that can be checked before reading the SBOW files is checked
  before anything is written (and before the partial file's notes are
  logged), and `output` is only ever replaced by a complete file, so an
  error never damages an existing output. A partial file of other inputs
  is refused, not replaced (module docstring).

  Args:
    sbow_dir: directory of the split's `.sbow.mat` files (or its parent,
      holding `train/` or `val/`).
    devkit_dir: the LSVRC-2010 devkit (`data/meta.mat`, ground truth).
    split: 'train' or 'val'.
    output: the HDF5 file to write.
    normalize: 'none' (counts), 'l1' or 'l2'.
    chunk_rows: rows per HDF5 chunk.
    compression: 'none', 'gzip' (level 1) or 'lzf' for the features, each
      with HDF5's byte shuffle.
    overwrite: replace an existing `output`.
    progress: show a progress bar over source files on stderr.
    stop_after_files: stop (leaving the partial file) once this many source
      files are done; for converting in installments and for tests.

  Returns:
    A summary: `output`, `complete`, `files`, `files_done`, `rows`,
    `resumed_at` (the source file this run started from),
    `num_descriptors`, `num_empty`.

  Raises:
    UserError: bad arguments, a missing or malformed input, an existing
      output without `overwrite`, a partial file that records other inputs
      or options. An error after the partial file was opened says where it
      is and how to resume or discard it; an OSError then is reported as a
      UserError too.
  """
  if split not in SPLITS:
    raise UserError(f"unknown split {split!r}; choose one of: "
                    f"{', '.join(SPLITS)}")
  if normalize not in NORMALIZE:
    raise UserError(f"unknown normalize {normalize!r}; choose one of: "
                    f"{', '.join(NORMALIZE)}")
  if compression not in COMPRESSION:
    raise UserError(f"unknown compression {compression!r}; choose one of: "
                    f"{', '.join(COMPRESSION)}")
  if chunk_rows < 1:
    raise UserError(f"--chunk_rows={chunk_rows} must be at least 1")
  if os.path.isdir(output):
    raise UserError(f"--output={output} is a directory; name a file")
  if os.path.exists(output) and not overwrite:
    raise UserError(f"--output={output} already exists; pass --overwrite to "
                    f"replace it, or choose another --output")
  if not os.path.isdir(devkit_dir):
    raise UserError(f"--devkit_dir={devkit_dir} is not a directory; point it "
                    f"at the unpacked LSVRC-2010 devkit")
  classes = read_synsets(devkit_dir)
  val_labels = read_val_labels(devkit_dir, classes) if split == "val" else None
  sources = list_sources(sbow_dir, split, classes)
  truth = os.path.join(devkit_dir, GROUND_TRUTH_FILE)

  options = dict(split=split, normalize=normalize, chunk_rows=chunk_rows,
                 compression=compression)
  inputs = _inputs(options, devkit_dir, sources)
  partial = output + PARTIAL_SUFFIX
  resume, note = _inspect_partial(partial, inputs, chunk_rows)

  # Every check passed: from here on the partial file is written.
  if note:
    logging.warning("%s", note)
  summary = {"output": output, "complete": False, "files": len(sources),
             "files_done": 0}
  try:
    if _write(partial, resume, inputs, sources, val_labels, truth, summary,
              progress=progress, stop_after_files=stop_after_files):
      os.replace(partial, output)
      summary["complete"] = True
  except (UserError, OSError) as e:
    hint = ("; check the paths, permissions and free disk space"
            if isinstance(e, OSError) else "")
    kept = (f"the partial output {partial} is kept ({summary['files_done']} "
            f"of {len(sources)} source files done): rerun the same command "
            f"to resume, or delete it to start afresh (needed once a source "
            f"file or the devkit is replaced)")
    if not os.path.exists(partial):
      kept = f"no partial output was left at {partial}"
    raise UserError(f"{_first_line(e)}{hint}; {kept}") from None
  if not summary["complete"]:
    logging.info("Stopped after %d of %d source files; rerun to continue.",
                 summary["files_done"], len(sources))
    return summary
  rows = summary["rows"]
  logging.info(
      "Wrote %s: %d %s images from %d files, %d descriptors (%.1f per "
      "image), %d images without descriptors, normalize=%s.", output, rows,
      split, len(sources), summary["num_descriptors"],
      summary["num_descriptors"] / rows, summary["num_empty"], normalize)
  return summary


def _write(partial: str, resume: bool, inputs: dict, sources: list[Source],
           val_labels: np.ndarray | None, truth: str, summary: dict, *,
           progress: bool, stop_after_files: int | None) -> bool:
  """Converts `sources` into `partial`, continuing it when `resume`.

  Updates `summary` as files are done, so a caller knows how far an error
  got. Returns whether `partial` is complete (renaming it is the caller's).
  """
  options = inputs["options"]
  split, chunk_rows = options["split"], options["chunk_rows"]
  os.makedirs(os.path.dirname(os.path.abspath(partial)), exist_ok=True)
  if resume:
    f = _reopen(partial)
    summary["files_done"] = int(f.attrs["files_done"])
    if summary["files_done"]:
      logging.info("Resuming %s after %d of %d source files.", partial,
                   summary["files_done"], len(sources))
  else:
    f = _create(partial, chunk_rows, options["compression"], {
        "format_version": FORMAT_VERSION,
        "source": "LSVRC-2010 SBOW (SIFT bag of visual words)",
        "split": split, "normalize": options["normalize"],
        "num_files": len(sources), "num_words": NUM_WORDS,
        "num_classes": NUM_CLASSES, "fingerprint": _fingerprint(inputs),
        "complete": False}, inputs)
  bar = None
  try:
    writer = _Writer(f, chunk_rows)
    start, skip = int(f.attrs["resume_file"]), int(f.attrs["resume_skip"])
    summary["resumed_at"] = start
    # The output row of the first image of source file `start`.
    row = writer.disk_rows - skip
    stop = len(sources)
    if stop_after_files is not None:
      stop = min(stop, max(start, stop_after_files))
    if progress:
      import tqdm  # pylint: disable=g-import-not-at-top
      bar = tqdm.tqdm(total=len(sources), initial=start, unit="file",
                      desc=f"SBOW {split}", file=sys.stderr)
    for k in range(start, stop):
      source = sources[k]
      ids, words = read_sbow(source.path)
      # The rows must come from the file the record describes.
      if _stat(source.path) != inputs["sources"][k][2:]:
        raise UserError(f"{source.path} changed while it was being "
                        f"converted (size or modification time)")
      n = len(ids)
      if split == "train":
        labels = np.full(n, source.label, np.int64)
      else:
        labels = val_labels[row:row + n]
        if len(labels) < n:
          raise UserError(
              f"{truth} has {len(val_labels)} lines but the validation files "
              f"hold more images (at least {row + n}, through "
              f"{os.path.basename(source.path)}); use the ground truth that "
              f"matches the SBOW release")
      cut = skip if k == start else 0
      writer.add(_Piece(
          index=k, size=n, hist=histograms(words[cut:], options["normalize"]),
          labels=labels[cut:], ids=np.array(ids[cut:], dtype=object),
          descriptors=sum(len(w) for w in words),
          empty=sum(not len(w) for w in words)))
      row += n
      if k + 1 == len(sources):
        writer.finish()
      writer.checkpoint(k + 1)
      summary["files_done"] = k + 1
      if bar is not None:
        bar.update(1)
    summary.update(files_done=int(f.attrs["files_done"]),
                   rows=writer.disk_rows,
                   num_descriptors=writer.descriptors, num_empty=writer.empty)
    if summary["files_done"] < len(sources):
      return False
    rows = writer.disk_rows
    if val_labels is not None and rows != len(val_labels):
      raise UserError(
          f"{truth} has {len(val_labels)} lines but the {len(sources)} "
          f"validation files hold {rows} images; use the ground truth that "
          f"matches the SBOW release")
    if not rows:
      raise UserError(f"the {split} SBOW files hold no images; point "
                      f"--sbow_dir at the SBOW release")
    f.attrs["num_examples"] = rows
    f.attrs["complete"] = True
    return True
  except BaseException:
    if bar is not None:
      bar.leave = False  # An error ends in one line, not a bar and a line.
    raise
  finally:
    if bar is not None:
      bar.close()
    f.close()
