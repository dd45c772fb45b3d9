"""Cost of one product with each curvature matrix, against an HVP and a gradient.

MLP 40-1000-10 and ResNet-20 (32x32x3, batch norm in inference mode), batch
128, random inputs and labels, at initialisation; all in one process.

  * gradient: `common.flat_gradient`, the mean cross-entropy's flat gradient
    in a `tf.function` (the fair baseline of benchmarks/curvature.py);
  * hessian: `HessianOperator(...).matvec` (reverse-over-reverse);
  * ggn (reverse and forward J v), empirical_fisher, fisher (one Monte-Carlo
    label per example): `curvature.matrices` operators, `.matvec`.

Cold: the first call after building the operator (tracing included), what a
command-line user waits for once. Warm: the median over interleaved rounds of
seconds per call (the machine's speed drifts by +-25% over minutes), and the
median of the per-round ratios to the HVP and to the gradient with their
quartiles.

Printed, never asserted:
  python benchmarks/curvature_matrices.py [--quick]
"""

import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import common  # noqa: E402  (benchmarks/ is sys.path[0])
from tfcapacity import models  # noqa: E402
from tfcapacity.curvature import hvp  # noqa: E402
from tfcapacity.curvature import matrices  # noqa: E402

_QUICK = flags.DEFINE_bool("quick", False, "Fewer rounds (a smoke run).")
BATCH = 128
CASES = (
    ("MLP 40-1000-10",
     dict(name="mlp", input_shape=(40,), num_classes=10, width=1000, depth=1),
     (40,), 30, 8),
    ("ResNet-20",
     dict(name="resnet", input_shape=(32, 32, 3), num_classes=10, width=16,
          depth=20, normalization="batch"),
     (32, 32, 3), 1, 6),
)


def _contenders(model, x, y):
  """name -> (builder of a zero-argument callable), built lazily so that the
  cold time covers building and tracing."""
  options = dict(loss="cross_entropy", bn_mode="inference",
                 batch_size=BATCH)

  def product(make):
    def build():
      op = make()
      v = tf.random.normal([op.size], dtype=op.dtype, seed=1)
      return lambda: op.matvec(v)
    return build

  return {
      "gradient": lambda: common.flat_gradient(model, x, y),
      "hessian": product(lambda: hvp.HessianOperator(
          model, x, y, method="reverse", **options)),
      "ggn": product(lambda: matrices.GGNOperator(
          model, x, y, method="reverse", **options)),
      "ggn_forward": product(lambda: matrices.GGNOperator(
          model, x, y, method="forward", **options)),
      "empirical_fisher": product(lambda: matrices.EmpiricalFisherOperator(
          model, x, y, **options)),
      "fisher": product(lambda: matrices.FisherOperator(
          model, x, y, mc_samples=1, seed=0, **options)),
  }


def main(argv):
  del argv
  rng = np.random.default_rng(0)
  print(f"# One product with each curvature matrix, batch {BATCH}; load "
        f"average {os.getloadavg()[0]:.1f}")
  for name, kwargs, shape, calls, num_rounds in CASES:
    if _QUICK.value:
      num_rounds = 2
    kwargs = dict(kwargs)
    model = models.get(kwargs.pop("name"), **kwargs)
    x = rng.normal(size=(BATCH, *shape)).astype(np.float32)
    y = rng.integers(0, 10, size=BATCH).astype(np.int64)
    cold, fns = {}, {}
    for key, build in _contenders(model, x, y).items():
      start = time.perf_counter()
      fn = build()
      common.sync(fn())
      cold[key] = time.perf_counter() - start
      fns[key] = fn
    warm = common.rounds(fns, num_rounds, calls)
    print(f"\n## {name} ({model.count_params():,} parameters), "
          f"{num_rounds} rounds of {calls} calls")
    print("| product | cold s (build + trace + 1 call) | warm ms | "
          "/ HVP (quartiles) | / gradient (quartiles) |")
    print("|---|---|---|---|---|")
    for key in fns:
      to_hvp, q_hvp = common.ratio_quartiles(warm[key], warm["hessian"])
      to_grad, q_grad = common.ratio_quartiles(warm[key], warm["gradient"])
      print(f"| {key} | {cold[key]:.2f} | {1e3 * np.median(warm[key]):.2f} "
            f"| {to_hvp:.2f} ({q_hvp[0]:.2f}-{q_hvp[1]:.2f}) | {to_grad:.2f} "
            f"({q_grad[0]:.2f}-{q_grad[1]:.2f}) |")


if __name__ == "__main__":
  app.run(main)
