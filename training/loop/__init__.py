"""The training loop and what only it uses:

- ``config``: the loop's hyperparameters, typed (``TrainingConfig``), and the checks that they fit;
- ``setup``: distributed state, data, network, optimizer and the resumed state, gathered in a ``Run``;
- ``schedules``: the learning rate and the EMA decay as functions of the images seen;
- ``step``: one optimizer step;
- ``maintain``: once per tick, the status line, snapshots, metrics, stats and states;
- ``training_loop``: the loop itself, with SIGTERM and wall-clock stops;
- ``state`` (the training-state file), ``progress`` (log and stats files), ``monitor`` (loss by noise level and
  FID during training).
"""

from training.loop.config import TrainingConfig, TrainingConfigError
from training.loop.training_loop import training_loop

__all__ = ["TrainingConfig", "TrainingConfigError", "training_loop"]
