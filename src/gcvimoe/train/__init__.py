"""Training and evaluation: the config, the training loop, evaluation, prediction, checkpoints, DDP plumbing.

Read :mod:`gcvimoe.train.trainer` top to bottom for the loop; :mod:`gcvimoe.train.config` lists every setting.
"""
from gcvimoe.train.config import TrainConfig, build_config
from gcvimoe.train.run import Callback, TrainResult, TrainState
from gcvimoe.train.trainer import train

__all__ = ['TrainConfig', 'build_config', 'train', 'Callback', 'TrainState', 'TrainResult']
