"""Gradient confusion and its relatives during training.

Every `--gradients_every_epochs` epochs (or `--gradients_every_steps` steps)
the per-example gradients of `--gradients_examples` fixed training examples
(drawn once with the run's seed) are compared (Sankararaman et al., "The
impact of neural network overparameterization on gradient confusion and
SGD"): the gradient confusion max(0, -min_{i != j} <g_i, g_j>), the minimum
and mean inner products and cosines, cosine quantiles, the gradient
diversity (Yin et al. 2018) and the simple noise scale (McCandlish et al.
2018). Scalars are logged under `gradients/...`, the pairwise cosines as a
TensorBoard histogram (`gradients/cosines`), and with
`--gradients_per_layer` each variable's statistics under
`gradients/<variable path>/...`.

Gram matrices and their spectra (least and largest eigenvalue, condition
number), the quantities Du et al. (2019) bound the speed of gradient descent
with: always `gradients/gram_*` of the loss-gradient Gram matrix G; with
`--gradients_ntk`, `gradients/ntk_*` of the empirical neural-tangent Gram
matrix of the logits, K_ij = sum_c <d z_c(x_i), d z_c(x_j)>; with
`--gradients_feature_layer=LAYER` (or `penultimate`), `gradients/features_*`
of the layer's feature kernel F F^T / width. Each spectrum also says whether
its least eigenvalue is below float32 resolution (`*_min_below_float32`,
1 or 0; `statistics.below_float32_resolution`) and whether it and the
condition number are resolved in the model's precision (`*_resolved`, 1 or
0; `statistics.spectrum_resolved`); an unresolved condition number is NaN,
never inf. `training.scalars.finite_scalars` tells the loop which scalars
TensorBoard can take.

With `--gradients_ntk`, the neural-tangent Gram matrix Theta(0) of the first
measurement at step 0 is kept in the run directory (`NTK_INIT_FILE`, with
the outputs f(0) and the examples' labels, for the kernel-regime prediction
of `tfcapacity.studies.global_minima`), and every measurement logs its
drift `gradients/ntk_drift` = ||Theta(t) - Theta(0)||_2 / lambda_min(Theta(0))
(Du et al.'s quantity: their proofs keep it below 1/2). A resumed run reads
Theta(0) back from the file.

Per-example gradients use the model in inference mode (batch-norm moving
statistics): one example's batch statistics are ill-defined. The model is
never changed (`tfcapacity.gradients.per_example`).
"""

from __future__ import annotations

import functools
import io
import os

from absl import logging
import numpy as np
import tensorflow as tf

from tfcapacity import distribute
from tfcapacity.errors import UserError
from tfcapacity import rundir
from tfcapacity.gradients import features
from tfcapacity.gradients import measure
from tfcapacity.gradients import statistics
from tfcapacity.training import callbacks as callbacks_lib

_SALT = 0x6A7D
_SPECTRUM_KEYS = ("_min_eigenvalue", "_max_eigenvalue", "_condition_number",
                  "_min_below_float32", "_resolved")
# Theta(0), f(0) and the labels of the examples, in the run directory.
NTK_INIT_FILE = "ntk_init.npz"
_SCALARS = ("gradient_confusion", "min_inner_product", "mean_inner_product",
            "min_cosine", "mean_cosine", "gradient_diversity",
            "noise_scale_simple")


# The training examples compared throughout a run (sorted indices).
fixed_indices = functools.partial(callbacks_lib.fixed_indices, salt=_SALT)


def scalars(summary: dict, prefix: str) -> dict:
  """The loggable scalars of a `statistics.summarize` result."""
  out = {f"{prefix}/{key}": summary[key] for key in _SCALARS}
  for level, value in summary["cosine_quantiles"].items():
    out[f"{prefix}/cosine_q{level}"] = value
  return out


class GradientStatisticsCallback(callbacks_lib.Callback):
  """Per-example gradient statistics on fixed training examples."""

  name = "gradients"
  log_keys = ("gradients/gradient_confusion", "gradients/min_cosine",
              "gradients/mean_cosine", "gradients/gradient_diversity")

  def __init__(self, cfg):
    self.cfg = cfg
    self.every_epochs = cfg.gradients_every_epochs
    self.every_steps = cfg.gradients_every_steps
    self.examples = None
    self.ntk_init = None

  def check(self, ctx):
    """A bad --gradients_feature_layer fails here, before anything is
    written; --gradients_examples above the training set's size takes all
    of it, with a logged note."""
    cfg = self.cfg
    n = ctx.train_data.info.num_examples
    if cfg.gradients_examples > n:
      logging.warning("--gradients_examples=%d exceeds the %d training "
                      "examples: the gradient statistics use all %d.",
                      cfg.gradients_examples, n, n)
    if cfg.gradients_feature_layer:
      try:
        features.feature_model(ctx.model, cfg.gradients_feature_layer)
      except UserError as e:
        message = str(e)
        if "--gradients_feature_layer" not in message:
          message = f"--gradients_feature_layer: {message}"
        raise UserError(message) from None

  def on_train_begin(self, ctx):
    cfg = self.cfg
    index = fixed_indices(cfg.seed, ctx.train_data.info.num_examples,
                          cfg.gradients_examples)
    self.examples = ctx.train_data.examples(index)

  def __call__(self, ctx):
    cfg = self.cfg
    per_layer = cfg.gradients_per_layer and not cfg.gradients_projection_dim
    found = measure.measure(
        ctx.model, *self.examples, chunk_size=cfg.gradients_chunk_size,
        projection_dim=cfg.gradients_projection_dim or None, seed=cfg.seed,
        strategy=ctx.strategy, per_layer=per_layer, ntk=cfg.gradients_ntk,
        feature_layer=cfg.gradients_feature_layer or None, loss=cfg.loss)
    gram, layers = found.gram, found.layer_grams
    out = scalars(found.values, "gradients")
    if found.ntk is not None:
      out.update(self._ntk_drift(ctx, found.ntk))
    out.update({f"gradients/{key}": value
                for key, value in found.values.items()
                if key.endswith(_SPECTRUM_KEYS)})
    cosines, _ = statistics.pairwise_cosines(gram)
    if len(cosines) and tf.summary.experimental.get_step() is not None:
      tf.summary.histogram("gradients/cosines", cosines)
    for path, layer_gram in layers.items():
      out.update(scalars(statistics.summarize(layer_gram),
                         f"gradients/{path}"))
    return out

  def _ntk_drift(self, ctx, kernel) -> dict:
    """{"gradients/ntk_drift": ...} against Theta(0), kept at step 0 (in
    the run directory, so that a resumed run has it); {} without it."""
    path = (os.path.join(ctx.model_dir, NTK_INIT_FILE) if ctx.model_dir
            else None)
    if self.ntk_init is None and ctx.step == 0:
      x, y = self.examples
      outputs = np.asarray(ctx.model(x, training=False), np.float64)
      self.ntk_init = np.asarray(kernel, np.float64)
      if path and distribute.is_chief(ctx.strategy):
        buffer = io.BytesIO()
        np.savez(buffer, gram=self.ntk_init, outputs=outputs,
                 labels=np.asarray(y))
        rundir.atomic_write(path, buffer.getvalue())
    elif self.ntk_init is None and path and os.path.exists(path):
      with np.load(path) as saved:
        self.ntk_init = saved["gram"]
    if self.ntk_init is None or self.ntk_init.shape != np.shape(kernel):
      return {}
    least = float(np.linalg.eigvalsh(self.ntk_init)[0])
    change = float(np.linalg.norm(np.asarray(kernel, np.float64)
                                  - self.ntk_init, 2))
    return {"gradients/ntk_drift": change / least if least > 0
            else float("inf")}
