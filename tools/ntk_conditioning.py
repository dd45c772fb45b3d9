"""How well conditioned is the NTK Gram matrix at initialisation?

  python tools/ntk_conditioning.py \
      --flagfile=flags/global_minima_mnist1d_cpu.flags \
      --n_values=32,128 --depths=1,2,4,8 --width=512 \
      --output=runs/ntk_conditioning.json

For each model, depth and number of examples n (the first n training
examples, as `--train_subset=n` takes them), the model of the base flags is
built at initialisation (seed `--seed` of the flagfile) and its NTK Gram
matrix Theta(0) over the n examples is computed (float64 with
`--dtype=float64`). The tool reports lambda_min, lambda_max, their ratio,
whether lambda_min is resolved in the model's precision
(`statistics.spectrum_resolved`; when it is not, the ratio is null in the
JSON, named in `non_finite`), and the steps full-batch gradient descent on
the linearised model needs to get every sign right with
eta = c n / lambda_max (c = the flagfile's --learning_rate under
--learning_rate_from=gram), up to --horizon steps.
This is what decided the global-minima study's n (docs/random_labels.md).

Exit status: 0, or 2 for bad input.
"""

import os
import sys
import time

from absl import app
from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))))

from tfcapacity import cli  # noqa: E402
from tfcapacity.errors import UserError  # noqa: E402
from tfcapacity.studies import common  # noqa: E402
from tfcapacity import rundir  # noqa: E402

flags.DEFINE_string("base_flagfile", None, "The runs' flagfile (also "
                    "--flagfile).")
flags.DEFINE_string("models", "mlp,fc_resnet", "Models.")
flags.DEFINE_string("depths", "1,2,4,8", "Depths (--depth).")
flags.DEFINE_string("n_values", "32,128", "Numbers of training examples.")
flags.DEFINE_integer("width", 512, "Width of every model.", lower_bound=1)
flags.DEFINE_integer("horizon", 100_000, "Linearised GD steps tried.",
                     lower_bound=1)
flags.DEFINE_string("output", None, "JSON file to write.")
FLAGS = flags.FLAGS
PROG = "ntk_conditioning"


def measure(base, model: str, depth: int, n: int) -> dict:
  import keras  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from tfcapacity import data  # pylint: disable=g-import-not-at-top
  from tfcapacity import models  # pylint: disable=g-import-not-at-top
  from tfcapacity.gradients import per_example  # pylint: disable=g-import-not-at-top
  from tfcapacity.gradients import statistics  # pylint: disable=g-import-not-at-top
  from tfcapacity.studies import global_minima  # pylint: disable=g-import-not-at-top
  cfg = base.replace(model=model, depth=depth, width=FLAGS.width,
                     train_subset=n)
  train = data.get(cfg.dataset, "train", cfg)
  x, y = train.examples(np.arange(train.info.num_examples))
  keras.utils.set_random_seed(cfg.seed)
  net = models.from_config(cfg, train.info.input_shape, train.info.num_classes)
  gram = per_example.gradient_inner_products(net, x, y, output="logits")
  eig = np.linalg.eigvalsh(gram)
  spectrum = statistics.gram_spectrum(gram, dtype=cfg.dtype)
  c = cfg.learning_rate if cfg.learning_rate_from == "gram" else 1.0
  outputs = np.asarray(net(x), np.float64)
  steps, _ = global_minima.linearised_fit(gram, outputs, y, c * n / eig[-1],
                                          FLAGS.horizon)
  return {"model": model, "depth": depth, "n": n, "width": FLAGS.width,
          "lambda_min": float(eig[0]), "lambda_max": float(eig[-1]),
          "condition_number": spectrum["condition_number"],
          "resolved": bool(spectrum["resolved"]), "c": float(c),
          "linearised_steps_to_fit": steps}


def main(argv):
  cli.no_arguments(PROG, argv)
  if not FLAGS.base_flagfile:
    cli.fail(PROG, "--flagfile is required, e.g. "
             "flags/global_minima_mnist1d_cpu.flags")
  if not FLAGS.output:
    cli.fail(PROG, "--output is required: the JSON file to write")
  started = time.time()
  try:
    from tfcapacity import config  # pylint: disable=g-import-not-at-top
    from tfcapacity.studies import global_minima  # pylint: disable=g-import-not-at-top
    base = config.parse_args([f"--flagfile={FLAGS.base_flagfile}"])
    depths = global_minima.parse_ints(FLAGS.depths, "depths")
    ns = global_minima.parse_ints(FLAGS.n_values, "n_values")
    names = [m.strip() for m in FLAGS.models.split(",") if m.strip()]
    rows = []
    with cli.quiet_native_stderr():
      for n in ns:
        for model in names:
          for depth in depths:
            rows.append(measure(base, model, depth, n))
            r = rows[-1]
            print(f"n={n} {model} depth {depth}: lambda_min "
                  f"{r['lambda_min']:.3g}, lambda_max {r['lambda_max']:.3g}, "
                  f"ratio {r['condition_number']:.3g}"
                  f"{'' if r['resolved'] else ' (unresolved)'}, linearised "
                  f"steps to fit {r['linearised_steps_to_fit']}", flush=True)
  except UserError as e:
    cli.fail(PROG, str(e))
  rundir.write_json(FLAGS.output, {
      "flagfile": FLAGS.base_flagfile, "rows": rows,
      "horizon": FLAGS.horizon, "seconds": time.time() - started})


if __name__ == "__main__":
  app.run(main, flags_parser=cli.flags_parser(
      PROG, rewrite=common.base_flagfile_arg))
