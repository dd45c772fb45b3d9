"""Cost of the per-example gradient statistics (tfcapacity.gradients).

Everything timed runs in one process, in interleaved rounds, and reports
medians of per-round ratios with their quartiles: this 2-core machine's
speed drifts by +-25% over minutes, and other processes share it (the load
average is printed with each timing).

1. Statistics time / gradient time, n = 256 random examples (N(0, 1) inputs,
   uniform labels), MLP 40-1000-10 and ResNet-20 (32x32x3, batch norm in
   inference mode), at init. The statistics are the whole measurement:
   `get_computation(model, shape, chunk_size=c).inner_products(x, y)` for
   c = 64, 128, 256, followed by `statistics.summarize(G)`. Both models
   take the batched path for every variable (one forward/backward pass with
   probes at the Dense, Conv2D and batch-norm outputs; see
   `per_example`'s docstring): the Dense fast path gives (A A^T) * (D D^T)
   and D D^T without forming rows (the whole MLP, the ResNet's classifier),
   Conv2D and batch-norm rows are formed; `tf.vectorized_map` is left with
   nothing here. Blocks are float32 products in the graph, returned as
   float64. The baseline is ONE batch gradient over the same 256 examples:
   the mean cross-entropy, `training=False`, in a `tf.function` returning
   the flat gradient, inputs held as constants. For reference: the traced
   row function on one chunk of 256 (the per-example gradients M in the
   graph, no copy to numpy, no G), `summarize(G)` alone (numpy), and the
   former way, G = M M^T in numpy float64 + summarize on a stored M. The
   checks compare M with the loop of part 2, and G with M M^T in float64.
   Goal: statistics <= 4x one gradient, on both models.
2. The same per-example gradients by a Python loop of single-example tapes:
   a `tf.function` with a [1, ...] input signature (traced once) returning
   one example's flat gradient, called 256 times, rows stacked in numpy.
   Compared with `PerExampleGradients.__call__` (M in numpy), like for
   like, at each chunk size; the loop + G + summarize against the whole
   statistics is printed too. The eager loop (the same step without
   `tf.function`) is timed once: over all 256 examples on the MLP, over 16
   on ResNet-20, scaled to 256.
   Goals: vectorised >= 20x faster than the loop (MLP), >= 2.5x (ResNet-20).
3. Peak memory of `gradient_inner_products` + summarize for n = 1024 on
   ResNet-20 (chunk 256), exact and with `projection_dim=1024`, in a fresh
   subprocess per configuration, from after the model is built and a batch
   gradient has run: `tf.config.experimental.get_memory_info("CPU:0")`
   (on CPU in TF 2.21 its 'peak' is tracked, after `reset_memory_stats`,
   but 'current' reads 0; it sees TF's allocator only, not numpy), and the
   peak RSS growth: VmHWM from /proc/self/status, reset through
   /proc/self/clear_refs before the run (`ru_maxrss` would do in a fresh
   process but Linux carries the parent's peak across exec).

Printed, never asserted:
  python benchmarks/gradients.py [--quick] [--parts=time,loop,memory]
"""

import json
import os
import resource
import subprocess
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import common  # noqa: E402  (benchmarks/ is sys.path[0])
from tfcapacity import models  # noqa: E402
from tfcapacity.gradients import per_example  # noqa: E402
from tfcapacity.gradients import statistics  # noqa: E402
from tfcapacity.objective import losses  # noqa: E402
from tfcapacity.objective import function as function_lib  # noqa: E402

_QUICK = flags.DEFINE_bool("quick", False, "Fewer rounds (a smoke run).")
_PARTS = flags.DEFINE_list("parts", ["time", "loop", "memory"],
                           "time, loop, memory.")
_MEMORY_N = flags.DEFINE_integer("memory_n", 1024,
                                 "Examples of the part-3 measurement.")
_MEMORY_CHUNK = flags.DEFINE_integer(
    "memory_chunk", 256, "chunk_size of the part-3 measurement.")
_MEMORY_CHILD = flags.DEFINE_string(
    "memory_child", None,
    "Internal: run one part-3 configuration ('exact' or a projection "
    "dimension) and print its peaks as JSON.")

N = 256
CHUNKS = (64, 128, 256)
PROJECTION_DIM = 1024
STATS_GOAL = 4.0
LOOP_GOALS = {"MLP 40-1000-10": 20.0, "ResNet-20": 2.5}
MODELS = {
    "MLP 40-1000-10": dict(name="mlp", input_shape=(40,), num_classes=10,
                           width=1000, depth=1),
    "ResNet-20": dict(name="resnet", input_shape=(32, 32, 3), num_classes=10,
                      width=16, depth=20, normalization="batch"),
}


def _fmt(ratio):
  med, (lo, hi) = ratio
  return f"{med:.2f} ({lo:.2f}-{hi:.2f})"


def _build(name, n, seed=0):
  kwargs = dict(MODELS[name])
  keras.utils.set_random_seed(0)
  model = models.get(kwargs.pop("name"), **kwargs)
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, *kwargs["input_shape"])).astype(np.float32)
  y = rng.integers(0, kwargs["num_classes"], n).astype(np.int64)
  return model, x, y




def _single_step(model, input_shape, compiled=True):
  """One example's flat gradient (a [1, ...] batch)."""

  def step(x, y):
    with tf.GradientTape() as tape:
      loss = tf.reduce_mean(losses.cross_entropy(y, model(x, training=False)))
    return function_lib.flatten(tape.gradient(loss, model.trainable_variables))

  if not compiled:
    return step
  return tf.function(step, input_signature=[
      tf.TensorSpec([1, *input_shape], tf.float32),
      tf.TensorSpec([1], tf.int64)])


def _loop(step, xs, ys):
  return np.stack([step(a, b).numpy() for a, b in zip(xs, ys)])


def _trace_with_log(fn):
  """Calls fn (tracing it); returns the while_loop fallbacks reported."""
  before = set(per_example._REPORTED_FALLBACKS)
  common.sync(fn())
  return sorted(set(per_example._REPORTED_FALLBACKS) - before)


def _statistics(computation, x, y):
  return statistics.summarize(computation.inner_products(x, y))


def _load():
  return os.getloadavg()[0]


# --- 1 and 2. Time ------------------------------------------------------------


def part_time(quick, with_loop):
  print(f"## 1. Per-example gradient statistics / one batch gradient "
        f"(n = {N}, inference-mode batch norm, medians of per-round ratios, "
        f"quartiles in parentheses)\n")
  rows = []
  for name in MODELS:
    model, x, y = _build(name, N)
    shape = x.shape[1:]
    mlp = name.startswith("MLP")
    rounds = (2 if quick else 7) if mlp else (2 if quick else 4)
    gradient = common.flat_gradient(model, x, y)
    comps = {c: per_example.get_computation(model, shape, chunk_size=c)
             for c in CHUNKS}
    xt, yt = tf.constant(x), tf.constant(y)
    seed = tf.constant(0, tf.int64)
    contenders = {"gradient": gradient}
    for c, comp in comps.items():
      contenders[f"stats_{c}"] = (
          lambda comp=comp: _statistics(comp, x, y))
    contenders["rows_256"] = lambda: comps[256]._chunk(xt, yt, seed)
    contenders["gram_256"] = lambda: comps[256].inner_products(x, y)
    trace_start = time.perf_counter()
    fallbacks = {}
    for key, fn in contenders.items():
      fallbacks[key] = _trace_with_log(fn)
    trace_s = time.perf_counter() - trace_start
    # The loop contenders (part 2) are traced and checked here too.
    step = _single_step(model, shape)
    xs = [tf.constant(x[i:i + 1]) for i in range(N)]
    ys = [tf.constant(y[i:i + 1]) for i in range(N)]
    m_ref = comps[64](x, y).matrix
    m_loop = _loop(step, xs, ys)
    diff = float(np.max(np.abs(m_loop - m_ref)) / np.max(np.abs(m_ref)))
    g_mean = m_ref.mean(0)
    g_diff = float(np.max(np.abs(gradient().numpy() - g_mean))
                   / np.max(np.abs(g_mean)))
    gram_m = lambda: statistics.summarize(statistics.gram_from_gradients(  # noqa: E731
        m_ref))
    contenders["gram_summarize"] = gram_m
    g64 = statistics.gram_from_gradients(m_ref)
    g_fast = {c: comp.inner_products(x, y) for c, comp in comps.items()}
    gram_diff = max(float(np.max(np.abs(g - g64)) / np.max(np.abs(g64)))
                    for g in g_fast.values())
    contenders["summarize"] = lambda: statistics.summarize(g_fast[64])
    if with_loop:
      contenders["loop"] = lambda: _loop(step, xs, ys)
      for c, comp in comps.items():
        contenders[f"pe_{c}"] = lambda comp=comp: comp(x, y).matrix
    calls = {k: 1 for k in contenders}
    calls["gradient"] = 50 if mlp else 2
    calls["rows_256"] = 5 if mlp else 1
    calls["gram_256"] = 5 if mlp else 1
    load = _load()
    times = common.rounds(contenders, rounds, calls)
    load_after = _load()
    grad_ms = 1e3 * float(np.median(times["gradient"]))
    print(f"{name}: P = {comps[64].size} parameters; one batch gradient "
          f"{grad_ms:.2f} ms ({rounds} rounds; load average {load:.1f} -> "
          f"{load_after:.1f}); tracing every contender {trace_s:.0f} s")
    def count(paths):
      return sum(int(np.prod(p.shape)) for p in model.trainable_variables
                 if p.path in paths)

    dense, batched = comps[64].dense_paths, comps[64].batched_paths
    print(f"  batched path: {len(batched)} variables, {count(batched)} of "
          f"{comps[64].size} parameters (Dense fast path for G: "
          f"{len(dense)} variables, {count(dense)} parameters); "
          f"vectorized_map: the other {comps[64].size - count(batched)}")
    print(f"  checks: max |M_loop - M| / max |M| = {diff:.1e}; "
          f"max |batch gradient - mean row of M| / max = {g_diff:.1e}; "
          f"max |G - M M^T (numpy float64)| / max = {gram_diff:.1e} "
          f"(worst chunk size)")
    logged = sorted(set(m for v in fallbacks.values() for m in v))
    print("  pfor while_loop fallbacks reported while tracing: "
          + (", ".join(logged) if logged else "none"))
    stats = {c: common.ratio_quartiles(times[f"stats_{c}"],
                                       times["gradient"])
             for c in CHUNKS}
    best = min(CHUNKS, key=lambda c: stats[c][0])
    for c in CHUNKS:
      print(f"  statistics, chunk {c:3d}: "
            f"{1e3 * np.median(times[f'stats_{c}']):.1f} ms = "
            f"{_fmt(stats[c])}x gradient")
    vmap = common.ratio_quartiles(times["rows_256"], times["gradient"])
    summ = common.ratio_quartiles(times["summarize"], times["gradient"])
    gram_only = common.ratio_quartiles(times["gram_256"], times["gradient"])
    gram = common.ratio_quartiles(times["gram_summarize"], times["gradient"])
    share = common.ratio_quartiles(times["gram_summarize"],
                                   times[f"stats_{best}"])
    print(f"  per-example rows alone (one chunk of 256, in the graph): "
          f"{1e3 * np.median(times['rows_256']):.1f} ms = {_fmt(vmap)}x")
    print(f"  G alone (inner_products, chunk 256): "
          f"{1e3 * np.median(times['gram_256']):.1f} ms = {_fmt(gram_only)}x")
    print(f"  summarize(G) alone (numpy): "
          f"{1e3 * np.median(times['summarize']):.1f} ms = {_fmt(summ)}x")
    print(f"  former way, G = M M^T (numpy float64) + summarize: "
          f"{1e3 * np.median(times['gram_summarize']):.1f} ms = "
          f"{_fmt(gram)}x gradient = {_fmt(share)}x the statistics "
          f"(chunk {best})")
    row = dict(model=name, grad_ms=grad_ms, best=best, stats=stats[best],
               stats64=stats[64], vmap=vmap, gram=gram, summ=summ,
               gram_only=gram_only,
               gram_diff=gram_diff)
    if with_loop:
      pe = {c: common.ratio_quartiles(times["loop"], times[f"pe_{c}"])
            for c in CHUNKS}
      pe_best = max(CHUNKS, key=lambda c: pe[c][0])
      loop_stats = common.ratio_quartiles(
          times["loop"] + times["gram_summarize"], times[f"stats_{best}"])
      loop_grad = common.ratio_quartiles(times["loop"], times["gradient"])
      eager_step = _single_step(model, shape, compiled=False)
      k = N if mlp else 16
      start = time.perf_counter()
      _loop(eager_step, xs[:k], ys[:k])
      eager_s = (time.perf_counter() - start) * N / k
      eager = eager_s / float(np.median(times[f"pe_{pe_best}"]))
      print(f"  loop of {N} tf.function single-example steps: "
            f"{1e3 * np.median(times['loop']):.0f} ms = {_fmt(loop_grad)}x "
            f"gradient; loop / vectorised per-example gradients: "
            + ", ".join(f"chunk {c} {_fmt(pe[c])}" for c in CHUNKS))
      print(f"  (loop + G + summarize) / statistics (chunk {best}): "
            f"{_fmt(loop_stats)}")
      print(f"  eager loop ({'all' if k == N else k} examples"
            f"{'' if k == N else f', scaled to {N}'}): {eager_s:.2f} s = "
            f"{eager:.0f}x the vectorised per-example gradients (one run)")
      row.update(loop=pe[pe_best], loop_chunk=pe_best, loop_stats=loop_stats,
                 eager=eager)
    rows.append(row)
    print()

  print("| model | gradient ms | best chunk | statistics / gradient "
        "(quartiles) | chunk 64 | goal | met | G alone (chunk 256) | "
        "summarize alone | rows 256 / gradient | "
        "former numpy G + summarize / gradient | G error |")
  print("|---|---|---|---|---|---|---|---|---|---|---|---|")
  for r in rows:
    print(f"| {r['model']} | {r['grad_ms']:.2f} | {r['best']} | "
          f"{_fmt(r['stats'])} | {r['stats64'][0]:.2f} | <= {STATS_GOAL:g} | "
          f"{'yes' if r['stats'][0] <= STATS_GOAL else 'NO'} | "
          f"{_fmt(r['gram_only'])} | {_fmt(r['summ'])} | "
          f"{_fmt(r['vmap'])} | {_fmt(r['gram'])} | "
          f"{r['gram_diff']:.0e} |")
  print()
  if with_loop:
    print(f"## 2. Python loop of single-example tf.function tapes / "
          f"vectorised per-example gradients (n = {N})\n")
    print("| model | chunk | loop / vectorised (quartiles) | goal | met | "
          "(loop + G + summarize) / statistics | eager loop / vectorised |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
      goal = LOOP_GOALS[r["model"]]
      print(f"| {r['model']} | {r['loop_chunk']} | {_fmt(r['loop'])} | "
            f">= {goal:g} | {'yes' if r['loop'][0] >= goal else 'NO'} | "
            f"{_fmt(r['loop_stats'])} | {r['eager']:.0f} |")
    print()
  return rows


# --- 3. Memory ----------------------------------------------------------------


def _maxrss_mb():
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _hwm_mb():
  """This process's peak RSS (VmHWM), MB; None where /proc has none."""
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith("VmHWM:"):
          return int(line.split()[1]) / 1024
  except OSError:
    pass
  return None


def _reset_hwm():
  """Resets VmHWM to the current RSS (Linux >= 4.0); False if it cannot."""
  try:
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")
    return True
  except OSError:
    return False


def memory_child(config, n, chunk):
  """One configuration in this (fresh) process; prints its peaks as JSON."""
  projection = None if config == "exact" else int(config)
  model, x, y = _build("ResNet-20", n)
  common.sync(common.flat_gradient(model, x[:64], y[:64])())
  try:
    tf.config.experimental.reset_memory_stats("CPU:0")
    reset_info = True
  except (ValueError, tf.errors.OpError):
    reset_info = False
  info_before = tf.config.experimental.get_memory_info("CPU:0")
  reset_hwm = _reset_hwm()
  before = _hwm_mb() if reset_hwm else _maxrss_mb()
  start = time.perf_counter()
  gram = per_example.gradient_inner_products(
      model, x, y, chunk_size=chunk, projection_dim=projection)
  statistics.summarize(gram)
  seconds = time.perf_counter() - start
  info = tf.config.experimental.get_memory_info("CPU:0")
  print(json.dumps(dict(
      before_mb=before, peak_mb=_hwm_mb() if reset_hwm else _maxrss_mb(),
      reset_hwm=reset_hwm, maxrss_mb=_maxrss_mb(), seconds=seconds,
      reset_info=reset_info, info_before_mb=info_before["peak"] / 2**20,
      info_peak_mb=info["peak"] / 2**20,
      info_current_mb=info["current"] / 2**20)))


def part_memory(n, chunk):
  print(f"## 3. Peak memory of gradient_inner_products + summarize, "
        f"ResNet-20, n = {n}, chunk {chunk} (one fresh process each)\n")
  rows = []
  for config in ("exact", str(PROJECTION_DIM)):
    out = subprocess.run(
        [sys.executable, os.path.abspath(__file__), f"--memory_child={config}",
         f"--memory_n={n}", f"--memory_chunk={chunk}"],
        capture_output=True, text=True, check=False)
    lines = [l for l in out.stdout.splitlines() if l.startswith("{")]
    if out.returncode or not lines:
      print(f"{config}: failed (exit {out.returncode}):\n"
            + out.stderr[-2000:])
      continue
    r = json.loads(lines[-1])
    r["config"] = ("exact" if config == "exact"
                   else f"projection_dim={config}")
    rows.append(r)
  if rows:
    r = rows[0]
    print(f"get_memory_info('CPU:0'): 'peak' is tracked on CPU, 'current' "
          f"reads {r['info_current_mb']:.0f} MB (not tracked); "
          f"reset_memory_stats {'worked' if r['reset_info'] else 'failed'} "
          f"(peak before the run {r['info_before_mb']:.0f} MB). RSS: VmHWM "
          f"{'reset (/proc/self/clear_refs) before the run' if r['reset_hwm'] else 'not resettable: ru_maxrss growth'}"
          f" (ru_maxrss keeps the parent's peak across exec).\n")
  p = per_example.get_computation(*_build("ResNet-20", 2)[:1], (32, 32, 3),
                                  chunk_size=chunk).size
  print("| configuration | TF allocator peak MB (get_memory_info) | "
        "peak RSS MB | RSS before MB | RSS growth MB | seconds |")
  print("|---|---|---|---|---|---|")
  for r in rows:
    print(f"| {r['config']} | {r['info_peak_mb']:.0f} | {r['peak_mb']:.0f} | "
          f"{r['before_mb']:.0f} | {r['peak_mb'] - r['before_mb']:.0f} | "
          f"{r['seconds']:.0f} |")
  print(f"\nFor scale: M for n = {n} is {n * p * 4 / 2**20:.0f} MB in float32 "
        f"(P = {p}); one chunk of rows {chunk * p * 4 / 2**20:.0f} MB, "
        f"and inner_products keeps chunks up to 1 GiB for reuse.\n")
  return rows


def main(argv):
  del argv
  if _MEMORY_CHILD.value:
    tf.get_logger().setLevel("ERROR")
    memory_child(_MEMORY_CHILD.value, _MEMORY_N.value, _MEMORY_CHUNK.value)
    return
  tf.get_logger().setLevel("ERROR")
  start = time.perf_counter()
  print(f"TensorFlow {tf.__version__}, Keras {keras.__version__}, "
        f"{os.cpu_count()} CPUs, load average {_load():.1f}\n")
  if "time" in _PARTS.value or "loop" in _PARTS.value:
    part_time(_QUICK.value, "loop" in _PARTS.value)
  if "memory" in _PARTS.value:
    part_memory(256 if _QUICK.value else _MEMORY_N.value,
                _MEMORY_CHUNK.value)
  print(f"total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
  app.run(main)
