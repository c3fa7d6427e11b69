"""Training engine: config, schedules, NEFTune, crash-safe checkpoints, records and the SFT loop.

    from tsugiki.train import TrainConfig, Trainer
    config = TrainConfig.load("run.yaml", {"max_steps": "200"})
    result = Trainer(model, config, train_examples, eval_examples).train()
"""

import sys
import types

from .checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint
from .config import ConfigError, TrainConfig, add_config_arguments, config_from_args
from .loop import Trainer, TrainResult, resolve_dtype, set_seed
from .neftune import attach_neftune, neftune
from .schedules import lr_multiplier, make_scheduler

__all__ = [
    "TrainConfig", "ConfigError", "add_config_arguments", "config_from_args",
    "Trainer", "TrainResult", "resolve_dtype", "set_seed",
    "attach_neftune", "neftune", "lr_multiplier", "make_scheduler",
    "save_checkpoint", "load_checkpoint", "latest_checkpoint", "list_checkpoints",
]


class _TrainModule(types.ModuleType):
    """Makes ``tsugiki.train(config)`` run a whole job while ``tsugiki.train.Trainer`` etc. stay importable."""

    def __call__(self, config=None, progress=True, callbacks=(), **overrides):
        """Fine-tune as ``config`` says (YAML path, dict or TrainConfig); keyword arguments override its keys.

        ``progress``: the progress bar and summary lines. ``callbacks``: functions
        ``f(trainer, record)`` called after every optimizer step (``record`` holds the
        step's metrics; ``loss`` on logging steps); one returning False stops the run there. Returns ``TrainResult(output_dir,
        metrics)``. See :func:`tsugiki.pipeline.run_training` and ``tsugiki train --help``.
        """
        from ..pipeline import run_training

        return run_training(config, progress=progress, callbacks=callbacks, **overrides)


sys.modules[__name__].__class__ = _TrainModule
