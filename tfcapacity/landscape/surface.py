r"""Loss along a line between two models, and on a plane around one.

1-D interpolation (Goodfellow, Vinyals & Saxe 2015, "Qualitatively
characterizing neural network optimization problems"; used in papers/003
Sec. 2.2 after Keskar et al. 2017 to compare minima of small- and
large-batch SGD): the loss and top-1 error at

  theta(alpha) = (1 - alpha) theta_A + alpha theta_B

for alphas on a grid, on fixed training and test examples, in inference
mode. Every float variable of the model is interpolated (kernels, biases,
batch-norm gamma/beta, adaptive rectifier slopes); integer variables (seed
states) are B's. The product form is exact at the end points: alpha = 0
gives theta_A and alpha = 1 theta_B bit for bit.

Batch-norm statistics at each point (`bn_stats`):
  * `interpolate`: the moving mean and moving variance are interpolated
    like the weights. Outside [0, 1] an interpolated variance can be
    negative; it is clipped at 0 (the layer adds its epsilon), and the
    number of clipped entries is reported.
  * `recompute`: for each batch-norm layer in order from the input, its
    moving mean and variance are set to the exact mean and biased variance
    (divide by the count) of that layer's inputs over all the training
    examples being evaluated, per channel (over examples and all other
    axes), with every layer below in inference mode using its already
    recomputed statistics. By induction the network then computes on those
    examples exactly what it computes in training mode with one batch
    holding all of them (plain batch norm; ghost batch norm would use
    sub-batch statistics instead), and it uses the same statistics on the
    test examples. Cost: per point, one forward pass up to each batch-norm
    layer over the training examples (accumulated batch by batch, combined
    in float64 with Chan et al.'s pairwise update), then the evaluation.

2-D plane (Li, Xu, Taylor, Studer & Goldstein 2018, "Visualizing the loss
landscape of neural nets", Sec. 4): the loss at theta + a d1 + b d2 for two
random Gaussian directions d1, d2 (seeded) made filter-normalised: for each
trainable kernel, each filter (conv kernel [kh, kw, in, out]: each output
channel; dense kernel [in, out]: each output unit, i.e. everything but the
last axis) of d is rescaled to the norm of the same filter of theta. As in
Li et al.'s published runs (`--xignore biasbn` of their plot_surface.py),
the direction is zero for every parameter with at most one axis: biases,
batch-norm gamma and beta. Non-trainable variables (batch-norm moving
statistics, rectifier slopes) are not part of the directions; their
statistics are the centre's (`bn_stats=keep`, what Li et al. evaluate:
`net.eval()` with the centre's running statistics) or recomputed at each
grid point as above (`recompute`).

Everything here works on a Keras model whose variables are assigned in turn
(the model is changed; `assign_weights(model, snapshot)` restores it).
"""

from __future__ import annotations

import numpy as np

from tfcapacity import data as data_lib
from tfcapacity import figures
from tfcapacity import objective
from tfcapacity.errors import UserError
from tfcapacity.models import layers as layers_lib
from tfcapacity.objective import function as function_lib
from tfcapacity.objective import objective as objective_lib

# --- Weights -----------------------------------------------------------------


def snapshot(model) -> list[np.ndarray]:
  """Copies of `model.weights`, in order."""
  return [np.array(v.numpy()) for v in model.weights]


def assign_weights(model, values) -> None:
  for variable, value in zip(model.weights, values):
    variable.assign(np.asarray(value, variable.dtype))


def structure(model) -> list[tuple[str, str, tuple]]:
  """(layer class, variable name, shape) of each of `model.weights`."""
  owner = {}
  for layer in layers_lib.all_layers(model):
    for variable in layer.weights:
      owner.setdefault(id(variable), type(layer).__name__)
  return [(owner.get(id(v), "?"), v.name, tuple(v.shape))
          for v in model.weights]


def check_compatible(model_a, model_b, name_a: str = "A",
                     name_b: str = "B") -> None:
  """Raises UserError unless the two models' weights correspond one to one.

  Same number of variables, and in order the same layer class, variable
  name and shape. Layer names may differ (Keras numbers unnamed layers).
  """
  a, b = structure(model_a), structure(model_b)
  if len(a) != len(b):
    raise UserError(f"{name_a} and {name_b} have different architectures: "
                    f"{len(a)} and {len(b)} variables")
  for i, (va, vb) in enumerate(zip(a, b)):
    if va != vb:
      raise UserError(
          f"{name_a} and {name_b} have different architectures: variable "
          f"{i} is {va[0]} {va[1]} {va[2]} in one and {vb[0]} {vb[1]} "
          f"{vb[2]} in the other")


def _bn_stat_ids(model) -> set[int]:
  ids = set()
  for layer in layers_lib.batch_norm_layers(model):
    ids.update((id(layer.moving_mean), id(layer.moving_variance)))
  return ids


def _variance_ids(model) -> set[int]:
  return {id(layer.moving_variance)
          for layer in layers_lib.batch_norm_layers(model)}


def interpolate(model, theta_a, theta_b, alpha: float, *,
                interpolate_bn: bool = True) -> tuple[list[np.ndarray], int]:
  """(1 - alpha) theta_A + alpha theta_B for each variable of `model`.

  Returns:
    (values, clipped): the values in `model.weights` order, and how many
    interpolated moving-variance entries were negative and set to 0. Integer
    variables are B's; with `interpolate_bn=False` the moving statistics
    are B's too (to be recomputed).
  """
  bn_ids, variance_ids = _bn_stat_ids(model), _variance_ids(model)
  values, clipped = [], 0
  for variable, a, b in zip(model.weights, theta_a, theta_b):
    if not np.issubdtype(np.asarray(b).dtype, np.floating) or (
        not interpolate_bn and id(variable) in bn_ids):
      values.append(b)
      continue
    value = (1.0 - alpha) * np.asarray(a, np.float64) + alpha * np.asarray(
        b, np.float64)
    if id(variable) in variance_ids:
      clipped += int(np.sum(value < 0))
      value = np.maximum(value, 0.0)
    values.append(value.astype(np.asarray(b).dtype))
  return values, clipped


def distance(model, theta_a, theta_b) -> float:
  """Euclidean distance between the trainable parts of two snapshots."""
  trainable = {id(v) for v in model.trainable_weights}
  total = 0.0
  for variable, a, b in zip(model.weights, theta_a, theta_b):
    if id(variable) in trainable:
      total += float(np.sum((np.asarray(a, np.float64) - b) ** 2))
  return float(np.sqrt(total))


def filter_normalized_direction(model, theta, rng: np.random.Generator
                                ) -> list[np.ndarray]:
  """A Gaussian direction, filter-normalised to `theta` (Li et al. 2018).

  Per trainable variable with two or more axes, each slice along the last
  axis (a filter or neuron) gets the norm of the same slice of theta (a
  zero filter of theta gives a zero filter). Trainable variables with at
  most one axis (biases, batch-norm gamma/beta) and non-trainable ones get
  zeros. Returns values in `model.weights` order.
  """
  trainable = {id(v) for v in model.trainable_weights}
  direction = []
  for variable, value in zip(model.weights, theta):
    value = np.asarray(value, np.float64)
    if id(variable) not in trainable or value.ndim <= 1:
      direction.append(np.zeros(value.shape))
      continue
    d = rng.standard_normal(value.shape)
    axes = tuple(range(value.ndim - 1))
    d_norm = np.sqrt(np.sum(d * d, axis=axes, keepdims=True))
    t_norm = np.sqrt(np.sum(value * value, axis=axes, keepdims=True))
    direction.append(d * (t_norm / np.maximum(d_norm, 1e-12)))
  return direction


# --- Evaluation --------------------------------------------------------------


class Evaluator:
  """Mean loss and top-1 error of a model on fixed examples, and exact
  batch-norm statistics of its training examples.

  Each set of examples gets an `objective.Objective` (inference mode, the
  run's loss), which reads the model's variables at each call: assigning new
  values and calling again evaluates the new point without retracing.
  """

  def __init__(self, model, batch_size: int = objective.MAX_BATCH_SIZE,
               loss: str = "cross_entropy"):
    self.model = model
    self.batch_size = int(batch_size)
    self.loss = loss
    self._objectives = {}  # (n, input shape) -> [Objective, x, y held]
    self._moments = function_lib.batch_norm_moments(model)

  @property
  def num_batch_norm_layers(self) -> int:
    return len(self._moments)

  def evaluate(self, x, y) -> tuple[float, float]:
    """(mean loss, top-1 error) over the examples, inference mode."""
    key = (len(y), tuple(np.shape(x)[1:]))
    if key not in self._objectives:
      self._objectives[key] = [objective_lib.Objective(
          self.model, x, y, loss=self.loss, batch_size=self.batch_size),
                               x, y]
    held = self._objectives[key]
    if held[1] is not x or held[2] is not y:
      held[0].set_examples(x, y)
      held[1:] = [x, y]
    metrics = held[0].metrics()
    return metrics["loss"], metrics["top1_error"]

  def recompute_batch_norm(self, x) -> None:
    """Sets each batch-norm layer's moving statistics to the exact mean and
    biased variance of its inputs over `x` (`function.recompute_batch_norm`)."""
    function_lib.recompute_batch_norm(self.model, x, self.batch_size,
                                      moments=self._moments)


def _evaluate_point(evaluator, values, train, test, bn_stats):
  assign_weights(evaluator.model, values)
  if bn_stats == "recompute":
    evaluator.recompute_batch_norm(train[0])
  train_loss, train_error = evaluator.evaluate(*train)
  test_loss, test_error = evaluator.evaluate(*test)
  return train_loss, train_error, test_loss, test_error


def line(evaluator: Evaluator, theta_a, theta_b, alphas, train, test, *,
         bn_stats: str = "recompute", progress=None) -> dict:
  """Loss and top-1 error along (1 - alpha) theta_A + alpha theta_B.

  Args:
    evaluator: an `Evaluator` of a model with the end points' structure
      (its weights are overwritten; restored to theta_B at the end).
    theta_a, theta_b: `snapshot`s.
    alphas: the points.
    train, test: (x, y) numpy arrays; batch-norm statistics are recomputed
      on `train`.
    bn_stats: recompute | interpolate.
    progress: called as progress(i, {"alpha": ..., "train_loss": ...}).

  Returns:
    {"alphas", "train_loss", "train_top1_error", "test_loss",
    "test_top1_error", "clipped_variances"}.
  """
  if bn_stats not in ("recompute", "interpolate"):
    raise UserError(f"--bn_stats={bn_stats}: a line takes recompute or "
                    f"interpolate")
  model = evaluator.model
  out = {k: [] for k in ("alphas", "train_loss", "train_top1_error",
                         "test_loss", "test_top1_error")}
  clipped_total = 0
  try:
    for i, alpha in enumerate(alphas):
      values, clipped = interpolate(
          model, theta_a, theta_b, float(alpha),
          interpolate_bn=bn_stats == "interpolate")
      clipped_total += clipped
      point = _evaluate_point(evaluator, values, train, test, bn_stats)
      out["alphas"].append(float(alpha))
      for key, value in zip(("train_loss", "train_top1_error", "test_loss",
                             "test_top1_error"), point):
        out[key].append(value)
      if progress:
        progress(i + 1, {"alpha": float(alpha), "train_loss": point[0],
                         "test_loss": point[2]})
  finally:
    assign_weights(model, theta_b)
  out["clipped_variances"] = clipped_total
  return out


def plane(evaluator: Evaluator, theta, alphas, betas, train, test, *,
          bn_stats: str = "recompute", seed: int = 0,
          progress=None) -> dict:
  """Loss and top-1 error on theta + a d1 + b d2 (Li et al. 2018).

  d1, d2 are `filter_normalized_direction`s drawn in turn from
  `np.random.default_rng(seed)`.

  Returns:
    {"alphas", "betas", and grids train_loss, train_top1_error, test_loss,
    test_top1_error as lists of rows: [i][j] at (alphas[i], betas[j]),
    "direction_norms", "directions" (d1, d2 as arrays, not JSON)}.
  """
  if bn_stats not in ("recompute", "keep"):
    raise UserError(f"--bn_stats={bn_stats}: the plane takes recompute or "
                    f"keep (the centre's statistics)")
  model = evaluator.model
  rng = np.random.default_rng(seed)
  d1 = filter_normalized_direction(model, theta, rng)
  d2 = filter_normalized_direction(model, theta, rng)
  keys = ("train_loss", "train_top1_error", "test_loss", "test_top1_error")
  grids = {k: np.zeros((len(alphas), len(betas))) for k in keys}
  done = 0
  try:
    for i, a in enumerate(alphas):
      for j, b in enumerate(betas):
        values = [(np.asarray(t, np.float64) + a * u + b * v).astype(
            np.asarray(t).dtype) if np.issubdtype(np.asarray(t).dtype,
                                                  np.floating) else t
                  for t, u, v in zip(theta, d1, d2)]
        point = _evaluate_point(evaluator, values, train, test, bn_stats)
        for key, value in zip(keys, point):
          grids[key][i, j] = value
        done += 1
        if progress:
          progress(done, {"alpha": float(a), "beta": float(b),
                          "train_loss": point[0]})
  finally:
    assign_weights(model, theta)
  norm = lambda d: float(np.sqrt(sum(np.sum(x * x) for x in d)))  # noqa: E731
  return {"alphas": [float(a) for a in alphas],
          "betas": [float(b) for b in betas],
          **{k: grids[k].tolist() for k in keys},
          "direction_norms": [norm(d1), norm(d2)],
          "directions": (d1, d2)}


# --- Figures -----------------------------------------------------------------


def line_figure(result: dict, path: str, title: str | None = None) -> str:
  """Loss and top-1 error against alpha, train and test, as a PNG."""
  plt = figures.pyplot()
  fig, (ax_loss, ax_err) = plt.subplots(1, 2, figsize=(10, 4))
  alphas = result["alphas"]
  for split, style in (("train", "-"), ("test", "--")):
    ax_loss.plot(alphas, result[f"{split}_loss"], style, label=split)
    ax_err.plot(alphas, result[f"{split}_top1_error"], style, label=split)
  loss_label = result.get("loss", "cross_entropy").replace("_", "-")
  for ax, label in ((ax_loss, f"{loss_label} loss"),
                    (ax_err, "top-1 error")):
    for end in (0.0, 1.0):
      ax.axvline(end, color="gray", lw=0.8, alpha=0.6)
    ax.set_xlabel("alpha  ((1 - alpha) A + alpha B)")
    ax.set_ylabel(label)
    ax.grid(alpha=0.3)
    ax.legend()
  ax_loss.set_yscale("log")
  fig.suptitle(title or f"Interpolation, batch-norm statistics "
               f"{result.get('bn_stats', '')}")
  return figures.save_png(fig, path)


def plane_figure(result: dict, path: str, title: str | None = None) -> str:
  """Contours of log10 train and test loss over the plane, as a PNG."""
  plt = figures.pyplot()
  fig, axes = plt.subplots(1, 2, figsize=(10, 4.3))
  a, b = np.meshgrid(result["alphas"], result["betas"], indexing="ij")
  for ax, split in zip(axes, data_lib.SPLITS):
    loss = np.log10(np.maximum(np.asarray(result[f"{split}_loss"],
                                          np.float64), 1e-12))
    finite = np.isfinite(loss)
    loss = np.where(finite, loss, np.nanmax(np.where(finite, loss, np.nan)))
    filled = ax.contourf(a, b, loss, levels=20, cmap="viridis")
    ax.contour(a, b, loss, levels=20, colors="k", linewidths=0.3)
    ax.plot([0], [0], "r+", ms=10)
    fig.colorbar(filled, ax=ax, label="log10 loss")
    ax.set_xlabel("direction 1")
    ax.set_ylabel("direction 2")
    ax.set_title(f"{split} loss")
  fig.suptitle(title or "Filter-normalised random plane (Li et al. 2018)")
  return figures.save_png(fig, path)

