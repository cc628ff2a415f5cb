"""The training loop, top to bottom: config -> data -> model -> optimiser and schedule -> epochs -> checkpoints.

One process::

    gcvimoe train                                   # gcvimoe_nano on the embedded digits
    gcvimoe train -c digits --epochs 5 --output runs/digits
    gcvimoe train -c gcvimoe_tiny --data-dir /data/imagenet --output runs/tiny
    gcvimoe train --resume auto --output runs/tiny  # continue where runs/tiny/last.pth stopped

Several processes (DDP; gloo on CPU, NCCL on GPU)::

    torchrun --nproc_per_node 8 -m gcvimoe train -c gcvimoe_tiny --data-dir /data/imagenet
    torchrun --nproc_per_node 8 -m gcvimoe train -c gcvimoe_tiny --expert-parallel  # 1 expert each

With ``expert_parallel`` each process holds ``num_experts / world_size`` experts of every MoE layer and tokens reach
their expert by all-to-all; checkpoints still hold every expert (see :mod:`gcvimoe.train.distributed`).

The loop emits records and never draws: callbacks (:class:`Callback`) receive every epoch's row and the final
evaluation; the command line hands in the one that plots (:mod:`gcvimoe.analysis`).

``batch_size`` is per process; with ``lr_batch_size`` set, the LR follows the global batch
(``batch_size * grad_accum_steps * world_size``), see :mod:`gcvimoe.train.config`.

The loss is cross-entropy (soft-target with Mixup/CutMix, label-smoothed otherwise) plus the MoE aux loss the model's
MoE layers computed in the forward pass; both are logged on their own.

The output folder holds ``config.yaml`` (the effective config), ``summary.csv`` (one row per epoch: the columns of
``SUMMARY_COLUMNS``, ``lr`` at the end of the epoch, ``images_per_s`` summed over processes, ``dropped_fraction`` the
share of token-to-expert assignments dropped for capacity in training), ``last.pth``, ``best.pth`` (best
``eval_top1``), ``checkpoint-<epoch>.pth`` every ``checkpoint_every`` epochs, ``train.log`` (a line every
``log_interval`` steps and one per epoch), and ``tensorboard/`` when tensorboard is installed (see
:mod:`gcvimoe.train.progress`); the command line's plotting callback adds ``curves.png`` and ``expert_usage.png``.
"""
import csv
import logging
import math
import shutil
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2, list_optimizers
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3, dispatch_clip_grad, random_seed
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from gcvimoe.data import DataConfig, build_transform, create_dataset, create_loader, resolve_data_config, set_epoch
from gcvimoe.errors import GcvimoeError, did_you_mean
from gcvimoe.files import atomic_path
from gcvimoe.models import build_model
from gcvimoe.moe import collect_aux_loss, collect_moe_report
from gcvimoe.moe.parallel import is_expert_parallel
from gcvimoe.train.checks import (
    check_output_folder, checkpoint_bytes, collect_unreadable, listing_unreadable_on_error, prepare_data)
from gcvimoe.train.config import TrainConfig, save_config, scaled_lr
from gcvimoe.train.distributed import (
    DistInfo, all_gather_objects, all_reduce_sum, average_expert_grads, check_expert_parallel_optimizer, cleanup,
    clip_grad_norm_expert_parallel, full_state, init_distributed, local_optimizer_state, local_state_dict,
    shard_experts, wrap_model)
from gcvimoe.train.evaluate import evaluate, iterate
from gcvimoe.train.progress import ScalarLog, StepMeter, expert_load_scalars, resolve_log_interval, scalar_log
from gcvimoe.train.state import rng_state, save_checkpoint, set_rng_state

_logger = logging.getLogger("gcvimoe.train")

SUMMARY_COLUMNS = ("epoch", "train_loss", "train_aux_loss", "eval_loss", "eval_top1", "eval_top5", "lr",
                   "dropped_fraction", "images_per_s")
EMA_COLUMNS = ("ema_eval_loss", "ema_eval_top1", "ema_eval_top5")


@dataclass
class TrainResult:
    """What a finished run leaves behind."""
    output_dir: Path
    history: List[Dict[str, float]]
    best_top1: float
    best_epoch: int
    train_seconds: float
    last_eval: Dict[str, Any]


@dataclass
class TrainState:
    """Where a run stands: what a checkpoint restores besides the weights and the optimiser."""
    epoch: int = 0
    num_updates: int = 0
    history: List[Dict[str, float]] = field(default_factory=list)
    best_top1: float = -1.0
    best_epoch: int = 0
    train_seconds: float = 0.0


@dataclass
class Run:
    """Everything a run builds before its first step."""
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


def model_args(cfg: TrainConfig, data_cfg: DataConfig) -> Dict[str, Any]:
    """The model constructor arguments: the data's shape and classes, then what the config decides."""
    return dict(num_classes=data_cfg.num_classes, in_chans=data_cfg.in_chans, img_size=data_cfg.img_size,
                **cfg.model_args())


def _autocast(cfg: TrainConfig, device: torch.device) -> Callable:
    if not cfg.amp or device.type != "cuda":
        return nullcontext
    dtype = torch.float16 if cfg.amp_dtype == "float16" else torch.bfloat16
    return partial(torch.autocast, device_type="cuda", dtype=dtype)


def check_finite_loss(loss: torch.Tensor, info: DistInfo, where: str) -> None:
    """Stop every process together when the loss of any of them is not finite. One process stopping alone would
    leave the others waiting in the next collective (DDP's all-reduce, an expert all-to-all) until it times out.
    ``loss`` may be a running sum of losses: the training loop checks the epoch's at its log steps."""
    value = loss.detach().double().reshape(1)
    if info.distributed:
        value = all_reduce_sum(value.clone(), info)  # NaN or inf anywhere makes the sum non-finite
    if not math.isfinite(value.item()):
        on = f" on at least one of the {info.world_size} processes" if info.distributed else ""
        raise GcvimoeError(f"the loss became {value.item()}{on} {where}; lower --lr or raise --warmup-epochs")


def _clip_gradients(run: Run) -> None:
    cfg = run.cfg
    if run.expert_parallel and cfg.clip_mode == "norm":
        clip_grad_norm_expert_parallel(run.model, cfg.clip_grad, run.info)
    else:  # 'value' and 'agc' clip each parameter on its own: the same with sharded experts
        dispatch_clip_grad(run.model.parameters(), cfg.clip_grad, mode=cfg.clip_mode)


def _create_optimizer(cfg: TrainConfig, model: nn.Module, lr: float) -> torch.optim.Optimizer:
    kwargs = dict(opt=cfg.opt, lr=lr, weight_decay=cfg.weight_decay, momentum=cfg.momentum)
    if cfg.opt_eps is not None:
        kwargs["eps"] = cfg.opt_eps
    if cfg.opt_betas is not None:
        kwargs["betas"] = tuple(cfg.opt_betas)
    if cfg.opt.lower().split("_")[-1] not in list_optimizers():
        hint = did_you_mean(cfg.opt.lower(), list_optimizers(), fallback="see timm.optim.list_optimizers()")
        raise GcvimoeError(f"unknown optimiser '{cfg.opt}'; {hint}")
    return create_optimizer_v2(model, **kwargs)


@contextmanager
def _log_to(output_dir: Path, info: DistInfo, append: bool):
    """Log to the console (primary process) and to ``output_dir/train.log`` inside the ``with`` block."""
    logger = logging.getLogger("gcvimoe")
    saved = logger.level, logger.propagate
    logger.setLevel(logging.INFO)
    logger.propagate = False
    handlers: List[logging.Handler] = []
    if info.is_primary:
        console = logging.StreamHandler(sys.stdout)
        console.setFormatter(logging.Formatter("%(message)s"))
        log_file = logging.FileHandler(output_dir / "train.log", mode="a" if append else "w")
        log_file.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S"))
        handlers = [console, log_file]
    for handler in handlers:
        logger.addHandler(handler)
    try:
        yield
    finally:
        for handler in handlers:
            logger.removeHandler(handler)
            handler.close()
        logger.setLevel(saved[0])
        logger.propagate = saved[1]


def _output_dir(cfg: TrainConfig) -> Path:
    if cfg.output:
        return Path(cfg.output)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("output") / "train" / f"{stamp}-{cfg.model}-{cfg.resolved_dataset}"


def _write_summary(history: List[Dict[str, float]], path: Path) -> None:
    columns = list(SUMMARY_COLUMNS) + [c for c in EMA_COLUMNS if history and c in history[0]]
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for row in history:
            writer.writerow({k: (f"{v:.8g}" if isinstance(v, float) else v) for k, v in row.items()})


def _optimizer_step(run: Run, num_updates: int) -> int:
    """Reduce, clip and apply the accumulated gradients; step the schedule and the EMA. Returns the update count."""
    if run.expert_parallel:
        average_expert_grads(run.model, run.info)
    if run.scaler is not None and run.cfg.clip_grad:
        run.scaler.unscale_(run.optimizer)
    if run.cfg.clip_grad:
        _clip_gradients(run)
    if run.scaler is not None:
        run.scaler.step(run.optimizer)
        run.scaler.update()
    else:
        run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    num_updates += 1
    if run.scheduler is not None:
        run.scheduler.step_update(num_updates=num_updates)
    if run.ema is not None:
        run.ema.update(run.model, step=num_updates)
    return num_updates


def check_compile_supported(device: torch.device) -> None:
    """One line instead of a compiler traceback when this torch, Python or machine cannot compile."""
    if not torch._dynamo.is_dynamo_supported():
        raise GcvimoeError(f"--compile: torch.compile is not supported with this Python or torch "
                           f"({sys.version.split()[0]}, torch {torch.__version__}); train without --compile")
    if device.type == "cpu" and not any(shutil.which(name) for name in ("c++", "g++", "clang++")):
        raise GcvimoeError("--compile on the CPU needs a C++ compiler (inductor builds C++ kernels); install g++ or "
                           "train without --compile")


def _forward_backward(run: Run, images: torch.Tensor, targets: torch.Tensor, window: int, sync: bool):
    """One micro-batch: forward, loss, backward (DDP all-reduces on the window's last one). Returns the two losses."""
    if run.mixup_fn is not None:
        images, targets = run.mixup_fn(images, targets)
    if run.cfg.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    no_sync = run.ddp.no_sync if run.ddp is not None and not sync else nullcontext
    with no_sync():
        with run.autocast():
            logits = run.train_model(images)
            ce_loss = run.loss_fn(logits, targets)
            aux_loss = collect_aux_loss(run.model)
            loss = ce_loss + aux_loss
        scaled = loss / window
        (run.scaler.scale(scaled) if run.scaler is not None else scaled).backward()
    return ce_loss, aux_loss


def train_one_epoch(run: Run, epoch: int, num_updates: int, writer: Optional[ScalarLog] = None
                    ) -> Dict[str, float]:
    """One pass over the training loader with gradient accumulation; returns the epoch's training metrics.

    The losses and expert counts stay on the device and are read at log steps only (:class:`StepMeter`), where the
    check that stops every process together on a non-finite loss runs too: the epoch's last micro-batch is a log
    step, so no update after a non-finite loss reaches a checkpoint.

    Args:
        run: The run; ``run.train_model`` is what the forward pass runs (the model, its DDP wrapper, or a compiled
            version of either), ``run.model`` the bare model whose MoE layers hold the aux losses and statistics.
        epoch: The epoch (0-based), for messages.
        num_updates: Optimiser updates before this epoch (the scheduler and EMA step on it).
        writer: Where the log steps' scalars go (TensorBoard, W&B), or None.
    """
    run.train_model.train()
    info, loader, accum = run.info, run.train_loader, run.cfg.grad_accum_steps
    num_batches = len(loader)
    last_window_start = num_batches - (num_batches % accum or accum)
    writer = writer or ScalarLog()
    run.optimizer.zero_grad(set_to_none=True)
    with StepMeter(run.model, info, num_batches, resolve_log_interval(run.cfg.log_interval, num_batches), epoch,
                   run.total_epochs) as meter:
        for batch_idx, (images, targets) in enumerate(iterate(loader)):
            window = accum if batch_idx < last_window_start else num_batches - last_window_start
            need_update = batch_idx == num_batches - 1 or (batch_idx + 1) % accum == 0
            images = images.to(info.device, non_blocking=True)
            ce_loss, aux_loss = _forward_backward(run, images, targets.to(info.device, non_blocking=True), window,
                                                  need_update)
            if need_update:
                num_updates = _optimizer_step(run, num_updates)
            meter.update(ce_loss, aux_loss, images.shape[0], collect_moe_report(run.model),
                         run.optimizer.param_groups[0]["lr"])
            if meter.is_log_step(batch_idx):
                _log_step(run, meter, writer, epoch, batch_idx)
    stats, experts = meter.epoch_stats()
    writer.add("epoch", epoch + 1, expert_load_scalars(experts))
    return {**stats, "num_updates": num_updates}


def _log_step(run: Run, meter: StepMeter, writer: ScalarLog, epoch: int, batch_idx: int) -> None:
    """Stop on a non-finite loss, print the step line, write the step's scalars, and hand the micro-batches since
    the last log step to the callbacks."""
    first = meter.batches_read
    check_finite_loss(meter.loss_sum, run.info, f"in epoch {epoch + 1}, batches {first + 1} to {batch_idx + 1}")
    record, experts = meter.read(batch_idx)
    step = epoch * len(run.train_loader) + batch_idx + 1
    writer.add("step", step, {**record, "lr": meter.step_lrs[-1], **expert_load_scalars(experts)})
    if run.info.is_primary and run.callbacks:
        for step_idx, step_record in meter.steps(first, batch_idx):
            for callback in run.callbacks:
                callback.on_step_end(run, epoch, step_idx, step_record)


def train(cfg: TrainConfig, resume: Optional[Dict[str, Any]] = None, callbacks: Sequence[Callback] = ()
          ) -> TrainResult:
    """Train as ``cfg`` says, continuing from the checkpoint dict ``resume`` when given.

    Joins the torchrun process group when launched by torchrun and leaves it at the end.

    Args:
        cfg: The run's config.
        resume: A training checkpoint's dict (:func:`gcvimoe.train.state.load_training_checkpoint`), or None.
        callbacks: Called on the primary process after every epoch and at the end (plots, for instance).
    """
    threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    info = init_distributed(cfg.device)
    try:
        run = _build_run(cfg, info)
        run.callbacks = tuple(callbacks)
        state = _restore(resume, run) if resume is not None else TrainState()
        return _train(run, state, resume is not None, callbacks)
    finally:
        cleanup(info)
        torch.set_num_threads(threads)


def _global_batch(cfg: TrainConfig, info: DistInfo) -> int:
    """Images per optimiser step over all processes (the LR follows it, see :func:`scaled_lr`)."""
    return cfg.batch_size * cfg.grad_accum_steps * info.world_size


def _build_data(cfg: TrainConfig, info: DistInfo):
    data_cfg = resolve_data_config(
        cfg.resolved_dataset, cfg.data_dir, img_size=cfg.img_size, in_chans=cfg.in_chans,
        interpolation=cfg.interpolation, crop_pct=cfg.crop_pct)
    aug = dict(scale=tuple(cfg.scale), ratio=tuple(cfg.ratio), hflip=cfg.hflip, color_jitter=cfg.color_jitter,
               auto_augment=cfg.auto_augment, re_prob=cfg.reprob)
    # unreadable images are skipped, and too many stop the run at the epoch's end (see gcvimoe.train.checks); one
    # process also stops as soon as its own count is too many, several processes must decide together
    train_set = create_dataset(data_cfg, "train", build_transform(data_cfg, is_training=True, **aug),
                               skip_unreadable=not cfg.strict_data,
                               max_unreadable_fraction=cfg.max_bad_fraction if info.world_size == 1 else None)
    eval_set = create_dataset(data_cfg, "val", build_transform(data_cfg, is_training=False),
                              skip_unreadable=not cfg.strict_data)
    pin_memory = info.device.type == "cuda"
    train_loader = create_loader(train_set, cfg.batch_size, True, cfg.workers, info.rank, info.world_size, cfg.seed,
                                 pin_memory)
    eval_loader = create_loader(eval_set, cfg.eval_batch_size or cfg.batch_size, False, cfg.workers, info.rank,
                                info.world_size, cfg.seed, pin_memory)
    if len(train_loader) == 0:
        raise GcvimoeError(f"the training set has {len(train_set)} images, fewer than one batch per process; "
                           "lower --batch-size")
    return data_cfg, train_loader, eval_loader


def _build_model(cfg: TrainConfig, data_cfg: DataConfig, info: DistInfo) -> nn.Module:
    """Identical initial weights on every process, then a different random stream per process."""
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, model_args(cfg, data_cfg))
    random_seed(cfg.seed, info.rank)
    model.to(info.device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    if cfg.grad_checkpointing:
        model.set_grad_checkpointing(True)
    if cfg.expert_parallel:
        shard_experts(model, info)  # before the optimiser and EMA take the parameters
    return model


def _loss(cfg: TrainConfig, num_classes: int):
    """The mixup/cutmix function (or None) and the matching loss."""
    if cfg.mixup > 0 or cfg.cutmix > 0:
        mixup_fn = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, prob=cfg.mixup_prob,
                         switch_prob=cfg.mixup_switch_prob, mode=cfg.mixup_mode, label_smoothing=cfg.smoothing,
                         num_classes=num_classes)
        return mixup_fn, SoftTargetCrossEntropy()
    if cfg.smoothing > 0:
        return None, LabelSmoothingCrossEntropy(smoothing=cfg.smoothing)
    return None, nn.CrossEntropyLoss()


def _build_run(cfg: TrainConfig, info: DistInfo) -> Run:
    """Data, model, optimiser, precision, schedule, EMA; everything a user can get wrong is checked before the output
    folder is made."""
    data_cfg, train_loader, eval_loader = _build_data(cfg, info)
    model = _build_model(cfg, data_cfg, info)
    optimizer = _create_optimizer(cfg, model, scaled_lr(cfg, _global_batch(cfg, info)))
    if is_expert_parallel(model):
        check_expert_parallel_optimizer(optimizer, cfg.opt)
    autocast = _autocast(cfg, info.device)
    scaler = torch.amp.GradScaler("cuda") if autocast is not nullcontext and cfg.amp_dtype == "float16" else None
    if scaler is not None and is_expert_parallel(model):
        # the scaler skips a step on the processes whose own experts overflowed, and the replicas would drift apart
        raise GcvimoeError("expert_parallel does not support float16 mixed precision (its loss scaler decides per "
                           "process); use --amp-dtype bfloat16")
    scheduler, total_epochs = create_scheduler_v2(
        optimizer, sched=cfg.sched, num_epochs=cfg.epochs, warmup_epochs=cfg.warmup_epochs, warmup_lr=cfg.warmup_lr,
        min_lr=cfg.min_lr, cooldown_epochs=cfg.cooldown_epochs, step_on_epochs=not cfg.sched_on_updates,
        updates_per_epoch=math.ceil(len(train_loader) / cfg.grad_accum_steps))
    ema = ModelEmaV3(model, decay=cfg.ema_decay, use_warmup=cfg.ema_warmup) if cfg.ema else None
    mixup_fn, loss_fn = _loss(cfg, data_cfg.num_classes)
    return Run(cfg=cfg, info=info, data_cfg=data_cfg, train_loader=train_loader, eval_loader=eval_loader, model=model,
               train_model=model, optimizer=optimizer, scheduler=scheduler, total_epochs=total_epochs, loss_fn=loss_fn,
               output_dir=_output_dir(cfg), autocast=autocast, scaler=scaler, ema=ema, mixup_fn=mixup_fn)


def _wrap(run: Run) -> None:
    """DDP around the model (several processes), then torch.compile when asked for."""
    run.train_model = wrap_model(run.model, run.info)
    run.ddp = run.train_model if isinstance(run.train_model, DistributedDataParallel) else None
    if run.cfg.compile:
        check_compile_supported(run.info.device)
        run.train_model = torch.compile(run.train_model)


def _log_header(run: Run, state: TrainState) -> None:
    cfg, info, data_cfg = run.cfg, run.info, run.data_cfg
    if cfg.amp and info.device.type != "cuda":
        _logger.info("amp: mixed precision needs a GPU; training in float32 on %s", info.device)
    num_params = sum(p.numel() for p in run.model.parameters())
    _logger.info(
        "model %s: %.2fM parameters | data %s: %d train / %d val images, %d classes, %dx%d px, %d channel(s) | "
        "%d process(es) on %s, global batch %d, lr %.3g | output %s",
        cfg.model, num_params / 1e6, cfg.resolved_dataset, len(run.train_loader.dataset),
        len(run.eval_loader.dataset), data_cfg.num_classes, cfg.img_size, cfg.img_size, data_cfg.in_chans,
        info.world_size, info.device, _global_batch(cfg, info), scaled_lr(cfg, _global_batch(cfg, info)),
        run.output_dir)
    if cfg.expert_parallel:
        if is_expert_parallel(run.model):
            layout = f"every process holds 1/{info.world_size} of each MoE layer's experts"
        else:
            layout = "one process holds every expert" if info.world_size == 1 else "the model has no MoE layers"
        _logger.info("expert parallel: %s", layout)
    if state.epoch:
        _logger.info("resumed after epoch %d (%d optimiser updates)", state.epoch, state.num_updates)


def _train(run: Run, state: TrainState, resumed: bool, callbacks: Sequence[Callback]) -> TrainResult:
    _wrap(run)
    expert_copies = run.info.world_size if run.expert_parallel else 1
    check_output_folder(run.output_dir, checkpoint_bytes(run.model, run.ema is not None, expert_copies)
                        * (1 if resumed else 2), run.info)  # room for the new file beside the old (last and best)
    if run.info.is_primary:
        run.output_dir.mkdir(parents=True, exist_ok=True)
        save_config(run.cfg, run.output_dir / "config.yaml")
    wandb_config = run.cfg.to_dict() if run.cfg.log_wandb else None
    with _log_to(run.output_dir, run.info, append=resumed), \
            scalar_log(run.output_dir, run.info, run.cfg.tensorboard, wandb_config) as writer:
        _log_header(run, state)
        prepare_data(run, resumed)
        eval_result: Dict[str, Any] = {}
        for epoch in range(state.epoch, run.total_epochs):
            eval_result = _train_epoch(run, state, epoch, writer)
            if run.info.is_primary:
                for callback in callbacks:
                    callback.on_epoch_end(run, state, eval_result)
        if run.info.is_primary and state.history:
            for callback in callbacks:
                callback.on_train_end(run, state, eval_result)
            _logger.info("best top-1 %.2f %% at epoch %d | outputs in %s", state.best_top1, state.best_epoch,
                         run.output_dir)
        return TrainResult(run.output_dir, state.history, state.best_top1, state.best_epoch, state.train_seconds,
                           eval_result)


def _evaluate_row(run: Run, epoch: int, train_stats: Dict[str, float]):
    """The epoch's summary row, after evaluating the model (and the EMA), and the model's evaluation."""
    evaluate_on_val = partial(evaluate, loader=run.eval_loader, num_classes=run.data_cfg.num_classes, info=run.info,
                              autocast=run.autocast, channels_last=run.cfg.channels_last)
    eval_result = evaluate_on_val(run.model)
    row = {"epoch": epoch + 1, **train_stats, "eval_loss": eval_result["loss"], "eval_top1": eval_result["top1"],
           "eval_top5": eval_result["top5"], "lr": run.optimizer.param_groups[0]["lr"]}
    if run.ema is not None:
        ema_result = evaluate_on_val(run.ema.module)
        row.update(ema_eval_loss=ema_result["loss"], ema_eval_top1=ema_result["top1"],
                   ema_eval_top5=ema_result["top5"])
    return row, eval_result


def _train_epoch(run: Run, state: TrainState, epoch: int, writer) -> Dict[str, Any]:
    """Train, evaluate, checkpoint and log one epoch; returns its evaluation."""
    set_epoch(run.train_loader, epoch, run.cfg.seed, run.info.rank)
    epoch_start = time.perf_counter()
    with listing_unreadable_on_error(run):
        train_stats = train_one_epoch(run, epoch, state.num_updates, writer)
    state.num_updates = train_stats.pop("num_updates")
    if run.scheduler is not None:
        run.scheduler.step(epoch + 1)
    row, eval_result = _evaluate_row(run, epoch, train_stats)
    unreadable = collect_unreadable(run)
    state.history.append(row)
    state.epoch = epoch + 1
    state.train_seconds += time.perf_counter() - epoch_start
    is_best = row["eval_top1"] > state.best_top1
    if is_best:
        state.best_top1, state.best_epoch = row["eval_top1"], epoch + 1
    _checkpoint(run, state, is_best)
    writer.add("epoch", epoch + 1, {**{key: value for key, value in row.items() if key != "epoch"},
                                    **expert_load_scalars(eval_result["experts"], "eval_experts")})
    _log_epoch(row, run.total_epochs, time.perf_counter() - epoch_start, unreadable)
    return eval_result


def _checkpoint(run: Run, state: TrainState, is_best: bool) -> None:
    """Every process's RNG and every expert (a collective under expert parallelism), written by the primary."""
    rng = all_gather_objects(rng_state(), run.info)  # so that a resume continues each process's stream
    weights = full_state(run.model, run.optimizer, run.ema.module if run.ema is not None else None, run.info)
    if not run.info.is_primary:
        return
    checkpoint = {
        "model_name": run.cfg.model, "model_args": run.model.model_args, **weights,
        "data_config": run.data_cfg.to_dict(), "class_names": run.data_cfg.class_names,
        "scheduler": run.scheduler.state_dict() if run.scheduler is not None else None,
        "scaler": run.scaler.state_dict() if run.scaler is not None else None,
        "epoch": state.epoch, "step": state.num_updates, "rng": rng, "history": state.history,
        "best": {"top1": state.best_top1, "epoch": state.best_epoch}, "world_size": run.info.world_size,
        "config": run.cfg.to_dict(),
    }
    _save_epoch(checkpoint, run.output_dir, is_best, run.cfg.checkpoint_every)


def _save_epoch(state: Dict[str, Any], output_dir: Path, is_best: bool, checkpoint_every: int) -> None:
    """last.pth, best.pth when the epoch is the best so far, checkpoint-<epoch>.pth every N epochs, summary.csv."""
    save_checkpoint(state, output_dir / "last.pth")
    copies = ["best.pth"] if is_best else []
    if checkpoint_every and state["epoch"] % checkpoint_every == 0:
        copies.append(f"checkpoint-{state['epoch']}.pth")
    for name in copies:
        with atomic_path(output_dir / name) as tmp:
            shutil.copyfile(output_dir / "last.pth", tmp)
    _write_summary(state["history"], output_dir / "summary.csv")


def _log_epoch(row: Dict[str, float], total_epochs: int, seconds: float, unreadable: int = 0) -> None:
    ema_text = f" | ema top-1 {row['ema_eval_top1']:6.2f}" if "ema_eval_top1" in row else ""
    if unreadable:
        ema_text += f" | {unreadable} unreadable image{'s' * (unreadable != 1)} skipped"
    _logger.info(
        "epoch %3d/%d | train loss %.4f aux %.4f | eval loss %.4f top-1 %6.2f top-5 %6.2f%s | lr %.2e | "
        "dropped %.2f%% | %.0f img/s | %.1fs", row["epoch"], total_epochs, row["train_loss"], row["train_aux_loss"],
        row["eval_loss"], row["eval_top1"], row["eval_top5"], ema_text, row["lr"], 100 * row["dropped_fraction"],
        row["images_per_s"], seconds)


def _restore(resume: Dict[str, Any], run: Run) -> TrainState:
    """Load a checkpoint's training state into the freshly built run; returns where to continue."""
    model, info = run.model, run.info
    saved_args = resume["model_args"]
    if "moe" not in saved_args:  # gcvimoe 0.1 recorded flat MoE keywords: compare in today's form
        saved_args = build_model(resume["model_name"], saved_args).model_args
    if resume["model_name"] != run.cfg.model or saved_args != model.model_args:
        raise GcvimoeError(
            f"the checkpoint holds {resume['model_name']} {resume['model_args']}, the config builds {run.cfg.model} "
            f"{model.model_args}; resume with the run's own config")
    if resume["data_config"]["class_names"] != run.data_cfg.class_names:
        raise GcvimoeError("the checkpoint was trained on other classes than this dataset's; resume on the same data")
    model.load_state_dict(local_state_dict(resume["state_dict"], model, info))
    run.optimizer.load_state_dict(local_optimizer_state(resume["optimizer"], model, run.optimizer, info))
    for target, key in ((run.scheduler, "scheduler"), (run.scaler, "scaler")):
        if target is not None and resume.get(key) is not None:
            target.load_state_dict(resume[key])
    if run.ema is not None:
        ema_weights = resume.get("ema_state_dict", resume["state_dict"])
        run.ema.module.load_state_dict(local_state_dict(ema_weights, model, info))
    rng = resume.get("rng") or []
    if len(rng) == info.world_size:
        set_rng_state(rng[info.rank])
    else:
        _logger.info("resume: the checkpoint comes from %d process(es), this run has %d; random streams restart",
                     len(rng), info.world_size)
        random_seed(run.cfg.seed + resume["epoch"], info.rank)
    best = resume.get("best", {})
    return TrainState(epoch=resume["epoch"], num_updates=resume["step"], history=list(resume.get("history", [])),
                      best_top1=best.get("top1", -1.0), best_epoch=best.get("epoch", 0))
