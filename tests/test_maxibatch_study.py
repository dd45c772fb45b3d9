"""The maxi-batch study (papers/003): its report on hand-made runs."""

import json
import math
import os
import subprocess
import sys

import pytest

from tfcapacity.errors import UserError
from tfcapacity.studies import maxibatch
from tfcapacity.studies import sweep
import conftest  # tests/ is on sys.path (pytest rootdir conftest)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(ROOT, "tools", "maxibatch_study.py")
FLAGFILES = [os.path.join(ROOT, "flags", name) for name in (
    "maxibatch_resnet_digits_cpu.flags", "maxibatch_resnet32_cifar10.flags")]
GRID = [("batch_size", ["50", "1400"]), ("learning_rate", ["0.1", "0.3"])]
VARIANT_LINES = (
    "# maxibatch.variant: big_noise batch_size=1400 learning_rate=0.1 "
    "grad_noise=empirical grad_noise_reference=@batch_size=50,"
    "learning_rate=0.1\n"
    "# maxibatch.variant: big_lr1 batch_size=1400 learning_rate=1.0\n")


def history(train, test, lam, lam_test, dist, epochs=3):
  """Rows that fall linearly to the given final values."""
  rows = []
  for e in range(epochs + 1):
    f = e / epochs
    rows.append({"epoch": e, "step": 10 * e,
                 "train_top1_error": 0.9 - f * (0.9 - train),
                 "test_top1_error": 0.9 - f * (0.9 - test),
                 "train_loss": 2.3 - f, "test_loss": 2.4 - f,
                 "curvature/lambda_max": 10 + f * (lam - 10),
                 "curvature/lambda_max_test": 10 + f * (lam_test - 10),
                 "distance/total": f * dist})
  return rows


def write_run(study, name, m, lr, rows, status="completed",
              layout="measurements", **flags):
  """A run's results.json: the callbacks' scalars (curvature/, distance/)
  in `measurements` rows, as the loop writes them, or with
  `layout="callbacks_in_history"` in the evaluations' rows, as it wrote them
  before."""
  cell = os.path.join(study, name)
  os.makedirs(cell, exist_ok=True)
  steps = rows[-1]["step"] if rows else 0
  results = {"status": status, "steps": steps, "total_steps": steps,
             "flags": {"batch_size": m, "learning_rate": lr,
                       "lr_drop_epochs": ["2"], "grad_noise": "none",
                       "model_dir": cell, **flags},
             "history": rows}
  if layout == "measurements":
    def callback(key):
      return "/" in key
    results["history"] = [{k: v for k, v in r.items() if not callback(k)}
                          for r in rows]
    results["measurements"] = [
        {"epoch": r["epoch"], "step": r["step"],
         **{k: v for k, v in r.items() if callback(k)}} for r in rows]
  with open(os.path.join(cell, "results.json"), "w") as f:
    json.dump(results, f)
  with open(os.path.join(cell, "flags.txt"), "w") as f:
    f.write(f"--batch_size={m}\n")


@pytest.fixture
def study(tmp_path):
  """Two m x two lr (m=1400 lr 0.3 diverged) plus two variants."""
  d = str(tmp_path / "study")
  write_run(d, "batch_size=50,learning_rate=0.1", 50, 0.1,
            history(0.01, 0.03, 40.0, 45.0, 30.0))
  write_run(d, "batch_size=50,learning_rate=0.3", 50, 0.3,
            history(0.02, 0.02, 30.0, 35.0, 40.0),
            layout="callbacks_in_history")
  write_run(d, "batch_size=1400,learning_rate=0.1", 1400, 0.1,
            history(0.30, 0.32, 80.0, 90.0, 5.0))
  write_run(d, "batch_size=1400,learning_rate=0.3", 1400, 0.3,
            history(0.9, 0.9, math.nan, math.nan, 1.0, epochs=1),
            status="diverged")
  write_run(d, "big_noise", 1400, 0.1, history(0.35, 0.36, 70.0, 75.0, 6.0),
            grad_noise="empirical",
            grad_noise_reference=os.path.join(d, "batch_size=50,"
                                              "learning_rate=0.1"))
  write_run(d, "big_lr1", 1400, 1.0, history(0.25, 0.27, 60.0, 65.0, 9.0))
  return d


def cells(study_dir):
  grid_cells = sweep.cells(GRID)
  return grid_cells + maxibatch.parse_variants(VARIANT_LINES, grid_cells,
                                               study_dir)


def interpolation(n=5):
  alphas = [-0.5 + 2 * i / (n - 1) for i in range(n)]
  return {"alphas": alphas, "train_loss": [0.5, 0.01, 3.0, 0.4, 2.0][:n],
          "train_top1_error": [0.2, 0.0, 0.8, 0.1, 0.6][:n],
          "test_loss": [0.6, 0.1, 3.1, 0.5, 2.1][:n],
          "test_top1_error": [0.3, 0.05, 0.8, 0.2, 0.6][:n]}


# --- Variants ----------------------------------------------------------------


def test_variants_resolve_references_and_run_after_them():
  grid_cells = sweep.cells(GRID)
  variants = maxibatch.parse_variants(VARIANT_LINES, grid_cells, "S")
  assert [v.name for v in variants] == ["big_noise", "big_lr1"]
  noise = variants[0]
  assert noise.depends_on == ("batch_size=50,learning_rate=0.1",)
  assert ("--grad_noise_reference=" + os.path.join(
      "S", "batch_size=50,learning_rate=0.1")) in noise.args()
  first, second = maxibatch.run_order(grid_cells, variants)
  assert first[0].name == "batch_size=50,learning_rate=0.1"
  assert [c.name for c in first[1:]] == [
      "batch_size=50,learning_rate=0.3", "batch_size=1400,learning_rate=0.1",
      "batch_size=1400,learning_rate=0.3", "big_lr1"]
  assert second == [noise]


def test_variants_that_name_variants_run_in_rounds():
  lines = ("# maxibatch.variant: ref batch_size=50 record_grad_variance=true\n"
           "# maxibatch.variant: noisy grad_noise_reference=@ref\n"
           "# maxibatch.variant: noisier grad_noise_reference=@noisy\n"
           "# maxibatch.variant: orphan grad_noise_reference=@"
           "batch_size=1400,learning_rate=0.3\n")
  grid_cells = sweep.cells(GRID)
  variants = maxibatch.parse_variants(lines, grid_cells, "S")
  first, second = maxibatch.run_order(grid_cells, variants)
  # Cells that others wait for lead, in grid order, then the rest.
  assert [c.name for c in first[:2]] == ["batch_size=1400,learning_rate=0.3",
                                         "ref"]
  assert [v.name for v in second] == ["noisy", "noisier", "orphan"]
  states = {c.name: sweep.COMPLETED for c in first}
  states["batch_size=1400,learning_rate=0.3"] = sweep.DIVERGED
  rounds = []

  def run(cells):
    rounds.append([c.name for c in cells])
    return {c.name: sweep.COMPLETED for c in cells}

  left = maxibatch.run_in_rounds(second, states, run)
  assert rounds == [["noisy"], ["noisier"]]
  assert [v.name for v in left] == ["orphan"]


GRID_SEEDS = GRID + [("seed", ["0", "1"])]


def test_variants_expand_over_the_seed_axis():
  lines = VARIANT_LINES + (
      "# maxibatch.variant: follow grad_noise_reference=@big_lr1\n"
      "# maxibatch.variant: pinned seed=1 grad_noise_reference="
      "@learning_rate=0.1,batch_size=1400\n")
  grid_cells = sweep.cells(GRID_SEEDS)
  assert maxibatch.seed_axis(grid_cells) == ["0", "1"]
  variants = maxibatch.parse_variants(lines, grid_cells, "S")
  names = [v.name for v in variants]
  assert names == ["big_noise,seed=0", "big_noise,seed=1", "big_lr1,seed=0",
                   "big_lr1,seed=1", "follow,seed=0", "follow,seed=1",
                   "pinned"]
  # Run directories: names the sweep keeps as they are, none a grid cell's.
  assert all(sweep.cell_name([("x", n)]) == "x=" + n for n in names)
  assert not set(names) & {c.name for c in grid_cells}
  by_name = {v.name: v for v in variants}
  for seed in ("0", "1"):
    noise = by_name[f"big_noise,seed={seed}"]
    assert noise.group == "big_noise"
    assert noise.depends_on == (
        f"batch_size=50,learning_rate=0.1,seed={seed}",)
    assert f"--seed={seed}" in noise.args()
    assert ("--grad_noise_reference=" + os.path.join(
        "S", f"batch_size=50,learning_rate=0.1,seed={seed}")) in noise.args()
    assert by_name[f"follow,seed={seed}"].depends_on == (
        f"big_lr1,seed={seed}",)
  pinned = by_name["pinned"]
  assert pinned.depends_on == ("batch_size=1400,learning_rate=0.1,seed=1",)
  assert pinned.args().count("--seed=1") == 1
  # Every reference exists, so the rounds can run.
  first, second = maxibatch.run_order(grid_cells, variants)
  assert {d for v in second for d in v.depends_on} <= set(
      c.name for c in first) | set(names)


def test_quick_tier_keeps_the_first_seed():
  grid = maxibatch.first_seed_only(GRID_SEEDS)
  assert grid == GRID + [("seed", ["0"])]
  assert maxibatch.first_seed_only(GRID) == GRID
  grid_cells = sweep.cells(grid)
  variants = maxibatch.parse_variants(VARIANT_LINES, grid_cells, "S")
  assert [v.name for v in variants] == ["big_noise,seed=0", "big_lr1,seed=0"]
  assert len(grid_cells) == 4


def test_a_reference_at_a_seed_off_the_axis_fails():
  line = ("# maxibatch.variant: odd seed=7 grad_noise_reference="
          "@batch_size=50,learning_rate=0.1\n")
  with pytest.raises(UserError, match="names no cell of this study at "
                     "seed 7"):
    maxibatch.parse_variants(line, sweep.cells(GRID_SEEDS), "S")


@pytest.mark.parametrize("line, match", [
    ("# maxibatch.variant: lonely", "write '# maxibatch.variant: NAME"),
    ("# maxibatch.variant: a=b batch_size=5", "may hold only"),
    ("# maxibatch.variant: x batch_size", "bad token"),
    ("# maxibatch.variant: x model_dir=/tmp", "may not set --model_dir"),
    ("# maxibatch.variant: x grad_noise_reference=@nope", "names no cell"),
    ("# maxibatch.variant: x grad_noise_reference=@x", "names itself"),
    ("# maxibatch.variant: x batch_size=5\n# maxibatch.variant: x "
     "batch_size=6", "used twice"),
])
def test_bad_variant_lines_fail_with_one_line(line, match):
  with pytest.raises(UserError, match=match) as e:
    maxibatch.parse_variants(line, sweep.cells(GRID), "S")
  assert "\n" not in str(e.value)


@pytest.mark.parametrize("path", FLAGFILES)
def test_study_flagfiles_grid_and_variants_validate(path):
  with open(path) as f:
    text = f.read()
  grid = sweep.parse_grid(sweep.grid_from_flagfile(text))
  grid_cells = sweep.cells(grid)
  variants = maxibatch.parse_variants(text, grid_cells, "runs/s")
  configs = sweep.validate([f"--flagfile={path}"], grid_cells + variants)
  sizes = {int(v) for v in dict(grid)["batch_size"]}
  assert min(sizes) <= 50 and len(sizes) >= 4
  kinds = {configs[v.name].grad_noise for v in variants}
  assert "empirical" in kinds
  assert any(configs[v.name].linearize_every_steps for v in variants)
  for cfg in configs.values():
    assert cfg.track_distance and cfg.curvature_every_epochs
    assert cfg.curvature_test_batches != 0


def test_paper_flagfile_keeps_the_paper_setting():
  from tfcapacity import config  # pylint: disable=g-import-not-at-top
  with open(FLAGFILES[1]) as f:
    text = f.read()
  cfg = config.parse_flagfile(text)
  grid = dict(sweep.parse_grid(sweep.grid_from_flagfile(text)))
  assert grid["batch_size"] == ["50", "100", "250", "500", "1000", "5000",
                                "10000"]
  assert (cfg.depth, cfg.dataset, cfg.learning_rate) == (32, "tfds:cifar10",
                                                         0.1)
  assert [int(e) for e in cfg.lr_drop_epochs] == [80]
  assert cfg.weight_decay > 0 and cfg.curvature_examples == 500


# --- Report ------------------------------------------------------------------


def test_summary_picks_best_rate_by_training_error(study):
  runs, unfinished = maxibatch.load_runs(study, cells(study))
  assert unfinished == []
  report = maxibatch.summarize(runs)
  assert report.batch_sizes == [50, 1400]
  assert report.best[50].learning_rate == 0.1  # 1% < 2% training error.
  assert report.best[1400].learning_rate == 0.1  # lr 0.3 diverged.
  assert report.lr_drop_epochs == [2.0]
  assert report.baseline().name == "batch_size=1400,learning_rate=0.1"
  summary = maxibatch.summary_json(report, {})
  claims = summary["claims"]
  assert claims["train_error_larger_at_large_m"]
  assert claims["lambda_max_larger_at_large_m"]
  assert not claims["distance_larger_at_large_m"]
  assert claims["train_error_large_m"] == pytest.approx(0.30)
  # Equal training errors: the lower training loss wins.
  tied = [maxibatch.Run("a", {"batch_size": 8, "learning_rate": 0.1},
                        "completed", [{"epoch": 1, "step": 5,
                                       "train_top1_error": 0.0,
                                       "train_loss": 0.02}]),
          maxibatch.Run("b", {"batch_size": 8, "learning_rate": 0.3},
                        "completed", [{"epoch": 1, "step": 5,
                                       "train_top1_error": 0.0,
                                       "train_loss": 0.01}])]
  assert maxibatch.summarize(tied).best[8].name == "b"
  table = maxibatch.markdown(report)
  assert "| 1400 | 0.1 | 30.00 | 32.00 | 2.00 | 80.0 | 90.0 | 5.0 |" in table
  assert "diverged" in table
  assert "grad_noise=empirical grad_noise_reference=@batch_size=50," in table


def test_interpolation_pairs_take_the_large_m_rates(study):
  runs, _ = maxibatch.load_runs(study, cells(study))
  pairs = maxibatch.interpolation_pairs(maxibatch.summarize(runs))
  # The diverged grid run and the noisy variant are left out.
  assert [(a.name, b.name) for a, b in pairs] == [
      ("batch_size=50,learning_rate=0.1", "batch_size=1400,learning_rate=0.1"),
      ("batch_size=50,learning_rate=0.1", "big_lr1")]


def test_unfinished_runs_are_counted_not_reported(study):
  path = os.path.join(study, "big_lr1", "results.json")
  with open(path) as f:
    results = json.load(f)
  results.update(status="running", steps=1)
  with open(path, "w") as f:
    json.dump(results, f)
  runs, unfinished = maxibatch.load_runs(study, cells(study))
  assert unfinished == ["big_lr1"]
  report = maxibatch.summarize(runs, unfinished)
  assert "1 runs unfinished and left out: big_lr1" in maxibatch.markdown(
      report)


def test_figures_are_pngs(study):
  runs, _ = maxibatch.load_runs(study, cells(study))
  report = maxibatch.summarize(runs)
  pngs = maxibatch.figures(report, {"/x/a__to__b.json": interpolation()})
  assert sorted(pngs) == [
      "maxibatch_fig1_error_vs_batch_size.png",
      "maxibatch_fig2_interpolation.png",
      "maxibatch_fig3_lambda_max_train.png",
      "maxibatch_fig4_lambda_max_test.png", "maxibatch_fig5_distance.png",
      "maxibatch_fig6_noise_linearization.png"]
  assert all(data.startswith(b"\x89PNG") for data in pngs.values())
  assert "maxibatch_fig2_interpolation.png" not in maxibatch.figures(report)


def test_interpolation_summary(tmp_path):
  path = str(tmp_path / "i.json")
  with open(path, "w") as f:
    json.dump(interpolation(), f)
  data = maxibatch.read_interpolation(path)
  s = maxibatch._interp_summary(data)  # pylint: disable=protected-access
  assert s["train_loss_at_0"] == pytest.approx(0.01)
  assert s["train_loss_at_1"] == pytest.approx(0.4)
  assert s["train_loss_max_between"] == pytest.approx(3.0)


@pytest.mark.parametrize("content, match", [
    ("{", "cannot read"),
    ('{"alphas": [0]}', "lacks train_loss"),
    ('{"alphas": [0, 1], "train_loss": [1], "train_top1_error": [0], '
     '"test_loss": [1], "test_top1_error": [0]}', "differ in length"),
])
def test_bad_interpolation_files(tmp_path, content, match):
  path = tmp_path / "bad.json"
  path.write_text(content)
  with pytest.raises(UserError, match=match):
    maxibatch.read_interpolation(str(path))


def test_bad_results_are_one_line_errors(tmp_path):
  cell = tmp_path / "batch_size=50,learning_rate=0.1"
  cell.mkdir()
  (cell / "results.json").write_text("not json")
  with pytest.raises(UserError, match="not valid JSON"):
    maxibatch.load_run(str(cell))
  (cell / "results.json").write_text('{"status": "completed"}')
  with pytest.raises(UserError, match="no 'history' list"):
    maxibatch.load_run(str(cell))
  with pytest.raises(UserError, match="is not a directory"):
    maxibatch.load_runs(str(tmp_path / "nope"), [])
  with pytest.raises(UserError, match="no finished grid runs"):
    maxibatch.summarize([], ["a"])


# --- The tool ----------------------------------------------------------------


def run_tool(*args):
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="")
  return subprocess.run([sys.executable, TOOL, *args], capture_output=True,
                        text=True, env=env, timeout=300)


def test_tool_reports_a_study_without_training(study, tmp_path):
  flagfile = tmp_path / "study.flags"
  flagfile.write_text("# sweep.grid: batch_size=50,1400\n"
                      "# sweep.grid: learning_rate=0.1,0.3\n" + VARIANT_LINES
                      + "--dataset=digits\n")
  interp_dir = os.path.join(study, maxibatch.INTERPOLATION_DIR)
  os.makedirs(interp_dir)
  with open(os.path.join(interp_dir, "batch_size=50,learning_rate=0.1__to__"
                         "batch_size=1400,learning_rate=0.1.json"), "w") as f:
    json.dump(interpolation(), f)
  out = tmp_path / "report"
  result = run_tool(f"--flagfile={flagfile}", f"--study_dir={study}",
                    "--report_only", "--notensorboard",
                    f"--output_dir={out}")
  assert result.returncode == 0, result.stderr
  assert "1 interpolations (1 not computed: --report_only)" in result.stdout
  summary = json.loads((out / "maxibatch.json").read_text())
  assert summary["interpolations_missing"] == [
      "batch_size=50,learning_rate=0.1__to__big_lr1.json"]
  assert (out / "maxibatch_fig2_interpolation.png").stat().st_size > 0
  # A header and six runs.
  assert (out / "maxibatch.csv").read_text().count("\n") == 7


@pytest.mark.parametrize("args, match", [
    ([], "--study_dir is required"),
    (["--study_dir=/tmp/x"], "--flagfile is required"),
    (["--study_dir=/tmp/x", "--flagfile=/nonexistent.flags"],
     "cannot read --flagfile"),
])
def test_tool_bad_input_is_one_line(args, match):
  conftest.assert_one_line_error(run_tool(*args), match,
                                 prog="maxibatch_study")


def test_tool_bad_variant_is_one_line(tmp_path):
  flagfile = tmp_path / "bad.flags"
  flagfile.write_text("# sweep.grid: batch_size=50,100\n"
                      "# maxibatch.variant: v grad_noise_reference=@m50\n")
  result = run_tool(f"--flagfile={flagfile}",
                    f"--study_dir={tmp_path / 's'}")
  assert result.returncode == 2
  assert result.stderr.strip().splitlines() == [
      "maxibatch_study: error: variant v: @m50 names no cell of this study; "
      "use a grid cell name such as batch_size=100"]
  assert not (tmp_path / "s").exists()
