"""What a run writes to TensorBoard, laid out to be read at a glance.

Runs of a run directory (one per real curve):
  train/   the training set's evaluations under the tags `loss`,
           `top1_error`, `top5_error`; the optimiser's `batch/loss`,
           `batch/learning_rate`, `batch/examples_per_second`; every
           measurement (`curvature/*`, `gradients/*`, `distance/*`,
           `timing/*`) with the pairwise gradient cosines as a histogram;
           per-layer weight histograms and weight and gradient norms
           (`layers/<layer>/weight_norm`, `.../gradient_norm`) at every
           evaluation; the HParams session, the flags as text and the
           custom-scalars layout.
  test/    the test set's evaluations under the same tags, and the
           test-set measurements (`curvature/lambda_max` of test batches)
           under the tags of their training-set twins: every train/test pair
           overlays in one chart.
  train_recomputed_bn/, test_recomputed_bn/   (batch norm with
           --eval_recompute_bn) the evaluations with recomputed statistics,
           again under the same tags.

HParams. A lone run's session lists the flags that differ from their
defaults; a sweep's cells list only the swept flags (`--hparams_keys`, set by
the sweep runner), typed, and the sweep writes the experiment (domains and
metrics) at its root. Trial ids are short (`w16_lr0.1_s0`). TensorBoard
reads a metric of a session from the session's own run and its
sub-directories, so the test set's final loss and errors are also written
to the `train` run as `final/test_loss`, `final/test_top1_error`,
`final/test_top5_error`.

Non-finite scalars are never written: the loop counts them, logs each tag
once with the reason and writes that note as text (`training.scalars`).
"""

from __future__ import annotations

import math
import re

import tensorflow as tf

TRAIN_RUN, TEST_RUN = "train", "test"
RECOMPUTED_BN_SUFFIX = "_recomputed_bn"
RUNS = (TRAIN_RUN, TEST_RUN)
# The evaluation tags (in both runs) and the copies of the test set's final
# values in the train run, for HParams.
EVAL_TAGS = ("loss", "top1_error", "top5_error")
FINAL_TEST_PREFIX = "final/test_"
# Prefixes of the measurements whose final values are HParams metrics.
METRIC_PREFIXES = ("curvature/", "gradients/", "distance/")

_TEST_MARK = "_test"
# Short names of flags in trial ids.
_SHORT = {"dataset": "", "width": "w", "depth": "d", "learning_rate": "lr", "seed": "s",
          "batch_size": "b", "model": "", "epochs": "e", "momentum": "m",
          "weight_decay": "wd", "activation": "", "normalization": "",
          "optimizer": "", "random_labels": "rl", "label_noise": "ln",
          "train_subset": "n", "kernel_init": "", "parametrization": "p"}


def route(scalars: dict) -> dict[str, dict]:
  """{run: {tag: value}}: a measurement of the test set (a key with `_test`
  after its name, e.g. `curvature/lambda_max_test`, `..._test_std`) goes to
  the test run under its training twin's tag (`curvature/lambda_max`,
  `curvature/lambda_max_std`), everything else to the train run."""
  out = {TRAIN_RUN: {}, TEST_RUN: {}}
  for key, value in scalars.items():
    head, _, name = key.rpartition("/")
    match = re.search(rf"{_TEST_MARK}(?=_|$)", name)
    if match:
      name = name[:match.start()] + name[match.end():]
      out[TEST_RUN][f"{head}/{name}" if head else name] = value
    else:
      out[TRAIN_RUN][key] = value
  return out


def _typed(value):
  """An HParams value: bool, int, float or str (lists as "a,b")."""
  if isinstance(value, (list, tuple)):
    return ",".join(str(v) for v in value)
  if value is None:
    return ""
  if isinstance(value, str):  # E.g. --batch_size=64 (a string flag).
    for kind in (int, float):
      try:
        return kind(value)
      except ValueError:
        pass
    return value
  if isinstance(value, (bool, int, float)):
    return value
  return str(value)


def _number_text(value) -> str:
  if isinstance(value, float) and value == int(value) and abs(value) < 1e6:
    return str(int(value))
  return f"{value:g}" if isinstance(value, float) else str(value)


def trial_id(hparams: dict) -> str:
  """A short readable name of a set of hyperparameters: `w16_lr0.1_s0`
  (flags without an abbreviation keep their name; categorical values that
  need no name show alone)."""
  parts = []
  for key, value in hparams.items():
    short = _SHORT.get(key, key)
    text = _number_text(value) if not isinstance(value, bool) else (
        "" if value else "no")
    if isinstance(value, bool):
      parts.append(f"{text}{key}")
    elif short == "" or isinstance(value, str) and not short:
      parts.append(text)
    else:
      parts.append(f"{short}{text}")
  return "_".join(p for p in parts if p) or "run"


def session_hparams(cfg, keys=None, defaults=None) -> dict:
  """The hyperparameters of a run's HParams session: the flags `keys`
  (a sweep's swept flags) or, without keys, the flags that differ from
  `defaults` (a lone run), typed."""
  values = cfg.semantic_dict()
  if keys:
    chosen = [k for k in keys if k in values]
  else:
    base = defaults.semantic_dict() if defaults is not None else {}
    chosen = [k for k in values if values[k] != base.get(k)]
  return {k: _typed(values[k]) for k in chosen}


# HParams metrics shown first (TensorBoard ticks the first five), and
# measurement diagnostics that are no metric.
_FIRST_METRICS = ("top1_error", FINAL_TEST_PREFIX + "top1_error",
                  "curvature/lambda_max", "gradients/min_cosine",
                  "gradients/gradient_confusion")
_NOT_METRICS = ("/iterations", "/relative_residual", "_below_float32")


def metric_tags(measured_keys=()) -> list[tuple[str, str]]:
  """(tag, description) of a run's HParams metrics: the final train loss
  and errors, their test twins, and the final value of every measured
  `curvature/*`, `gradients/*` and `distance/*` scalar of the train run
  (not the solvers' diagnostics), the study's headline ones first."""
  tags = {tag: f"train {tag}" for tag in EVAL_TAGS}
  tags.update({FINAL_TEST_PREFIX + tag: f"test {tag}" for tag in EVAL_TAGS})
  train = route({k: 0.0 for k in measured_keys})[TRAIN_RUN]
  tags.update({key: key for key in sorted(train)
               if key.startswith(METRIC_PREFIXES)
               and not key.endswith(_NOT_METRICS)})
  first = [t for t in _FIRST_METRICS if t in tags]
  return [(t, tags[t]) for t in first + [t for t in tags if t not in first]]


def write_session(writer, hparams: dict, trial: str, *,
                  experiment: list | None = None) -> None:
  """Writes an HParams session (and, for a lone run, its experiment: the
  hparams with their values as domains, and the `experiment` metrics)."""
  from tensorboard.plugins.hparams import api as hp  # pylint: disable=g-import-not-at-top
  with writer.as_default(step=0):
    if experiment is not None:
      write_experiment(hparams_domains={k: [v] for k, v in hparams.items()},
                       metrics=experiment)
    hp.hparams(hparams, trial_id=trial)


def write_experiment(hparams_domains: dict, metrics) -> None:
  """An HParams experiment (to the default writer): each hparam with its
  domain (the values seen: numbers as an interval, strings and booleans as
  a discrete set) and the metrics (tag, description), read from each
  session's own run."""
  from tensorboard.plugins.hparams import api as hp  # pylint: disable=g-import-not-at-top
  hparams = []
  for key, values in hparams_domains.items():
    values = sorted(set(values), key=str)
    if all(isinstance(v, bool) for v in values):
      domain = hp.Discrete(values)
    elif all(isinstance(v, (int, float)) for v in values):
      domain = hp.Discrete(sorted(values))
    else:
      domain = hp.Discrete([str(v) for v in values])
    hparams.append(hp.HParam(key, domain))
  hp.hparams_config(
      hparams=hparams,
      metrics=[hp.Metric(tag, group="", description=text,
                         display_name=text) for tag, text in metrics])


def layout():
  """The custom-scalars layout of a run directory (and of a sweep): the
  charts that overlay what a study compares."""
  from tensorboard.plugins.custom_scalar import layout_pb2  # pylint: disable=g-import-not-at-top

  def chart(title, *regexes):
    return layout_pb2.Chart(
        title=title,
        multiline=layout_pb2.MultilineChartContent(tag=list(regexes)))

  return layout_pb2.Layout(category=[
      layout_pb2.Category(title="optimisation", chart=[
          chart("top-1 error (train and test runs)", r"^top1_error$"),
          chart("loss (train and test runs)", r"^loss$"),
          chart("lambda_max and the stability threshold 2(1+beta)/eta",
                r"^curvature/lambda_max$",
                r"^curvature/stability_threshold$"),
      ]),
      layout_pb2.Category(title="gradients", chart=[
          chart("gradient confusion and min cosine",
                r"^gradients/gradient_confusion$",
                r"^gradients/min_cosine$"),
          chart("Gram / NTK least eigenvalues",
                r"^gradients/.*min_eigenvalue$"),
      ]),
  ])


def write_layout(writer) -> None:
  from tensorboard.plugins.custom_scalar import summary as cs_summary  # pylint: disable=g-import-not-at-top
  with writer.as_default(step=0):
    tf.summary.experimental.write_raw_pb(
        cs_summary.pb(layout()).SerializeToString(), step=0)


def layer_norms(model, x, y, loss_fn) -> dict[str, float]:
  """Per-layer weight norms and the norms of the loss's gradient on (x, y)
  in inference mode (no batch-norm statistic changes):
  {"layers/<layer>/weight_norm": ..., "layers/<layer>/gradient_norm": ...}.
  """
  variables = model.trainable_variables
  with tf.GradientTape() as tape:
    logits = model(x, training=False)
    loss = tf.reduce_mean(loss_fn(y, logits))
  grads = tape.gradient(loss, variables)
  weights, gradients = {}, {}
  for v, g in zip(variables, grads):
    layer = v.path.rsplit("/", 1)[0] if "/" in v.path else v.path
    weights[layer] = weights.get(layer, 0.0) + float(tf.reduce_sum(
        tf.cast(v, tf.float64) ** 2))
    if g is not None:
      gradients[layer] = gradients.get(layer, 0.0) + float(tf.reduce_sum(
          tf.cast(g, tf.float64) ** 2))
  out = {f"layers/{k}/weight_norm": math.sqrt(v) for k, v in weights.items()}
  out.update({f"layers/{k}/gradient_norm": math.sqrt(v)
              for k, v in gradients.items()})
  return out


def weight_histograms(model) -> None:
  """A histogram of each trainable variable (to the default writer)."""
  for v in model.trainable_variables:
    tf.summary.histogram(f"weights/{v.path}", v)
