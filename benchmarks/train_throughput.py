"""Training throughput of tfcapacity's loop against `keras.Model.fit`.

Runs in one process, so the ratios are fair on a shared, noisy machine:
  * examples/s of `tfcapacity.training.Trainer`'s epoch (iterator and
    multi-step `tf.function` calls, as in `Trainer.run`), of plain `fit`, and
    of `fit(steps_per_execution=20)` on the same model, data and batch, in
    interleaved rounds (medians of the per-round ratios);
  * the loop's achieved GFLOP/s as a share of this machine's float32 matmul
    peak (2048 x 2048 `tf.linalg.matmul`).
FLOPs are counted analytically from the Dense and Conv2D layers (2 per
multiply-add) and a training step is taken as 3x the forward pass (forward,
and backward for inputs and weights); element-wise work is not counted, so
the share is a lower bound.

Printed, never asserted:  python benchmarks/train_throughput.py [--quick]
"""

import os
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from tfcapacity import config  # noqa: E402
from tfcapacity import models  # noqa: E402
from tfcapacity import training  # noqa: E402
from tfcapacity.data import base  # noqa: E402

_QUICK = flags.DEFINE_bool("quick", False, "Fewer steps (a smoke run).")
_CASES = flags.DEFINE_list("cases", ["mlp", "resnet20"], "mlp, resnet20.")
_STEPS_PER_LOOP = flags.DEFINE_integer(
    "loop_steps_per_loop", 50, "The loop's --steps_per_loop.")

BATCH = 128


def matmul_peak_gflops(n=2048, reps=20):
  a = tf.random.normal([n, n])
  b = tf.random.normal([n, n])

  @tf.function
  def run():
    acc = tf.zeros([n, n])
    for _ in tf.range(reps):
      acc += tf.linalg.matmul(a, b)
    return acc

  run().numpy()
  best = float("inf")
  for _ in range(3):
    start = time.perf_counter()
    run().numpy()
    best = min(best, time.perf_counter() - start)
  return 2 * n ** 3 * reps / best / 1e9


def cases(quick):
  rng = np.random.default_rng(0)
  mlp_steps = 100 if quick else 400
  res_steps = 4 if quick else 20
  yield ("MLP 40-1000-10", dict(model="mlp", width=1000, depth=1,
                                activation="relu"),
         rng.normal(size=(BATCH * mlp_steps, 40)).astype(np.float32),
         2 if quick else 9)
  yield ("ResNet-20 32x32x3", dict(model="resnet", width=16, depth=20,
                                   normalization="batch",
                                   kernel_init="he_normal"),
         rng.normal(size=(BATCH * res_steps, 32, 32, 3)).astype(np.float32),
         1 if quick else 5)


class LoopContender:
  """The tfcapacity loop: a real Trainer, timed over whole epochs.

  An epoch is what `Trainer.run` does between evaluations: make the epoch's
  iterator, then call the multi-step `tf.function` every --steps_per_loop
  steps. The Trainer's first `run()` traces and warms up.
  """

  def __init__(self, model_kwargs, x, y, model_dir):
    n = len(y)
    info = base.DatasetInfo("bench", "train", 10, x.shape[1:], n)
    data = base.ArrayDataset(info, x, y)
    test = base.ArrayDataset(info, x[:BATCH], y[:BATCH])
    cfg = config.make(batch_size=str(BATCH), epochs=1, eval_every=1000,
                      learning_rate=0.01, progress_bar=False, export=False,
                      steps_per_loop=_STEPS_PER_LOOP.value, **model_kwargs)
    self.trainer = training.Trainer(
        cfg, tf.distribute.OneDeviceStrategy("/cpu:0"), model_dir=model_dir,
        datasets=(data, test))
    self.trainer.run()
    self.model = self.trainer.model
    self.epoch = 1

  def epoch_rate(self):
    trainer = self.trainer
    spe, per_call = trainer.steps_per_epoch, trainer.cfg.steps_per_loop
    start = time.perf_counter()
    iterator = trainer.train_iterator(self.epoch)
    done = 0
    while done < spe:
      steps = min(per_call, spe - done)
      trainer.run_steps(iterator, steps)
      done += steps
    self.epoch += 1
    return spe * BATCH / (time.perf_counter() - start)


class FitContender:
  """`keras.Model.fit` on the same model, data and batch, one epoch a call."""

  def __init__(self, model_kwargs, x, y, steps_per_execution):
    keras.utils.set_random_seed(0)
    cfg = config.make(**model_kwargs)
    self.model = models.from_config(cfg, x.shape[1:], 10)
    self.model.compile(optimizer=keras.optimizers.SGD(0.01),
                       loss=keras.losses.SparseCategoricalCrossentropy(
                           from_logits=True),
                       steps_per_execution=steps_per_execution)
    self.ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(
        BATCH, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
    self.examples = len(y) // BATCH * BATCH
    self.epoch_rate()  # traces

  def epoch_rate(self):
    start = time.perf_counter()
    self.model.fit(self.ds, epochs=1, verbose=0)
    return self.examples / (time.perf_counter() - start)


def main(argv):
  del argv
  print(f"TensorFlow {tf.__version__}, Keras {keras.__version__}, "
        f"{os.cpu_count()} CPUs, batch {BATCH}")
  peak = matmul_peak_gflops()
  print(f"float32 matmul peak (2048x2048): {peak:.1f} GFLOP/s\n")
  rows = []
  for name, kwargs, x, rounds in cases(_QUICK.value):
    key = "mlp" if kwargs["model"] == "mlp" else "resnet20"
    if key not in _CASES.value:
      continue
    y = np.random.default_rng(1).integers(0, 10, len(x)).astype(np.int64)
    with tempfile.TemporaryDirectory() as model_dir:
      contenders = {"loop": LoopContender(kwargs, x, y, model_dir),
                    "fit": FitContender(kwargs, x, y, 1),
                    "fit20": FitContender(kwargs, x, y, 20)}
      # Interleaved rounds: the machine's load drifts, so each ratio is
      # taken within a round and the medians are reported.
      rates = {k: [] for k in contenders}
      for _ in range(rounds):
        for key, contender in contenders.items():
          rates[key].append(contender.epoch_rate())
    loop = float(np.median(rates["loop"]))
    fit = float(np.median(rates["fit"]))
    fit20 = float(np.median(rates["fit20"]))
    vs_fit = float(np.median(np.divide(rates["loop"], rates["fit"])))
    vs_fit20 = float(np.median(np.divide(rates["loop"], rates["fit20"])))
    gflops = loop * 3 * models.forward_flops(contenders["loop"].model) / 1e9
    rows.append((name, loop, fit, fit20, vs_fit, vs_fit20, gflops,
                 gflops / peak))
    print(f"{name}: loop {loop:,.0f} ex/s | fit {fit:,.0f} ex/s | "
          f"fit(spe=20) {fit20:,.0f} ex/s | loop/fit {vs_fit:.2f}x | "
          f"loop/fit(spe=20) {vs_fit20:.2f}x | {gflops:.1f} GFLOP/s = "
          f"{100 * gflops / peak:.0f}% of matmul peak ({rounds} rounds)")
    sys.stdout.flush()
  print("\n| model | loop ex/s | fit ex/s | fit(spe=20) ex/s | loop/fit | "
        "loop/fit(spe=20) | loop GFLOP/s | % of peak |")
  print("|---|---|---|---|---|---|---|---|")
  for name, loop, fit, fit20, vs_fit, vs_fit20, gflops, share in rows:
    print(f"| {name} | {loop:,.0f} | {fit:,.0f} | {fit20:,.0f} | "
          f"{vs_fit:.2f} | {vs_fit20:.2f} | {gflops:.1f} | "
          f"{100 * share:.0f}% |")


if __name__ == "__main__":
  app.run(main)
