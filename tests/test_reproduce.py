"""tools/reproduce.py: tiers, derived flagfiles, verdict rules, the report."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tfcapacity import config
from tfcapacity.errors import UserError
from tfcapacity.studies import common
from tfcapacity.studies import reproduce as lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(ROOT, "tools", "reproduce.py")


def claim(cid, verdict):
  return common.Claim(id=cid, claim=cid, paper="Fig. 1", rule="r",
                      measured="1.0 ± 0.1 (n=3)", seeds=3, verdict=verdict)


# --- Paper verdicts: one case per rule -------------------------------------------


def test_every_claim_agrees_is_reproduced():
  verdict, why = lib.paper_verdict([
      claim("a", common.AGREES), claim("b", common.AGREES),
      claim("c", common.MEASURED), claim("check_x", common.AGREES)])
  assert verdict == lib.REPRODUCED
  assert why.startswith("2 agrees of 2 claims checked")


def test_a_failed_design_check_caps_at_partly():
  verdict, why = lib.paper_verdict([
      claim("a", common.AGREES), claim("check_lr_bracketed",
                                       common.DISAGREES)])
  assert verdict == lib.PARTLY
  assert "failed design checks: check_lr_bracketed" in why


def test_no_claim_agreeing_is_not_reproduced():
  verdict, _ = lib.paper_verdict([
      claim("a", common.DISAGREES), claim("b", common.MIXED),
      claim("c", common.NOT_MEASURED)])
  assert verdict == lib.NOT_REPRODUCED


def test_some_claims_agreeing_is_partly():
  verdict, why = lib.paper_verdict([
      claim("a", common.AGREES), claim("b", common.DISAGREES),
      claim("c", common.MIXED)])
  assert verdict == lib.PARTLY
  assert why.startswith("1 agrees, 1 mixed, 1 disagrees of 3")


def test_nothing_checked_is_not_measured():
  verdict, _ = lib.paper_verdict([claim("a", common.MEASURED),
                                  claim("b", common.NOT_MEASURED)])
  assert verdict == lib.NOT_MEASURED
  assert lib.paper_verdict([])[0] == lib.NOT_MEASURED


# --- Plans and derived flagfiles -------------------------------------------------

BASE = """# A study.
# sweep.grid: width=16,64
# sweep.grid: seed=0,1,2
# confusion.init_a: width=1,2; seed=0,1,2
# confusion.train_b: depth=1,4; seed=3,4
--dataset=digits
--model=mlp
--epochs=7
--width=8
"""


def test_derived_flagfile_replaces_grids_keeps_first_seed_and_overrides(
    tmp_path):
  study = lib.Study(
      name="capacity", title="t", tool="tools/x.py", flagfile="f",
      comments={"sweep.grid": ("width=4", "seed=5,6")}, first_seed=True,
      flags={"epochs": "2"})
  text = lib.derive_flagfile(BASE, study)
  lines = text.splitlines()
  assert "# sweep.grid: width=16,64" not in lines
  assert "# sweep.grid: seed=5,6" in lines  # Replacements are kept whole.
  assert "# confusion.init_a: width=1,2; seed=0" in lines
  assert "# confusion.train_b: depth=1,4; seed=3" in lines
  path = tmp_path / "derived.flags"
  path.write_text(text)
  cfg = config.parse_args([f"--flagfile={path}"])
  assert (cfg.epochs, cfg.width) == (2, 8)  # The appended line wins.


def test_a_wildcard_replaces_every_part():
  study = lib.Study(name="confusion", title="t", tool="x", flagfile="f",
                    comments={"confusion.*": ("init_c: width=3",)})
  lines = lib.derive_flagfile(BASE, study).splitlines()
  assert [ln for ln in lines if ln.startswith("# confusion.")] == [
      "# confusion.init_c: width=3"]
  assert "# sweep.grid: width=16,64" in lines


def test_the_tiers_plans():
  cpu = lib.tier_plan("cpu")
  assert [s.name for s in cpu.studies] == list(lib.STUDIES)
  # cpu runs the flagfiles as they are (the tools' grids may be cut).
  assert all(not s.first_seed and not s.flags and not s.comments
             for s in cpu.studies)
  quick = lib.tier_plan("quick")
  assert quick.quick and [s.name for s in quick.studies] == list(lib.STUDIES)
  paper = lib.tier_plan("paper")
  assert {s.name for s in paper.studies} == {"capacity", "maxibatch"}
  assert set(lib.NO_PAPER_PLAN) == set(lib.STUDIES) - {"capacity",
                                                        "maxibatch"}
  for plan in (cpu, quick, paper):
    for study in plan.studies:
      assert os.path.exists(study.flagfile_path()), study.flagfile
  with pytest.raises(UserError, match="--tier='gpu' is not one of"):
    lib.tier_plan("gpu")


def test_select_and_plan_file_errors(tmp_path):
  plan = lib.tier_plan("paper")
  with pytest.raises(UserError, match="no plan for confusion"):
    lib.select(plan, ["confusion"])
  with pytest.raises(UserError, match="unknown studies nosuch"):
    lib.select(plan, ["nosuch"])
  assert [s.name for s in lib.select(lib.tier_plan("cpu"), [
      "maxibatch"]).studies] == ["maxibatch"]
  bad = tmp_path / "plan.json"
  bad.write_text("{not json")
  with pytest.raises(UserError, match="is not JSON"):
    lib.read_plan_file(str(bad), "quick")
  bad.write_text(json.dumps({"studies": {"capacity": {"epochs": 3}}}))
  with pytest.raises(UserError, match="may set only"):
    lib.read_plan_file(str(bad), "quick")
  bad.write_text(json.dumps({"studies": {"mnist": {}}}))
  with pytest.raises(UserError, match="unknown study 'mnist'"):
    lib.read_plan_file(str(bad), "quick")
  good = tmp_path / "good.json"
  good.write_text(json.dumps({"tier": "quick", "studies": {
      "maxibatch": {"flags": {"epochs": 1}}}}))
  plan = lib.read_plan_file(str(good), "cpu")
  assert plan.tier == "quick" and [s.name for s in plan.studies] == [
      "maxibatch"]
  # Fields the file leaves out come from the quick tier's study.
  assert plan.studies[0].args[0] == "--quick"
  assert plan.studies[0].flags == {"epochs": "1"}


# --- The paper tier's estimate ------------------------------------------------------


def test_estimate_counts_training_evaluation_and_curvature(tmp_path):
  flagfile = tmp_path / "paper.flags"
  flagfile.write_text("# sweep.grid: width=10,20\n--dataset=digits\n"
                      "--model=mlp\n--depth=1\n--batch_size=100\n"
                      "--epochs=4\n--eval_every=2\n--curvature_every_epochs=2"
                      "\n--curvature_examples=30\n--curvature_test_batches=1"
                      "\n")
  study = lib.Study(name="capacity", title="t", tool="x",
                    flagfile=str(flagfile), input_shape=(64,), classes=10,
                    train_examples=1000, test_examples=200)
  cells = lib.paper_cells(study, str(tmp_path))
  assert [c.name for c, _ in cells] == ["width=10", "width=20"]
  e = lib.estimate(study, cells[1][0].name, cells[1][1], {})
  fwd = 2 * (64 * 20 + 20 * 10)  # Two Dense kernels.
  assert e.parameters == 64 * 20 + 20 + 20 * 10 + 10
  assert e.train_flop == 3 * fwd * 1000 * 4
  assert e.eval_flop == fwd * 1200 * 2  # Every 2 of 4 epochs.
  # 2 measurements x 20 iterations x 6 forwards x (30 train + 30 test).
  assert e.curvature_flop == 2 * 20 * 6 * fwd * 60
  table = lib.estimate_table([e], gpu_tflops=1e-9)
  assert table[-1].endswith(f"| {e.total / 1e3 / 3600:.1f} |")


def test_paper_tier_without_data_refuses_in_one_line(tmp_path):
  out = tmp_path / "out"
  proc = subprocess.run([sys.executable, TOOL, f"--out={out}",
                         "--tier=paper", "--only=capacity"],
                        capture_output=True, text=True, cwd=tmp_path)
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines() == [
      "reproduce: error: the paper tier needs the real data: "
      "--dataset=hdf5:data/sbow/sbow_train.h5: data/sbow/sbow_train.h5 does "
      "not exist; make it with tools/convert_sbow.py (docs/capacity.md) or "
      "edit the flagfile's path; --dry_run prints the plan without them"]
  assert not out.exists()


# --- The report ----------------------------------------------------------------


def test_html_inlines_figures_and_escapes(tmp_path):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots()
  ax.plot([0, 1])
  os.makedirs(tmp_path / "figures")
  fig.savefig(tmp_path / "figures" / "a.png")
  plt.close(fig)
  text = ("# Title\n\nSome `code` and **bold** <b>.\n\n| a | b |\n|---|---|"
          "\n| 1 \\| 2 | x |\n\n![fig a](figures/a.png)\n\n"
          "[link](x/y.md)\n")
  out = lib.to_html(text, str(tmp_path))
  assert "<h1>Title</h1>" in out
  assert "<code>code</code>" in out and "<b>bold</b> &lt;b&gt;" in out
  assert "<tr><td>1 | 2</td><td>x</td></tr>" in out
  assert 'src="data:image/png;base64,iVBOR' in out
  assert '<a href="x/y.md">link</a>' in out
  assert "http" not in out.replace("http-equiv", "")


# --- End to end: a micro plan of all four studies, killed and rerun --------------

MICRO_PLAN = {"tier": "quick", "studies": {
    "capacity": {
        "comments": {"sweep.grid": ["width=4,8", "learning_rate=1,0.1",
                                    "seed=0"],
                     "capacity.compare": []},
        "flags": {"epochs": 1, "mnist1d_examples": 600, "eval_every": 1}},
    "confusion": {
        "comments": {"confusion.*": ["init_width: width=8,16; seed=0",
                                     "train_width: width=8,16; seed=0"]},
        "flags": {"epochs": 1, "mnist1d_examples": 300,
                  "gradients_examples": 16, "gradients_chunk_size": 16}},
    "random_labels": {
        "args": ["--quick", "--models=mlp", "--depths=1", "--widths=8",
                 "--drift_depths=1"],
        "flags": {"steps": 20, "eval_every": 10, "gradients_every_steps": 10,
                  "track_distance_every_epochs": 10}},
    "maxibatch": {
        "comments": {"sweep.grid": ["batch_size=50,200", "learning_rate=0.1",
                                    "seed=0"],
                     "maxibatch.variant": [
                         "big_ghost seed=0 batch_size=200 learning_rate=0.1 "
                         "normalization=ghost ghost_batch_size=10"]},
        "flags": {"epochs": 2, "depth": 8, "train_subset": 200,
                  "lr_drop_epochs": 1, "eval_every": 2,
                  "curvature_every_epochs": 1, "curvature_around_drop": 0,
                  "curvature_examples": 20},
        "args": ["--quick", "--interpolation_points=3", "--plane_points=3",
                 "--interpolation_examples=50"]},
}}


def test_micro_plan_killed_midway_resumes_without_redoing_runs(tmp_path):
  plan = tmp_path / "micro.json"
  plan.write_text(json.dumps(MICRO_PLAN))
  out = tmp_path / "out"
  cmd = [sys.executable, TOOL, f"--out={out}", "--tier=quick",
         f"--plan={plan}", "--parallel=2", "--progress_seconds=5"]
  env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
  first = subprocess.Popen(cmd, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, env=env)
  deadline = time.time() + 300
  while time.time() < deadline and first.poll() is None:
    if lib.finished_runs(str(out / "capacity")):
      break
    time.sleep(0.5)
  assert first.poll() is None, first.stdout.read().decode()[-2000:]
  first.send_signal(signal.SIGKILL)  # Its tools and runs die with it.
  first.wait()
  before = {s: lib.run_fingerprints(str(out / s)) for s in lib.STUDIES}
  assert before["capacity"] and not (out / "report.md").exists()

  second = subprocess.run(cmd, capture_output=True, text=True, env=env,
                          timeout=900)
  assert second.returncode == 0, (second.stdout + second.stderr)[-3000:]
  for study in lib.STUDIES:
    after = lib.run_fingerprints(str(out / study))
    # Nothing finished before the kill was trained again...
    assert {k: after[k] for k in before[study]} == before[study], study
    # ...and the rerun trained exactly the rest, once.
    ledger = lib.read_ledger(str(out), study)
    assert ledger[-1]["exit_code"] == 0
    assert ledger[-1]["runs_trained"] == len(after) - len(before[study])
  assert lib.run_fingerprints(str(out / "capacity")).keys() == {
      f"width={w},learning_rate={lr},seed=0" for w in (4, 8)
      for lr in (1, 0.1)}

  report = (out / "report.md").read_text()
  assert "smoke test" in report
  for study in lib.tier_plan("cpu").studies:
    assert f"## {study.title}" in report
  html_text = (out / "report.html").read_text()
  assert html_text.count('src="data:image/png;base64,') == report.count(
      "![") > 4
  rows = (out / "verdicts.csv").read_text().splitlines()
  assert [r.split(",")[0] for r in rows[1:]] == list(lib.STUDIES)
  for row in rows[1:]:
    assert any(v in row for v in (lib.REPRODUCED, lib.PARTLY,
                                  lib.NOT_REPRODUCED, lib.NOT_MEASURED))


@pytest.mark.parametrize("tier", ["quick", "cpu"])
def test_every_run_of_the_tiers_derived_flagfiles_is_valid(tmp_path, tier):
  from tfcapacity.studies import capacity  # pylint: disable=g-import-not-at-top
  from tfcapacity.studies import confusion_study  # pylint: disable=g-import-not-at-top
  from tfcapacity.studies import maxibatch  # pylint: disable=g-import-not-at-top
  from tfcapacity.studies import sweep  # pylint: disable=g-import-not-at-top
  counts = {}
  for study in lib.tier_plan(tier).studies:
    path = lib.write_plan_flagfile(str(tmp_path), study)
    with open(path) as f:
      text = f.read()
    base = [f"--flagfile={path}"]
    if study.name == "capacity":
      grid = sweep.parse_grid(sweep.grid_from_flagfile(text))
      cells = sweep.cells(grid) + sweep.cells(
          capacity.compare_grid(text, grid))
    elif study.name == "confusion":
      cells = [c for p in confusion_study.parse_parts(text)
               for c in p.cells()]
    elif study.name == "maxibatch":
      cells = sweep.cells(sweep.parse_grid(sweep.grid_from_flagfile(text)))
      cells += maxibatch.parse_variants(text, cells, str(tmp_path))
    else:
      cells = [sweep.Cell(0, ())]
    sweep.validate(base, cells)
    counts[study.name] = len(cells)
  if tier == "quick":  # The reduced grids of the smoke test.
    # 32 confusion cells at init and 16 training runs.
    assert counts == {"capacity": 15, "confusion": 48, "random_labels": 1,
                      "maxibatch": 4}
