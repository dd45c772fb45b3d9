"""Which measurements a run makes: flags to callbacks, and training with them.

The composition root of training and measuring. The training loop
(`tfcapacity.training`) runs the callbacks it is given and knows none; each
measurement lives with what it measures and subclasses
`tfcapacity.training.Callback`:

  * `--curvature_every_epochs/steps`: lambda_max, top-k and trace
    (`tfcapacity.curvature.callback`, papers/003 Figs. 3-4);
  * `--linearize_every_steps`: adaptive linearisation of the rectifiers, an
    intervention written as a callback (`tfcapacity.curvature.linearize`,
    papers/003 Sec. 2.5);
  * `--gradients_every_epochs/steps`: gradient confusion, diversity and the
    Gram/NTK spectra (`tfcapacity.gradients.callback`).

`train` is training with those callbacks plus any given ones: the train CLI
(and through it the sweep runner), the studies, tests and benchmarks call it.
What runs inside every step (distance travelled, gradient noise, recorded
gradient variance) is training's own (`tfcapacity.training.dynamics`).
"""

from __future__ import annotations

from tfcapacity.curvature import callback as curvature_callback
from tfcapacity.curvature import linearize
from tfcapacity.gradients import callback as gradients_callback
from tfcapacity.gradients import tangent
from tfcapacity.training import callbacks as callbacks_lib
from tfcapacity.training import loop


def from_config(cfg) -> list[callbacks_lib.Callback]:
  """The measurements that the flags in `cfg` ask for, in a fixed order.

  Raises:
    UserError: a measurement's flags do not fit the run (before anything is
      written).
  """
  out = []
  if cfg.curvature_every_epochs or cfg.curvature_every_steps:
    out.append(curvature_callback.CurvatureCallback(cfg))
  if cfg.linearize_every_steps:
    out.append(linearize.LinearizationCallback(cfg))
  if cfg.gradients_every_epochs or cfg.gradients_every_steps:
    out.append(gradients_callback.GradientStatisticsCallback(cfg))
  return out


def trainer(cfg, strategy=None, callbacks=(), model_dir=None,
            datasets=None) -> loop.Trainer:
  """A `training.Trainer` with `callbacks` and those the flags ask for.

  The given callbacks run first, then the flags' in `from_config` order.
  Arguments as for `train`.
  """
  learning_rate_fn = None
  if getattr(cfg, "learning_rate_from", "flag") == "gram":
    learning_rate_fn = tangent.learning_rate_from_gram
  return loop.Trainer(cfg, strategy, list(callbacks) + from_config(cfg),
                      model_dir, datasets, learning_rate_fn=learning_rate_fn)


def train(cfg, strategy=None, callbacks=(), model_dir=None,
          datasets=None) -> dict:
  """Trains with the measurements the flags ask for plus `callbacks`.

  Args:
    cfg: a `tfcapacity.config.Config`.
    strategy: a `tf.distribute.Strategy`; default from `--strategy`.
    callbacks: further `tfcapacity.training.Callback`s.
    model_dir: the run directory; default `cfg.model_dir`.
    datasets: optional `(train, test)` Datasets replacing `--dataset`.

  Returns:
    The contents of the run's results.json.
  """
  return trainer(cfg, strategy, callbacks, model_dir, datasets).run()
