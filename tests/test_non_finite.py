"""Non-finite and unresolved values: how they are written, read and logged.

* `rundir.write_json` writes NaN and inf as null, named in the holding
  dict's `non_finite`; `read_json`, `read_results` and `series` read them
  back, and still read the "inf"/"nan" strings of older files.
* `statistics.gram_spectrum` says when a least eigenvalue (and with it the
  condition number) is beyond the resolution of the Gram matrix's precision,
  checked against numpy's float64 `eigvalsh` of the exact matrix.
* `training.scalars.finite_scalars` keeps what TensorBoard can plot.
"""

import json
import math
import types

import numpy as np
import pytest

from tfcapacity import rundir
from tfcapacity.gradients import measure
from tfcapacity.gradients import statistics as st
from tfcapacity.studies import capacity
from tfcapacity.studies import maxibatch
from tfcapacity.studies import random_labels
from tfcapacity.training import scalars as scalars_lib

INF, NAN = math.inf, math.nan
EPS32 = float(np.finfo(np.float32).eps)


def strict_load(text: str):
  """json.loads that refuses the NaN/Infinity tokens JSON does not have."""
  def refuse(token):
    raise AssertionError(f"non-JSON token {token}")
  return json.loads(text, parse_constant=refuse)


def same(a, b) -> bool:
  """Equality of nested values, NaN equal to NaN."""
  if isinstance(a, float) and isinstance(b, float):
    return (math.isnan(a) and math.isnan(b)) or a == b
  if isinstance(a, dict) and isinstance(b, dict):
    return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
  if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
    return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
  return type(a) is type(b) and a == b


def strings_in(value) -> list[str]:
  if isinstance(value, str):
    return [value]
  if isinstance(value, dict):
    return [s for v in value.values() for s in strings_in(v)]
  if isinstance(value, list):
    return [s for v in value for s in strings_in(v)]
  return []


RESULTS = {
    "status": "completed", "learning_rate_used": 0.1, "layers": None,
    "history": [
        {"step": 0, "epoch": 0, "train_loss": 2.0, "train_top1_error": 0.5},
        {"step": 10, "epoch": 1, "train_loss": INF, "train_top1_error": NAN},
    ],
    "measurements": [
        {"step": 0, "epoch": 0, "gradients/gradient_diversity": 0.25,
         "gradients/features_condition_number": NAN,
         "gradients/features_resolved": 0.0},
        {"step": 10, "epoch": 1, "gradients/gradient_diversity": INF,
         "gradients/noise_scale_simple": -INF},
    ],
    "curve": [1.0, NAN, [INF, 2.0, -INF]],
    "nested": {"inner": {"x": NAN, "ok": 1}, "rows": [{"y": INF}]},
}


def test_write_json_gives_null_and_reasons(tmp_path):
  path = str(tmp_path / "results.json")
  rundir.write_json(path, RESULTS)
  raw = strict_load(open(path).read())
  # No string where a number was: the only strings are the status and the
  # reasons.
  reasons = {"inf", "-inf", "nan"}
  assert set(strings_in(raw)) == {"completed"} | reasons
  assert raw["history"][1] == {
      "step": 10, "epoch": 1, "train_loss": None, "train_top1_error": None,
      "non_finite": {"train_loss": "inf", "train_top1_error": "nan"}}
  assert "non_finite" not in raw["history"][0]
  assert raw["measurements"][0]["non_finite"] == {
      "gradients/features_condition_number": "nan"}
  assert raw["curve"] == [1.0, None, [None, 2.0, None]]
  assert raw["non_finite"] == {"curve[1]": "nan", "curve[2][0]": "inf",
                               "curve[2][2]": "-inf"}
  assert raw["nested"]["inner"] == {"x": None, "ok": 1,
                                    "non_finite": {"x": "nan"}}
  assert raw["nested"]["rows"] == [{"y": None, "non_finite": {"y": "inf"}}]
  assert raw["layers"] is None and "layers" not in raw["non_finite"]
  # Read back whole: exactly the object written.
  assert same(rundir.read_json(path), RESULTS)
  assert same(rundir.read_results(str(tmp_path)), RESULTS)


@pytest.mark.parametrize("reader", ["raw", "read_results"])
def test_series_reads_the_nulls(tmp_path, reader):
  rundir.write_json(str(tmp_path / "results.json"), RESULTS)
  results = (json.load(open(tmp_path / "results.json")) if reader == "raw"
             else rundir.read_results(str(tmp_path)))
  loss = rundir.series(results, "train_loss")
  assert [p[:2] for p in loss] == [(0, 0), (10, 1)]
  assert loss[0][2] == 2.0 and loss[1][2] == INF
  assert math.isnan(rundir.series(results, "train_top1_error")[1][2])
  diversity = [v for _, _, v in rundir.series(
      results, "gradients/gradient_diversity")]
  assert diversity == [0.25, INF]
  assert rundir.series(results, "gradients/noise_scale_simple")[0][2] == -INF
  condition = rundir.series(results, "gradients/features_condition_number")
  assert len(condition) == 1 and math.isnan(condition[0][2])
  assert "non_finite" not in rundir.keys_with_prefix(results, "")


def test_a_null_without_a_reason_reads_as_nan():
  results = {"history": [{"step": 3, "epoch": 0, "train_loss": None}]}
  assert math.isnan(rundir.series(results, "train_loss")[0][2])
  assert math.isnan(rundir.number(None))
  assert rundir.row_number({"a": None, "non_finite": {"a": "-inf"}},
                           "a") == -INF


def test_old_files_with_strings_still_read(tmp_path):
  old = {"status": "completed",
         "history": [{"step": 0, "epoch": 0, "train_loss": "inf"},
                     {"step": 5, "epoch": 1, "train_loss": "nan"}],
         "measurements": [{"step": 5, "epoch": 1,
                           "gradients/gram_condition_number": "inf",
                           "gradients/noise_scale_simple": "-inf"}]}
  (tmp_path / "results.json").write_text(json.dumps(old))
  results = rundir.read_results(str(tmp_path))
  loss = rundir.series(results, "train_loss")
  assert loss[0][2] == INF and math.isnan(loss[1][2])
  assert rundir.series(results, "gradients/gram_condition_number")[0][2] \
      == INF
  assert rundir.series(results, "gradients/noise_scale_simple")[0][2] == -INF
  assert [rundir.number(s) for s in ("inf", "-inf")] == [INF, -INF]
  assert math.isnan(rundir.number("nan"))
  # A study reader meets the old strings and the new nulls alike.
  run = capacity.Run("r", {}, "completed", old["history"])
  assert math.isnan(run.final("train_loss"))
  steps, losses = random_labels.loss_curve(old["history"], {})
  assert list(steps) == [0, 5] and losses[0] == INF


def test_study_readers_take_nulls(tmp_path):
  path = str(tmp_path / "results.json")
  rundir.write_json(path, RESULTS)
  history = json.load(open(path))["history"]  # Raw: nulls, not floats.
  run = capacity.Run("r", {}, "diverged", history)
  assert run.final("train_loss") == INF
  assert math.isnan(run.final("train_top1_error"))
  steps, losses = random_labels.loss_curve(history, {})
  assert list(steps) == [0, 10] and list(losses) == [2.0, INF]
  line = {"alphas": [0.0, 0.5, 1.0], "train_loss": [0.1, INF, NAN],
          "train_top1_error": [0.0, 0.5, 0.0], "test_loss": [0.2, 0.3, 0.2],
          "test_top1_error": [0.1, 0.1, 0.1]}
  rundir.write_json(str(tmp_path / "line.json"), line)
  read = maxibatch.read_interpolation(str(tmp_path / "line.json"))
  assert same(read["train_loss"], [0.1, INF, NAN])
  rundir.write_json(str(tmp_path / "sharpness.json"), {"sharpness": INF})
  assert maxibatch.read_sharpness(str(tmp_path / "sharpness.json")) == INF


def test_a_row_read_raw_and_written_again_keeps_its_reasons(tmp_path):
  path = str(tmp_path / "a.json")
  rundir.write_json(path, {"rows": [{"x": INF, "y": 1.0}]})
  again = json.load(open(path))
  again["rows"][0]["z"] = NAN
  rundir.write_json(path, again)
  raw = strict_load(open(path).read())
  assert raw["rows"][0]["non_finite"] == {"x": "inf", "z": "nan"}
  assert same(rundir.read_json(path), {"rows": [{"x": INF, "y": 1.0,
                                                 "z": NAN}]})
  # A reason whose null was replaced by a number goes.
  again = json.load(open(path))
  again["rows"][0]["x"] = 2.0
  rundir.write_json(path, again)
  assert strict_load(open(path).read())["rows"][0]["non_finite"] == {
      "z": "nan"}
  with pytest.raises(ValueError, match="reserved"):
    rundir.json_safe({"non_finite": 3})


def test_finite_scalars_on_a_mix():
  scalars = {
      "train/loss": 0.5, "a/inf": INF, "a/minus_inf": -INF, "a/nan": NAN,
      "a/none": None, "timing/x_seconds": 2,
      "gradients/features_min_eigenvalue": 1e-12,
      "gradients/features_max_eigenvalue": 3.0,
      "gradients/features_condition_number": NAN,
      "gradients/features_min_below_float32": 1.0,
      "gradients/features_resolved": 0.0,
      "gradients/ntk_min_eigenvalue": 0.25,
      "gradients/ntk_condition_number": 12.0,
      "gradients/ntk_resolved": 1.0,
      "curvature/lambda_min_eigenvalue": 0.5,  # No flag: judged as a number.
  }
  kept, dropped = scalars_lib.finite_scalars(scalars)
  unresolved = "unresolved (beyond float32 resolution)"
  assert dropped == {
      "a/inf": "inf", "a/minus_inf": "-inf", "a/nan": "nan",
      "a/none": "not a number",
      "gradients/features_min_eigenvalue": unresolved,
      "gradients/features_condition_number": unresolved}
  assert kept == {k: float(v) for k, v in scalars.items()
                  if k not in dropped}
  assert list(kept) == [k for k in scalars if k not in dropped]
  assert all(type(v) is float for v in kept.values())
  _, dropped64 = scalars_lib.finite_scalars(scalars, dtype="float64")
  assert dropped64["gradients/features_condition_number"] == (
      "unresolved (beyond float64 resolution)")
  assert scalars_lib.describe({"b": "inf", "a": "nan"}) == "a: nan; b: inf"


def singular_gram(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """G = M M^T of 6 gradients in R^20, the last a copy of the first."""
  m = np.random.default_rng(seed).normal(size=(6, 20))
  m[5] = m[0]
  return m @ m.T, m


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rank_deficient_gram_is_unresolved_and_never_inf(seed, tmp_path):
  gram, m = singular_gram(seed)
  s = st.gram_spectrum(gram)
  eig = np.linalg.eigvalsh(gram)
  assert s["min_eigenvalue"] == pytest.approx(eig[0], abs=1e-9 * eig[-1])
  assert abs(s["min_eigenvalue"]) < 1e-12 * s["max_eigenvalue"]
  assert s["resolved"] == 0.0 and s["min_below_float32"] == 1.0
  assert math.isnan(s["condition_number"])
  assert not any(math.isinf(v) for v in s.values())
  # The same from the gradients' statistics and under a prefix.
  spectrum = st.named_spectrum(m @ m.T, "gradients/features")
  assert spectrum["gradients/features_resolved"] == 0.0
  kept, dropped = scalars_lib.finite_scalars(spectrum)
  assert set(dropped) == {"gradients/features_min_eigenvalue",
                          "gradients/features_condition_number"}
  assert set(dropped.values()) == {scalars_lib.unresolved_reason()}
  assert set(kept) == {"gradients/features_max_eigenvalue",
                       "gradients/features_min_below_float32",
                       "gradients/features_resolved"}
  # Written: null with a reason, never "inf".
  rundir.write_json(str(tmp_path / "s.json"), spectrum)
  raw = strict_load((tmp_path / "s.json").read_text())
  assert raw["gradients/features_condition_number"] is None
  assert raw["non_finite"] == {"gradients/features_condition_number": "nan"}
  assert "inf" not in (tmp_path / "s.json").read_text()


def designed_gradients(n: int, p: int, condition: float, seed: int):
  """n x p gradients M (float64) whose Gram M M^T has the given condition
  number: singular values log-spaced from 1 to condition^-1/2."""
  rng = np.random.default_rng(seed)
  u, _ = np.linalg.qr(rng.normal(size=(n, n)))
  v, _ = np.linalg.qr(rng.normal(size=(p, n)))
  sv = np.logspace(0, -0.5 * np.log10(condition), n)
  return (u * sv) @ v.T


@pytest.mark.parametrize("condition,seed", [(10.0, 0), (1e3, 1), (1e7, 2),
                                            (1e8, 3), (1e10, 4)])
def test_float32_gram_resolution_against_float64(condition, seed):
  n = 16
  m = designed_gradients(n, 64, condition, seed)
  exact = np.linalg.eigvalsh(m @ m.T)  # float64 throughout: the truth.
  m32 = m.astype(np.float32)
  gram32 = m32 @ m32.T  # Products and sums in float32.
  assert gram32.dtype == np.float32
  s = st.gram_spectrum(gram32)
  # The rule, computed here from the float64 truth.
  truth_resolved = exact[0] >= n * EPS32 * exact[-1]
  assert bool(s["resolved"]) == truth_resolved
  assert bool(s["resolved"]) == (condition < 1e6)  # 1/(16 eps32) = 5e5.
  if truth_resolved:
    assert s["condition_number"] == pytest.approx(exact[-1] / exact[0],
                                                  rel=1e-3)
  else:
    assert math.isnan(s["condition_number"])
    # What float32 computed is indeed not the least eigenvalue.
    assert abs(s["min_eigenvalue"] - exact[0]) > 0.1 * exact[0]
  assert s["max_eigenvalue"] == pytest.approx(exact[-1], rel=1e-5)
  # The same matrix in float64 resolves condition numbers up to ~1e14.
  s64 = st.gram_spectrum(m @ m.T, dtype="float64")
  assert s64["resolved"] == 1.0
  assert s64["condition_number"] == pytest.approx(exact[-1] / exact[0],
                                                  rel=1e-4)


def test_resolution_threshold_and_dtype():
  assert st.resolution(2.0, 10, "float32") == pytest.approx(20 * EPS32)
  assert st.resolution(-2.0, 10, "float64") == pytest.approx(
      20 * float(np.finfo(np.float64).eps))
  largest = 1.0
  edge = 10 * EPS32
  assert st.spectrum_resolved(edge * 1.01, largest, 10)
  assert not st.spectrum_resolved(edge * 0.99, largest, 10)
  assert not st.spectrum_resolved(0.0, largest, 10, "float64")
  assert not st.spectrum_resolved(-1.0, largest, 10)
  with pytest.raises(Exception, match="float32 or float64"):
    st.gram_spectrum(np.eye(3), dtype="float16")


def test_measure_precision_follows_the_variables():
  var = lambda dtype: types.SimpleNamespace(dtype=dtype)  # noqa: E731
  model32 = types.SimpleNamespace(trainable_variables=[var("float32")])
  model64 = types.SimpleNamespace(trainable_variables=[var("float64"),
                                                       var("float64")])
  assert measure.precision(model32) == "float32"
  assert measure.precision(model64) == "float64"
  assert measure.precision(model32, params=[var("<dtype: 'float64'>")]) \
      == "float64"
  assert measure.precision(object()) == "float32"
