"""Training and evaluation: the config, the training loop, evaluation, prediction, resume state, DDP plumbing.

Read :mod:`gcvimoe.train.trainer` top to bottom for the loop; :mod:`gcvimoe.train.config` lists every setting.
"""
from gcvimoe.train.config import TrainConfig, build_config
from gcvimoe.train.trainer import Callback, Run, TrainResult, TrainState, train

__all__ = ['TrainConfig', 'build_config', 'train', 'Callback', 'Run', 'TrainState', 'TrainResult']
