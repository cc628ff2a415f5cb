"""Saving in the middle of an epoch: every ``--save-interval`` (optimiser steps or minutes), and when the job is told
to stop (SIGTERM from SLURM or Kubernetes before preemption, SIGINT from Ctrl-C, SIGUSR1 from a scheduler's
warning).

A signal only sets a flag; the loop acts on it at the next optimiser step, where nothing is half-done: it saves a
resumable ``last.pth`` (the epoch's position, its partial sums and every process's random streams) and stops with
:class:`Preempted`, whose exit status is 128 + the signal's number, as if the signal had ended the process. With
several processes they agree first (one tiny all-reduce per optimiser step, on a CPU group, so no GPU sync), so
every process saves and stops at the same step.
"""
import signal
import threading
import time
from typing import Optional, Tuple

import torch
import torch.distributed as dist

from gcvimoe.errors import GcvimoeError
from gcvimoe.train.durations import parse_save_interval
from gcvimoe.train.distributed import DistInfo

SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


class Preempted(GcvimoeError):
    """The run saved a resumable checkpoint and stopped because it was told to."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


class Preemption:
    """The save-interval clock and the stop flag; a context manager that installs the signal handlers.

    Args:
        save_interval: ``--save-interval`` (see :func:`gcvimoe.train.durations.parse_save_interval`).
        info: The process group: with several processes, decisions are all-reduced so that all agree.
    """

    def __init__(self, save_interval: str, info: DistInfo):
        self.every_steps, self.every_seconds = parse_save_interval(save_interval)
        self.info = info
        self.signum: Optional[int] = None
        self.last_save = time.monotonic()
        self._previous = {}
        self._group = None

    def __enter__(self) -> 'Preemption':
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            for signum in SIGNALS:
                self._previous[signum] = signal.signal(signum, self._on_signal)
        if self.info.distributed:
            self._group = dist.new_group(backend="gloo")  # CPU tensors: the flags never wait for the GPU
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def _on_signal(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C does not wait for the step to end
        self.signum = signum

    def check(self, num_updates: int) -> Tuple[bool, Optional[int]]:
        """At an optimiser step: whether to save now, and the signal to stop for (None to go on)."""
        steps_due = bool(self.every_steps) and num_updates % self.every_steps == 0
        time_due = bool(self.every_seconds) and time.monotonic() - self.last_save >= self.every_seconds
        flags = torch.tensor([int(time_due), self.signum or 0])
        if self._group is not None:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self._group)
        signum = int(flags[1]) or None
        return steps_due or bool(flags[0]) or signum is not None, signum

    def saved(self) -> None:
        self.last_save = time.monotonic()

    def stop_message(self, signum: int, where: str, path) -> Preempted:
        name = signal.Signals(signum).name
        return Preempted(f"stopped by {name} {where}: saved the resumable checkpoint {path}; continue with --resume "
                         f"auto --output {path.parent}", signum)
