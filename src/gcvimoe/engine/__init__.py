"""Training and evaluation: config, the training loop, checkpoints, DDP, and the train/validate/predict/demo CLIs.

Read :mod:`gcvimoe.engine.train` top to bottom for the loop; :mod:`gcvimoe.engine.config` lists every setting.
"""
