"""Training: the loop, optimisers and schedules, callbacks, run directory."""

from tfcapacity.training.callbacks import Callback, Context  # noqa: F401
from tfcapacity.training.loop import Trainer, train  # noqa: F401
