"""The data types of a run: what it builds before its first step (:class:`Run`), where it stands (:class:`TrainState`),
what it leaves behind (:class:`TrainResult`), and the hooks it calls (:class:`Callback`)."""
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
from timm.data import Mixup
from timm.utils import ModelEmaV3
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from gcvimoe.data import DataConfig
from gcvimoe.moe.parallel import is_expert_parallel
from gcvimoe.train.config import TrainConfig
from gcvimoe.train.distributed import DistInfo
from gcvimoe.train.preemption import Preemption


@dataclass
class TrainResult:
    """What a finished run leaves behind."""
    output_dir: Path
    history: List[Dict[str, float]]
    best_top1: float
    best_epoch: int
    train_seconds: float
    last_eval: Dict[str, Any]
    initial_eval: Optional[Dict[str, Any]] = None


@dataclass
class TrainState:
    """Where a run stands: what a checkpoint restores besides the weights and the optimiser."""
    epoch: int = 0
    num_updates: int = 0
    history: List[Dict[str, float]] = field(default_factory=list)
    best_top1: float = -1.0
    best_epoch: int = 0
    train_seconds: float = 0.0
    batch: int = 0  # micro-batches of epoch ``epoch`` already trained (a checkpoint from the middle of an epoch)
    epoch_sums: Optional[List[List[float]]] = None  # every process's step sums at that point (StepMeter.own_sums)


@dataclass
class Run:
    """Everything a run builds before its first step (:func:`gcvimoe.train.build.build_run`)."""
    cfg: TrainConfig
    info: DistInfo
    data_cfg: DataConfig
    train_loader: Any
    eval_loader: Any
    model: nn.Module
    train_model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    total_epochs: int
    loss_fn: nn.Module
    output_dir: Path
    autocast: Callable = nullcontext
    scaler: Optional[torch.amp.GradScaler] = None
    ema: Optional[ModelEmaV3] = None
    mixup_fn: Optional[Mixup] = None
    ddp: Optional[DistributedDataParallel] = None
    callbacks: Sequence['Callback'] = ()
    notes: List[str] = field(default_factory=list)  # header lines: where the initial weights came from, ...
    preemption: Optional[Preemption] = None
    drops_advised: bool = False  # the advice on dropped tokens is given once per run

    @property
    def expert_parallel(self) -> bool:
        return self.info.distributed and is_expert_parallel(self.model)


class Callback:
    """Hooks the loop calls on the primary process; the command line's plotting callback is one."""

    def on_step_end(self, run: Run, epoch: int, batch_idx: int, record: Dict[str, float]) -> None:
        """Once for every training micro-batch, in order: ``record`` holds its ``loss`` (cross-entropy) and
        ``aux_loss`` on the primary process, and the ``lr`` after it. Reading a loss off the GPU is a sync, so the
        calls for the micro-batches since the previous log step (every ``log_interval``-th, and the first and last
        of the epoch) all come at the next one."""

    def on_epoch_end(self, run: Run, state: TrainState, eval_result: Dict[str, Any]) -> None:
        """After an epoch's evaluation and checkpoint; ``state.history[-1]`` is the epoch's row."""

    def on_train_end(self, run: Run, state: TrainState, eval_result: Dict[str, Any]) -> None:
        """After the last epoch."""
