"""Cost of the curvature measurements: HVPs, lambda_max, the training callback.

Everything runs in one process, in interleaved rounds where there is
something to compare, and reports medians of per-round ratios: this 2-core
machine's speed drifts by +-25% over minutes.

1. Hessian-vector product time / gradient time, MLP 40-1000-10 and ResNet-20
   (32x32x3, batch norm), batch 128, random inputs and labels, at init.
   The gradient is a fair baseline: the same loss (mean cross-entropy over
   the same 128 examples, batch norm in inference mode, `training=False`, as
   the HVP's default bn_mode) in a `tf.function` returning the flat gradient.
   The HVP is `HessianOperator(model, x, y, batch_size=128, method=...)
   .matvec(v)` over exactly those examples, reverse-over-reverse and
   forward-over-reverse. Two more contenders tell the operator's own per-call
   cost from that of double backprop itself: the "bare" products, the same
   nested tapes (or ForwardAccumulator) on `model.stateless_call` in one
   `tf.function`, without the operator's in-graph batch loop, resident-data
   slicing and reductions. Everything is traced before timing. The
   arithmetic floor of reverse-over-reverse is printed too: the Conv2D and
   MatMul FLOPs its graph holds over those of the gradient's graph. Ratios
   come with their quartiles over rounds, timings with the load average
   (other processes share the 2 cores).
   Goals (the curvature issue): HVP / gradient <= 2.0 (MLP), <= 2.5 (ResNet-20).
2. Seconds and matvecs to lambda_max at 1e-3 relative residual
   (`power_iteration(op, tol=1e-3, max_iterations=200)`, reverse method) on
   ResNet-20 over 500 random CIFAR-shaped examples (N(0, 1) pixels, uniform
   random labels) after 20 SGD steps on such data (lr 0.1, momentum 0.9, the
   maxi-batch recipe; batch 128); then again after 5 more steps, warm-started
   from the previous eigenvector (the training callback's situation), and
   cold on that same model for comparison; also where each run first
   reached 1e-2 (from its progress reports, no extra matvecs), and seconds
   per HVP over the 500 examples against the gradient over them.
3. The training callback's overhead at the CPU maxi-batch flagfile's
   frequency (flags/maxibatch_resnet_digits_cpu.flags, its
   --curvature_every_epochs, or 1 if unset): short runs from the flagfile
   (twice that interval in epochs, so the first, tracing, measurement and two
   warm-started ones) with the curvature flags and with
   --curvature_every_epochs=0, interleaved. Overhead = callback seconds (the loop's
   `timing/curvature_seconds` in results.json) / training seconds (steps x
   batch / the loop's examples_per_second, which leaves out evaluation,
   callbacks and the first, tracing, chunk of steps). Goal: <= 10%.
   HVPs are counted by wrapping `HessianOperator.matvec` for the run.

Printed, never asserted:
  python benchmarks/curvature.py [--quick] [--parts=hvp,lambda,callback]
"""

import os
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from absl import logging  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from tfcapacity import config  # noqa: E402
import common  # noqa: E402  (benchmarks/ is sys.path[0])
from tfcapacity import models  # noqa: E402
from tfcapacity import measurements as measurements_lib  # noqa: E402
from tfcapacity.curvature import eigen  # noqa: E402
from tfcapacity.curvature import hvp  # noqa: E402
from tfcapacity.objective import losses  # noqa: E402
from tfcapacity.objective import function as function_lib  # noqa: E402
from tfcapacity import objective  # noqa: E402

_QUICK = flags.DEFINE_bool("quick", False, "Fewer rounds (a smoke run).")
_PARTS = flags.DEFINE_list("parts", ["hvp", "lambda", "callback"],
                           "hvp, lambda, callback.")
_TRAIN_FLAGFILE = flags.DEFINE_string(
    "train_flagfile",
    os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir,
                 "flags", "maxibatch_resnet_digits_cpu.flags"),
    "The training run whose callback overhead part 3 measures.")
_CALLBACK_EPOCHS = flags.DEFINE_integer(
    "callback_epochs", 0,
    "Epochs of each part-3 run (0: twice the measurement interval, so the "
    "run holds the first, tracing, measurement and two warm-started ones).")

BATCH = 128
HVP_GOALS = {"MLP 40-1000-10": 2.0, "ResNet-20": 2.5}
CALLBACK_GOAL = 0.10










# --- 1. HVP / gradient -------------------------------------------------------


def _hvp_cases(quick):
  rng = np.random.default_rng(0)
  # (name, builder kwargs, inputs, calls per sample, rounds)
  yield ("MLP 40-1000-10",
         dict(name="mlp", input_shape=(40,), num_classes=10, width=1000,
              depth=1),
         rng.normal(size=(BATCH, 40)).astype(np.float32),
         50, 3 if quick else 15)
  yield ("ResNet-20",
         dict(name="resnet", input_shape=(32, 32, 3), num_classes=10,
              width=16, depth=20, normalization="batch"),
         rng.normal(size=(BATCH, 32, 32, 3)).astype(np.float32),
         1, 2 if quick else 10)




def graph_flops(concrete) -> float:
  """FLOPs of the Conv2D (and its backprops) and MatMul ops of a traced
  function that its outputs depend on (2 per multiply-add; element-wise work
  is not counted). Ops inside nested functions, such as the JVPs of
  `ForwardAccumulator`, are not seen."""
  seen, stack = set(), [t.op for t in concrete.outputs]
  total = 0
  while stack:
    op = stack.pop()
    if op.name in seen:
      continue
    seen.add(op.name)
    stack += [t.op for t in op.inputs] + list(op.control_inputs)
    if op.type == "Conv2D":
      kh, kw, cin, _ = op.inputs[1].shape
      total += 2 * op.outputs[0].shape.num_elements() * kh * kw * cin
    elif op.type in ("Conv2DBackpropInput", "Conv2DBackpropFilter"):
      kernel = (op.inputs[1] if op.type == "Conv2DBackpropInput"
                else op.outputs[0]).shape
      kh, kw, cin, _ = kernel
      total += 2 * op.inputs[2].shape.num_elements() * kh * kw * cin
    elif op.type == "MatMul":
      a = op.inputs[0].shape
      k = a[0] if op.get_attr("transpose_a") else a[1]
      total += 2 * op.outputs[0].shape.num_elements() * k
  return float(total)


def _bare_products(model, x, y):
  """Nested-tape and ForwardAccumulator HVPs in one `tf.function` each."""
  variables = model.trainable_variables
  shapes = [v.shape for v in variables]
  x, y = tf.constant(x), tf.constant(y)
  spec = tf.TensorSpec([sum(int(np.prod(s)) for s in shapes)], tf.float32)

  def loss_at(values):
    non_trainable = [v.value for v in model.non_trainable_variables]
    logits, _ = model.stateless_call(values, non_trainable, x,
                                     training=False)
    return tf.reduce_mean(losses.cross_entropy(y, logits))

  @tf.function(input_signature=[spec])
  def reverse(flat):
    vector = function_lib.unflatten(flat, shapes)
    values = [tf.convert_to_tensor(v.value) for v in variables]
    with tf.GradientTape() as outer:
      outer.watch(values)
      with tf.GradientTape() as inner:
        inner.watch(values)
        loss = loss_at(values)
      grads = inner.gradient(loss, values)
      dot = tf.add_n([tf.reduce_sum(g * v) for g, v in zip(grads, vector)])
    return function_lib.flatten(outer.gradient(dot, values))

  @tf.function(input_signature=[spec])
  def forward(flat):
    vector = function_lib.unflatten(flat, shapes)
    values = [tf.convert_to_tensor(v.value) for v in variables]
    with tf.autodiff.ForwardAccumulator(values, vector) as acc:
      with tf.GradientTape() as tape:
        tape.watch(values)
        loss = loss_at(values)
      grads = tape.gradient(loss, values)
    return function_lib.flatten([acc.jvp(g) for g in grads])

  return {"reverse": reverse, "forward": forward}


def part_hvp(quick):
  print("## 1. HVP time / gradient time (batch 128, inference-mode batch "
        "norm, medians of per-round ratios)\n")
  rows = []
  for name, kwargs, x, calls, rounds in _hvp_cases(quick):
    keras.utils.set_random_seed(0)
    model = models.get(kwargs.pop("name"), **kwargs)
    y = np.random.default_rng(1).integers(0, 10, BATCH).astype(np.int64)
    gradient = common.flat_gradient(model, x, y)
    ops = {m: hvp.HessianOperator(model, x, y, batch_size=BATCH, method=m)
           for m in objective.HVP_METHODS}
    bare = _bare_products(model, x, y)
    v = tf.random.normal([ops["reverse"].size], seed=0)
    contenders = {"gradient": gradient}
    for m in objective.HVP_METHODS:
      contenders[f"op_{m}"] = lambda op=ops[m]: op.matvec(v)
      contenders[f"bare_{m}"] = lambda f=bare[m]: f(v)
    for fn in contenders.values():  # traces
      common.sync(fn())
    # The contenders compute the same product (a check, not a timing).
    reference = ops["reverse"].matvec(v)
    scale = float(tf.reduce_max(tf.abs(reference)))
    diffs = {k: float(tf.reduce_max(tf.abs(contenders[k]() - reference)))
             / scale for k in contenders if k != "gradient"}
    op_grad = ops["reverse"].loss_and_gradient()[1]
    diffs["gradient vs operator's"] = float(
        tf.reduce_max(tf.abs(gradient() - op_grad))
        / tf.reduce_max(tf.abs(op_grad)))
    flop_ratio = (graph_flops(bare["reverse"].get_concrete_function())
                  / graph_flops(gradient.get_concrete_function()))
    load = os.getloadavg()[0]
    times = common.rounds(contenders, rounds, calls)
    grad_ms = 1e3 * float(np.median(times["gradient"]))
    print(f"{name}: gradient {grad_ms:.2f} ms ({rounds} rounds of {calls} "
          f"calls; load average {load:.1f} -> {os.getloadavg()[0]:.1f}); "
          f"max |Hv - Hv_op_reverse| / max |Hv_op_reverse|: "
          + ", ".join(f"{k} {d:.1e}" for k, d in diffs.items()))
    print(f"  Conv2D/MatMul FLOPs of the reverse-over-reverse graph / the "
          f"gradient's: {flop_ratio:.2f}")
    for m in objective.HVP_METHODS:
      op_t, bare_t = times[f"op_{m}"], times[f"bare_{m}"]
      ratio, spread = common.ratio_quartiles(op_t, times["gradient"])
      row = dict(
          model=name, method=m, grad_ms=grad_ms,
          op_ms=1e3 * float(np.median(op_t)), ratio=ratio, spread=spread,
          flop_ratio=flop_ratio if m == "reverse" else None,
          goal=HVP_GOALS[name],
          bare_ms=1e3 * float(np.median(bare_t)),
          bare_ratio=common.median_ratio(bare_t, times["gradient"]),
          op_vs_bare=common.median_ratio(op_t, bare_t),
          overhead_ms=1e3 * float(np.median(op_t - bare_t)))
      rows.append(row)
      print(f"  {m:7s}: operator {row['op_ms']:.2f} ms = "
            f"{row['ratio']:.2f}x gradient (quartiles {row['spread'][0]:.2f}"
            f"-{row['spread'][1]:.2f}; goal <= {row['goal']:.1f}) | "
            f"bare {row['bare_ms']:.2f} ms = {row['bare_ratio']:.2f}x | "
            f"operator / bare {row['op_vs_bare']:.2f} "
            f"({row['overhead_ms']:+.2f} ms per call)")
    sys.stdout.flush()
  print("\n| model | method | gradient ms | HVP ms | HVP / gradient "
        "(quartiles) | goal | met | bare HVP / gradient | operator / bare | "
        "operator - bare ms | FLOPs HVP / gradient |")
  print("|---|---|---|---|---|---|---|---|---|---|---|")
  for r in rows:
    met = "yes" if r["ratio"] <= r["goal"] else "no"
    flop = f"{r['flop_ratio']:.2f}" if r["flop_ratio"] else "-"
    print(f"| {r['model']} | {r['method']} | {r['grad_ms']:.2f} | "
          f"{r['op_ms']:.2f} | {r['ratio']:.2f} ({r['spread'][0]:.2f}-"
          f"{r['spread'][1]:.2f}) | <= {r['goal']:.1f} | {met} | "
          f"{r['bare_ratio']:.2f} | {r['op_vs_bare']:.2f} | "
          f"{r['overhead_ms']:+.2f} | {flop} |")
  print()
  return rows


# --- 2. lambda_max -----------------------------------------------------------


class _Diagonal:
  """A cheap operator of a given size: traces eigen's kernels before timing."""

  def __init__(self, size):
    self.size, self.dtype = size, tf.float32
    self.d = tf.linspace(1.0, 2.0, size)

  def matvec(self, v):
    return self.d * v


def _sgd_steps(model, optimizer, x, y, steps, offset):
  ce = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

  @tf.function
  def step(xb, yb):
    with tf.GradientTape() as tape:
      loss = ce(yb, model(xb, training=True))
    grads = tape.gradient(loss, model.trainable_variables)
    optimizer.apply_gradients(zip(grads, model.trainable_variables))
    return loss

  n = len(y)
  for i in range(offset, offset + steps):
    idx = np.arange(i * BATCH, (i + 1) * BATCH) % n
    loss = step(x[idx], y[idx])
  return float(loss)


def _power(op, v0=None):
  """power_iteration at tol 1e-3, its seconds, and (matvecs, eigenvalue)
  when the relative residual first fell to 1e-2 (from its progress)."""
  loose = []

  def progress(i, info):
    if not loose and info["relative_residual"] <= 1e-2:
      loose.append((i, info["eigenvalue"]))

  start = time.perf_counter()
  result = eigen.power_iteration(op, tol=1e-3, max_iterations=200, v0=v0,
                                 progress=progress)
  return result, time.perf_counter() - start, (loose or [(None, None)])[0]


def part_lambda(quick):
  print("## 2. lambda_max of ResNet-20 over 500 examples (power iteration, "
        "tol 1e-3, max 200 matvecs, reverse method)\n")
  keras.utils.set_random_seed(0)
  model = models.get("resnet", input_shape=(32, 32, 3), num_classes=10,
                     width=16, depth=20, normalization="batch")
  rng = np.random.default_rng(0)
  x = rng.normal(size=(25 * BATCH, 32, 32, 3)).astype(np.float32)
  y = rng.integers(0, 10, len(x)).astype(np.int64)
  optimizer = keras.optimizers.SGD(learning_rate=0.1, momentum=0.9)
  loss = _sgd_steps(model, optimizer, x, y, 20, 0)
  print(f"data: random CIFAR-shaped inputs N(0,1), random labels; model "
        f"after 20 SGD steps (lr 0.1, momentum 0.9, batch {BATCH}): batch "
        f"loss {loss:.3f}")
  op = hvp.HessianOperator(model, x[:500], y[:500], method="reverse")
  v = tf.random.normal([op.size], seed=1)
  start = time.perf_counter()
  common.sync(op.matvec(v))
  trace_s = time.perf_counter() - start
  common.sync(op.loss_and_gradient()[1])
  eigen.power_iteration(_Diagonal(op.size), tol=1e9, max_iterations=1)
  reps = 1 if quick else 5
  t = common.rounds({"hvp": lambda: op.matvec(v),
                     "gradient": lambda: op.loss_and_gradient()[1]}, reps, 1)
  hvp_s = float(np.median(t["hvp"]))
  grad_s = float(np.median(t["gradient"]))
  print(f"HVP over 500 (one batch of {op.batch_size}): {hvp_s:.2f} s; "
        f"gradient over 500: {grad_s:.2f} s; ratio "
        f"{common.median_ratio(t['hvp'], t['gradient']):.2f} ({reps} rounds); "
        f"first call (tracing) {trace_s:.1f} s")
  rows = []
  cold, secs, loose = _power(op)
  rows.append(("cold, after 20 steps", cold, secs, loose))
  print(f"  cold: lambda_max {cold.eigenvalue:.4g}, relative residual "
        f"{cold.relative_residual:.1e}, {cold.iterations} matvecs, "
        f"{secs:.1f} s")
  sys.stdout.flush()
  loss = _sgd_steps(model, optimizer, x, y, 5, 20)
  warm, secs, loose = _power(op, v0=cold.eigenvector)
  rows.append(("warm, after 5 more steps", warm, secs, loose))
  print(f"  5 more steps (batch loss {loss:.3f}); warm start: lambda_max "
        f"{warm.eigenvalue:.4g}, {warm.iterations} matvecs, {secs:.1f} s")
  sys.stdout.flush()
  if not quick:
    again, secs, loose = _power(op)
    rows.append(("cold, same model as warm", again, secs, loose))
    print(f"  cold on the same model: lambda_max {again.eigenvalue:.4g}, "
          f"{again.iterations} matvecs, {secs:.1f} s")
  print("\n| start | lambda_max | relative residual | converged | matvecs | "
        "seconds | s per matvec | at 1e-2: matvecs, lambda (rel. error) |")
  print("|---|---|---|---|---|---|---|---|")
  for name, r, secs, (i, value) in rows:
    at_loose = (f"{i}, {value:.4g} ({abs(value / r.eigenvalue - 1):.0e})"
                if i else "-")
    print(f"| {name} | {r.eigenvalue:.4g} | {r.relative_residual:.1e} | "
          f"{'yes' if r.converged else 'no'} | {r.iterations} | {secs:.1f} | "
          f"{secs / r.iterations:.2f} | {at_loose} |")
  print(f"\nHVP over 500 examples: {hvp_s:.2f} s = "
        f"{common.median_ratio(t['hvp'], t['gradient']):.2f}x the gradient "
        f"over "
        f"them ({grad_s:.2f} s)\n")
  return rows


# --- 3. the training callback ------------------------------------------------


class _CountProducts:
  """Counts and times `HessianOperator.matvec` calls while active.

  The first call of each operator (it traces) is kept apart.
  """

  def __enter__(self):
    self.calls = self.first_calls = 0
    self.seconds = self.first_seconds = 0.0
    self._seen = set()
    self._original = original = hvp.HessianOperator.matvec

    def counted(op, v):
      start = time.perf_counter()
      out = original(op, v)
      common.sync(out)
      elapsed = time.perf_counter() - start
      if id(op) in self._seen:
        self.calls += 1
        self.seconds += elapsed
      else:
        self._seen.add(id(op))
        self.first_calls += 1
        self.first_seconds += elapsed
      return out

    hvp.HessianOperator.matvec = counted
    return self

  def __exit__(self, *exc):
    hvp.HessianOperator.matvec = self._original


def _train_run(flagfile, epochs, every, with_curvature):
  with tempfile.TemporaryDirectory() as model_dir:
    cfg = config.parse_args([
        f"--flagfile={flagfile}", f"--epochs={epochs}", "--noprogress_bar",
        "--noexport", f"--model_dir={model_dir}",
        f"--curvature_every_epochs={every if with_curvature else 0}",
        "--curvature_every_steps=0"])
    with _CountProducts() as products:
      start = time.perf_counter()
      results = measurements_lib.train(cfg)
      wall = time.perf_counter() - start
  rows = [r for r in results["measurements"]
          if "timing/curvature_seconds" in r]
  train_s = (results["steps"] * results["global_batch_size"]
             / results["examples_per_second"])
  callback = [r["timing/curvature_seconds"] for r in rows]
  return dict(
      wall=wall, train_s=train_s, epochs=epochs,
      callback_s=sum(callback), first_s=callback[0] if callback else 0.0,
      steady=callback[1:], measurements=len(rows),
      train_matvecs=sum(int(r["curvature/iterations"]) for r in rows),
      products=products.calls + products.first_calls,
      product_s=products.seconds, steady_products=products.calls,
      first_product_s=products.first_seconds, rows=rows)


def part_callback(quick):
  flagfile = os.path.abspath(_TRAIN_FLAGFILE.value)
  base = config.parse_args([f"--flagfile={flagfile}", "--model_dir=unused"])
  # A flagfile without an epoch interval (unset, or in steps) is measured
  # every epoch; the flagfile's own values are printed with the result.
  every = base.curvature_every_epochs or 1
  epochs = _CALLBACK_EPOCHS.value or (every if quick else 2 * every)
  rounds = 1 if quick else 3
  print(f"## 3. The curvature callback's overhead, "
        f"{os.path.relpath(flagfile)}\n")
  print(f"frequency: every {every} epochs (flagfile: "
        f"--curvature_every_epochs={base.curvature_every_epochs}, "
        f"--curvature_every_steps={base.curvature_every_steps}); "
        f"--curvature_examples={base.curvature_examples}, "
        f"--curvature_test_batches={base.curvature_test_batches}, "
        f"--curvature_tol={base.curvature_tol}, "
        f"--curvature_max_iterations={base.curvature_max_iterations}, "
        f"--curvature_batch_size={base.curvature_batch_size}, "
        f"bn_mode {base.curvature_bn_mode}; runs of {epochs} of the "
        f"flagfile's {base.epochs} epochs, {rounds} interleaved rounds")
  runs = {True: [], False: []}
  for r in range(rounds):
    for with_curvature in ((True, False) if r % 2 == 0 else (False, True)):
      run = _train_run(flagfile, epochs, every, with_curvature)
      runs[with_curvature].append(run)
      if with_curvature:
        steps = ", ".join(
            f"step {row['step']}: {row['timing/curvature_seconds']:.2f} s, "
            f"{int(row['curvature/iterations'])} train matvecs, "
            f"lambda_max {row['curvature/lambda_max']:.3g}"
            + (f" (test {row['curvature/lambda_max_test']:.3g})"
               if "curvature/lambda_max_test" in row else "")
            for row in run["rows"])
        print(f"  round {r + 1} with curvature: wall {run['wall']:.1f} s, "
              f"training {run['train_s']:.1f} s, callback "
              f"{run['callback_s']:.1f} s over {run['measurements']} "
              f"measurements [{steps}]; {run['products']} HVPs "
              f"({run['products'] - run['train_matvecs']} on test batches), "
              f"{run['product_s'] + run['first_product_s']:.1f} s in HVPs, "
              f"of which {run['first_product_s']:.1f} s in the first "
              f"(tracing) HVP of each operator")
      else:
        print(f"  round {r + 1} without: wall {run['wall']:.1f} s, "
              f"training {run['train_s']:.1f} s")
      sys.stdout.flush()
  with_runs, without_runs = runs[True], runs[False]
  overhead = np.array([w["callback_s"] / w["train_s"] for w in with_runs])
  steady_share = np.array([
      np.sum(w["steady"]) / w["train_s"] for w in with_runs])
  wall_extra = np.array([(w["wall"] - wo["wall"]) / wo["train_s"]
                         for w, wo in zip(with_runs, without_runs)])
  med = lambda key: float(np.median([w[key] for w in with_runs]))  # noqa: E731
  per_hvp = float(np.median([w["product_s"] / max(w["steady_products"], 1)
                             for w in with_runs]))
  steady_each = float(np.median(
      [s for w in with_runs for s in w["steady"]] or [np.nan]))
  train_epoch = float(np.median([w["train_s"] / w["epochs"]
                                 for w in with_runs + without_runs]))
  needed = steady_each / (CALLBACK_GOAL * train_epoch)
  print(f"\n| frequency | epochs | training s | callback s | measurements | "
        f"first (tracing) s | later, each s | HVPs per measurement | s per "
        f"HVP | callback / training | goal | met | (wall with - without) / "
        f"training |")
  print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
  print(f"| every {every} epochs | {epochs} | {med('train_s'):.1f} | "
        f"{med('callback_s'):.1f} | {int(med('measurements'))} | "
        f"{med('first_s'):.1f} | {steady_each:.2f} | "
        f"{med('products') / med('measurements'):.1f} | {per_hvp:.3f} | "
        f"{100 * float(np.median(overhead)):.0f}% | <= "
        f"{100 * CALLBACK_GOAL:.0f}% | "
        f"{'yes' if np.median(overhead) <= CALLBACK_GOAL else 'no'} | "
        f"{100 * float(np.median(wall_extra)):.0f}% |")
  print(f"\nWithout the first (tracing) measurement: "
        f"{100 * float(np.median(steady_share)):.0f}% of training time. "
        f"Training: {train_epoch:.2f} s per epoch; one later measurement "
        f"costs {steady_each / train_epoch:.1f} epochs of training, so <= "
        f"{100 * CALLBACK_GOAL:.0f}% needs a measurement every "
        f"{needed:.0f} epochs or more at this cost.\n")
  return dict(overhead=float(np.median(overhead)), every=every)


def main(argv):
  del argv
  # Several operators each trace their own functions once; TF's "retracing"
  # warning about that is not a retrace.
  tf.get_logger().setLevel("ERROR")
  if not flags.FLAGS["verbosity"].present:  # The loop's per-epoch lines.
    logging.set_verbosity(logging.WARNING)
  start = time.perf_counter()
  print(f"TensorFlow {tf.__version__}, Keras {keras.__version__}, "
        f"{os.cpu_count()} CPUs\n")
  if "hvp" in _PARTS.value:
    part_hvp(_QUICK.value)
  if "lambda" in _PARTS.value:
    part_lambda(_QUICK.value)
  if "callback" in _PARTS.value:
    part_callback(_QUICK.value)
  print(f"total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
  app.run(main)
