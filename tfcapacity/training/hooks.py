"""Step hooks: what plugs into the training step itself, inside its graph.

A callback (`tfcapacity.training.callbacks`) runs between calls of the
training `tf.function`, on the model as it is. Some of the maxi-batch study's
pieces must instead act on every step, inside the graph: the distance
travelled needs the parameters before and after each update, gradient noise
changes the gradients the optimizer applies, and the recorded gradient
variance needs each step's gradients (papers/003, Sec. 2.4 and Fig. 5). A
`StepHook` is that piece; the loop calls, in every step:

  state = hook.before_step()           cross-replica context, before it
  grads = hook.adjust_gradients(grads, step)
                                       replica context, on the gradients
                                       the optimizer is about to apply
                                       (L2 term included)
  hook.after_step(state)               cross-replica context, after it

and, outside the graph, checkpoints `hook.trackables()` under `hook.name`
(so a resumed run continues the hook's accumulators) and logs
`hook.scalars(step)` at step 0 and at the end of every epoch. Hooks are
called in their list order; the defaults do nothing and add no op, so a run
without hooks trains bit for bit as one whose hooks do nothing.

`tfcapacity.training.dynamics.hooks_from_config` builds the hooks that the
flags ask for.
"""

from __future__ import annotations

from tfcapacity.training import callbacks as callbacks_lib


class StepHook:
  """Base class of an in-graph addition to the training step.

  Attributes:
    name: the key of `trackables()` in the run's checkpoint.
  """

  name = "hook"

  def trackables(self) -> dict:
    """Objects (variables) to checkpoint with the run; {} for none."""
    return {}

  def before_step(self):
    """Called before each step in the cross-replica graph; returns a state
    that `after_step` receives."""
    return None

  def adjust_gradients(self, grads, step):
    """Called in each replica's step with its gradients (a list, one per
    trainable variable) and the optimizer's step counter; returns the
    gradients to apply."""
    del step
    return grads

  def after_step(self, state) -> None:
    """Called after each step in the cross-replica graph."""

  def scalars(self, step: int) -> dict[str, float]:
    """What to log at `step` (0 and every epoch end), eagerly."""
    del step
    return {}


def before_step(hooks):
  """Each hook's `before_step` state, in order."""
  return [hook.before_step() for hook in hooks]


def adjust_gradients(hooks, grads, step):
  """`grads` passed through each hook's `adjust_gradients`, in order."""
  for hook in hooks:
    grads = hook.adjust_gradients(grads, step)
  return grads


def after_step(hooks, states) -> None:
  for hook, state in zip(hooks, states):
    hook.after_step(state)


class HookScalars(callbacks_lib.Callback):
  """Logs the hooks' scalars at step 0 and at the end of every
  `every_epochs`-th epoch (`--track_distance_every_epochs`; full-batch
  runs have one step per epoch)."""

  # The name gives the timing scalar `timing/dynamics_seconds`: the hooks
  # are the study's training dynamics (tfcapacity.training.dynamics).
  name = "dynamics"
  every_epochs = 1
  log_keys = ()  # Set at each call: the whole-model scalars.

  def __init__(self, hooks, every_epochs: int = 1):
    self.hooks = list(hooks)
    self.every_epochs = max(1, int(every_epochs))

  def due(self, step, epoch, epoch_end):
    # Also at step 0, where a distance is 0 by construction.
    return step == 0 or (epoch_end and epoch % self.every_epochs == 0)

  def __call__(self, ctx):
    out = {}
    for hook in self.hooks:
      out.update(hook.scalars(ctx.step))
    # The console line: the whole-model values, not each layer's.
    layers = {layer.name for layer in ctx.model.layers}
    self.log_keys = tuple(k for k in out
                          if k.rsplit("/", 1)[-1] not in layers)
    return out
