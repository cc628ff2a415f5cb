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
import dataclasses
import logging
import math
import os
import re
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

from gcvimoe.data import (
    DataConfig, batches_per_epoch, build_transform, create_dataset, create_loader, get_source, resolve_data_config,
    set_epoch, train_image_count)
from gcvimoe.errors import GcvimoeError, did_you_mean
from gcvimoe.files import atomic_dir, atomic_path, write_records
from gcvimoe.models import (
    Checkpoint, build_model, experts_per_layer, load_initial_weights, model_from_checkpoint, read_checkpoint, save_model)
from gcvimoe.moe import collect_aux_loss, collect_moe_report, moe_layers
from gcvimoe.moe.parallel import is_expert_parallel
from gcvimoe.train.checks import (
    check_output_folder, checkpoint_bytes, collect_unreadable, listing_unreadable_on_error, prepare_data)
from gcvimoe.train.config import TrainConfig, parse_duration, save_config, scaled_lr
from gcvimoe.train.distributed import (
    DistInfo, all_gather_objects, all_reduce_sum, average_expert_grads, barrier, check_expert_parallel_optimizer,
    cleanup, clip_grad_norm_expert_parallel, collective_failure, full_state, is_collective_failure, init_distributed,
    load_sharded, local_optimizer_state, local_state_dict, save_sharded, shard_experts, sharded_state, wrap_model)
from gcvimoe.train.evaluate import evaluate, iterate
from gcvimoe.train.recipe import DERIVED_RECIPE, derive_recipe
from gcvimoe.train.progress import ScalarLog, StepMeter, expert_load_scalars, resolve_log_interval, scalar_log
from gcvimoe.train.preemption import Preemption
from gcvimoe.train.state import SHARDED_KEY, rng_state, save_checkpoint, set_rng_state

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
    notes: List[str] = field(default_factory=list)  # header lines: where the initial weights came from, ...
    preemption: Optional[Preemption] = None

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
    return Path("output") / "train" / f"{stamp}-{cfg.model}-{get_source(cfg.resolved_dataset).name}"


def _write_summary(history: List[Dict[str, float]], path: Path) -> None:
    columns = list(SUMMARY_COLUMNS) + [c for c in EMA_COLUMNS if history and c in history[0]]
    rows = [{k: (f"{v:.8g}" if isinstance(v, float) else v) for k, v in row.items()} for row in history]
    write_records(path, rows, columns)


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


def train_one_epoch(run: Run, state: TrainState, epoch: int, writer: Optional[ScalarLog] = None
                    ) -> Dict[str, float]:
    """One pass over the training loader with gradient accumulation; returns the epoch's training metrics.

    The losses and expert counts stay on the device and are read at log steps only (:class:`StepMeter`), where the
    check that stops every process together on a non-finite loss runs too: the epoch's last micro-batch is a log
    step, so no update after a non-finite loss reaches a checkpoint.

    Args:
        run: The run; ``run.train_model`` is what the forward pass runs (the model, its DDP wrapper, or a compiled
            version of either), ``run.model`` the bare model whose MoE layers hold the aux losses and statistics.
        state: Where the run stands: ``num_updates`` (the scheduler and EMA step on it) is advanced; ``batch`` and
            ``epoch_sums`` continue an epoch a checkpoint stopped in the middle of (see :func:`set_epoch`).
        epoch: The epoch (0-based).
        writer: Where the log steps' scalars go (TensorBoard, W&B), or None.
    """
    run.train_model.train()
    info, loader, accum = run.info, run.train_loader, run.cfg.grad_accum_steps
    num_batches = batches_per_epoch(loader)
    last_window_start = num_batches - (num_batches % accum or accum)
    writer = writer or ScalarLog()
    run.optimizer.zero_grad(set_to_none=True)
    with StepMeter(run.model, info, num_batches, resolve_log_interval(run.cfg.log_interval, num_batches), epoch,
                   run.total_epochs) as meter:
        if state.batch:
            meter.resume(state.batch, state.epoch_sums, info.rank)
        for batch_idx, (images, targets) in enumerate(iterate(loader), start=state.batch):
            window = accum if batch_idx < last_window_start else num_batches - last_window_start
            need_update = batch_idx == num_batches - 1 or (batch_idx + 1) % accum == 0
            images = images.to(info.device, non_blocking=True)
            ce_loss, aux_loss = _forward_backward(run, images, targets.to(info.device, non_blocking=True), window,
                                                  need_update)
            if need_update:
                state.num_updates = _optimizer_step(run, state.num_updates)
            meter.update(ce_loss, aux_loss, images.shape[0], collect_moe_report(run.model),
                         run.optimizer.param_groups[0]["lr"])
            if meter.is_log_step(batch_idx):
                _log_step(run, meter, writer, epoch, batch_idx)
            if need_update and batch_idx < num_batches - 1 and run.preemption is not None:
                _maybe_save_mid_epoch(run, state, epoch, batch_idx, meter, writer)
    state.batch, state.epoch_sums = 0, None
    stats, experts = meter.epoch_stats()
    writer.add("epoch", epoch + 1, expert_load_scalars(experts))
    return stats


def _maybe_save_mid_epoch(run: Run, state: TrainState, epoch: int, batch_idx: int, meter: StepMeter,
                          writer: ScalarLog) -> None:
    """At an optimiser step inside the epoch: save when the save interval is due or a signal came, and stop after
    saving for a signal. The save reads the step sums first (a log step), so a non-finite loss is never saved."""
    save, signum = run.preemption.check(state.num_updates)
    if not save:
        return
    if not meter.is_log_step(batch_idx):
        _log_step(run, meter, writer, epoch, batch_idx)
    state.batch = batch_idx + 1
    state.epoch_sums = all_gather_objects(meter.own_sums(), run.info)
    _checkpoint(run, state, is_best=False)
    run.preemption.saved()
    where = f"in epoch {epoch + 1} after batch {batch_idx + 1} of {meter.num_batches}"
    _logger.info("saved %s %s (optimiser step %d)", run.output_dir / "last.pth", where, state.num_updates)
    state.batch, state.epoch_sums = 0, None
    if signum is not None:
        raise run.preemption.stop_message(signum, where, run.output_dir / "last.pth")


def _log_step(run: Run, meter: StepMeter, writer: ScalarLog, epoch: int, batch_idx: int) -> None:
    """Stop on a non-finite loss, print the step line, write the step's scalars, and hand the micro-batches since
    the last log step to the callbacks."""
    first = meter.batches_read
    check_finite_loss(meter.loss_sum, run.info, f"in epoch {epoch + 1}, batches {first + 1} to {batch_idx + 1}")
    record, experts = meter.read(batch_idx)
    step = epoch * meter.num_batches + batch_idx + 1
    writer.add("step", step, {**record, "lr": meter.step_lrs[-1], **expert_load_scalars(experts)})
    if run.info.is_primary and run.callbacks:
        for step_idx, step_record in meter.steps(first, batch_idx):
            for callback in run.callbacks:
                callback.on_step_end(run, epoch, step_idx, step_record)


def train(cfg: TrainConfig, resume: Optional[Dict[str, Any]] = None, callbacks: Sequence[Callback] = (),
          origins: Optional[Dict[str, str]] = None) -> TrainResult:
    """Train as ``cfg`` says, continuing from the checkpoint dict ``resume`` when given.

    Joins the torchrun process group when launched by torchrun and leaves it at the end.

    Args:
        cfg: The run's config.
        resume: A training checkpoint's dict (:func:`gcvimoe.train.state.load_training_checkpoint`), or None.
        callbacks: Called on the primary process after every epoch and at the end (plots, for instance).
        origins: Where each non-default config value came from (``origins`` of
            :func:`gcvimoe.train.config.build_config`), for the run's header.
    """
    threads = torch.get_num_threads()
    info = init_distributed(cfg.device, parse_duration("dist_timeout", cfg.dist_timeout))
    try:
        cfg, initial, notes = _initial_checkpoint(cfg, resumed=resume is not None)
        run = _build_run(cfg, info, initial)
        run.notes[:0] = notes
        run.callbacks = tuple(callbacks)
        run.notes += [f"{key} {_short(value)} (from {origin})" for key, value, origin in _origin_items(cfg, origins)]
        _check_output_dir(run.output_dir, resumed=resume is not None, overwrite=cfg.overwrite)
        state = _restore(resume, run) if resume is not None else TrainState()
        result = _train(run, state, resume is not None, callbacks)
        barrier(info)  # a process that tears gloo down while a peer still works (writing the model folder) can abort
        return result
    except RuntimeError as e:  # a collective timed out or lost its peer (the heartbeat names a frozen process)
        if is_collective_failure(e, info):
            raise collective_failure(e, info) from None
        raise
    finally:
        cleanup(info)
        torch.set_num_threads(threads)


def _initial_checkpoint(cfg: TrainConfig, resumed: bool):
    """The initial weights to start from (none when resuming: the checkpoint holds the weights). Upcycling dense
    weights turns gate normalisation on, so that the MoE model starts with the dense model's outputs; the run's
    config records it, so a resume builds the same model."""
    if not cfg.initial_checkpoint or resumed:
        return cfg, None, []
    initial = read_checkpoint(cfg.initial_checkpoint)
    if cfg.moe.num_experts > 0 and not experts_per_layer(initial.state_dict) and not cfg.moe.normalize_gates:
        cfg = dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, normalize_gates=True))
        return cfg, initial, ["moe.normalize_gates True (upcycling: the MoE model starts with the dense outputs)"]
    return cfg, initial, []


def _origin_items(cfg: TrainConfig, origins: Optional[Dict[str, str]]):
    values = cfg.to_dict()
    for key, origin in (origins or {}).items():
        section, _, name = key.partition(".")
        yield key, values[section][name] if name else values[key], origin


def _short(value: Any) -> str:
    text = str(value)
    return text if len(text) <= 60 else text[:57] + "..."


RUN_FILES = ("last.pth", "best.pth", "last", "best", "summary.csv", "train.log", "config.yaml")


def epoch_checkpoints(output_dir: Path) -> List[Path]:
    """The run's checkpoint-<epoch>.pth files and sharded checkpoint-<epoch>/ folders, oldest first."""
    found = [(int(m.group(1)), p) for p in output_dir.glob("checkpoint-*")
             if (m := re.fullmatch(r"checkpoint-(\d+)(\.pth)?", p.name))]
    return [p for _, p in sorted(found)]


def never_checkpointed(output_dir: Path) -> bool:
    """Whether ``output_dir`` holds only what a run killed before its first last.pth leaves: its log and config, and
    the best.pth saved just before that last.pth (the restarted run writes the same one again). Anything else (a
    summary, epoch checkpoints) is a run of value that must not be replaced without --overwrite."""
    present = {name for name in RUN_FILES if (output_dir / name).exists()}
    return bool(present) and present <= {"train.log", "config.yaml", "best.pth", "best"} \
        and not epoch_checkpoints(output_dir)


def _check_output_dir(output_dir: Path, resumed: bool, overwrite: bool) -> None:
    """Never destroy a previous run silently: its folder is refused unless the run resumes it or ``overwrite``
    says to replace it (its checkpoints and model folder are removed first, so no stale best.pth survives). An
    ``--output`` that is a file is :func:`gcvimoe.train.checks.check_output_folder`'s to report."""
    previous = [name for name in RUN_FILES if (output_dir / name).exists()]
    if not previous or resumed:
        return
    if not overwrite:
        raise GcvimoeError(f"{output_dir} holds a previous run ({', '.join(previous)}); continue it with --resume "
                           f"auto, replace it with --overwrite, or choose another --output")
    for path in [*(output_dir / name for name in RUN_FILES), *epoch_checkpoints(output_dir)]:
        _remove_checkpoint(path)
    shutil.rmtree(output_dir / "model", ignore_errors=True)


def _global_batch(cfg: TrainConfig, info: DistInfo) -> int:
    """Images per optimiser step over all processes (the LR follows it, see :func:`scaled_lr`)."""
    return cfg.batch_size * cfg.grad_accum_steps * info.world_size


def default_workers(dataset: str) -> int:
    """Loader processes when the config leaves it to the machine: none for the in-memory built-in datasets (their
    images are tiny, inter-process traffic costs more than decoding), else a core per loader, one kept for the
    training process, at most 8 each."""
    if get_source(dataset).in_memory:
        return 0
    return max(1, min(8, (os.cpu_count() or 1) // _processes_here() - 1))


def default_threads(workers: int) -> int:
    """CPU threads per process when the config leaves it to the machine: the cores of this process less its loader
    processes. Threads beyond the free cores make this model's many small operations wait on each other: on 2 cores
    a second thread bought little beside a loader process, and training ran several times slower with it whenever
    another job took a core (the digits recipe found the same)."""
    return max(1, (os.cpu_count() or 1) // _processes_here() - workers)


def _processes_here() -> int:
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1"))  # torchrun's count of processes on this machine


def derive_from_data(cfg: TrainConfig):
    """The data config, and the run's config with what the data and the machine decide filled in; the header lines
    that say what was chosen and why."""
    notes: List[str] = []
    data_cfg = resolve_data_config(
        cfg.resolved_dataset, cfg.data_dir, img_size=cfg.img_size, in_chans=cfg.in_chans,
        interpolation=cfg.interpolation, crop_pct=cfg.crop_pct, notes=notes)
    workers = cfg.workers
    if workers is None:
        workers = default_workers(cfg.resolved_dataset)
        notes.append(f"workers {workers} (from the machine: {os.cpu_count()} cores, {_processes_here()} "
                     f"process(es) here, {cfg.resolved_dataset} data)")
    threads = cfg.threads
    if threads is None:
        threads = default_threads(workers)
        notes.append(f"threads {threads} (from the machine: {os.cpu_count()} cores, {_processes_here()} process(es) "
                     f"here, {workers} loader process(es) each)")
    cfg = dataclasses.replace(cfg, img_size=data_cfg.img_size, in_chans=data_cfg.in_chans, workers=workers,
                              threads=threads)
    if any(getattr(cfg, key) is None for key in DERIVED_RECIPE):
        global_batch = cfg.batch_size * cfg.grad_accum_steps * int(os.environ.get("WORLD_SIZE", "1"))
        chosen, recipe_notes = derive_recipe(cfg.to_dict(), cfg.resolved_dataset, train_image_count(data_cfg),
                                             data_cfg.img_size, global_batch, cfg.epochs)
        cfg = dataclasses.replace(cfg, **chosen)
        notes += recipe_notes
    return cfg, data_cfg, notes


def _build_data(cfg: TrainConfig, data_cfg: DataConfig, info: DistInfo):
    # color_jitter 0 is passed as None: timm otherwise adds a ColorJitter that does nothing at a cost per image
    aug = dict(scale=tuple(cfg.scale), ratio=tuple(cfg.ratio), hflip=cfg.hflip, color_jitter=cfg.color_jitter or None,
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
    return train_loader, eval_loader


def _build_model(cfg: TrainConfig, data_cfg: DataConfig, info: DistInfo, initial: Optional[Checkpoint]):
    """Identical initial weights on every process, then a different random stream per process. Returns the model
    and what loading the initial weights did, for the header."""
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, model_args(cfg, data_cfg))
    notes = load_initial_weights(model, initial, cfg.noise_std) if initial is not None else []
    random_seed(cfg.seed, info.rank)
    model.to(info.device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    if cfg.grad_checkpointing:
        model.set_grad_checkpointing(True)
    if cfg.expert_parallel:
        shard_experts(model, info)  # before the optimiser and EMA take the parameters
    return model, notes


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


def _build_run(cfg: TrainConfig, info: DistInfo, initial: Optional[Checkpoint] = None) -> Run:
    """Data, model, optimiser, precision, schedule, EMA; everything a user can get wrong is checked before the output
    folder is made."""
    cfg, data_cfg, data_notes = derive_from_data(cfg)
    torch.set_num_threads(cfg.threads)  # train() restores the caller's count at the end
    train_loader, eval_loader = _build_data(cfg, data_cfg, info)
    model, notes = _build_model(cfg, data_cfg, info, initial)
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
               output_dir=_output_dir(cfg), autocast=autocast, scaler=scaler, ema=ema, mixup_fn=mixup_fn,
               notes=data_notes + notes)


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
        len(run.eval_loader.dataset), data_cfg.num_classes, data_cfg.img_size, data_cfg.img_size, data_cfg.in_chans,
        info.world_size, info.device, _global_batch(cfg, info), scaled_lr(cfg, _global_batch(cfg, info)),
        run.output_dir)
    moe = run.model.model_args["moe"]
    if moe["num_experts"]:
        _logger.info("experts: %d MoE layers of %d experts, top-%d, placed by %r", len(list(moe_layers(run.model))),
                     moe["num_experts"], moe["top_k"], moe["moe_blocks"])
    if cfg.expert_parallel:
        if is_expert_parallel(run.model):
            layout = f"every process holds 1/{info.world_size} of each MoE layer's experts"
        else:
            layout = "one process holds every expert" if info.world_size == 1 else "the model has no MoE layers"
        _logger.info("expert parallel: %s", layout)
    cooldown = f" + {run.total_epochs - cfg.epochs} cooldown at min_lr" if run.total_epochs > cfg.epochs else ""
    _logger.info("epochs: %d in total (%d of the schedule%s)", run.total_epochs, cfg.epochs, cooldown)
    for note in run.notes:
        _logger.info("  %s", note)
    if state.epoch:
        _logger.info("resumed after epoch %d (%d optimiser updates)", state.epoch, state.num_updates)


def _train(run: Run, state: TrainState, resumed: bool, callbacks: Sequence[Callback]) -> TrainResult:
    _wrap(run)
    expert_copies = run.info.world_size if run.expert_parallel else 1
    check_output_folder(run.output_dir, checkpoint_bytes(run.model, run.ema is not None, expert_copies)
                        * (1 if resumed else 2), run.info)  # room for the new file beside the old (last and best)
    if run.info.is_primary:
        run.output_dir.mkdir(parents=True, exist_ok=True)
        save_config(dataclasses.replace(run.cfg, output=str(run.output_dir)), run.output_dir / "config.yaml")
        if resumed:
            _repair_after_kill(run.output_dir, state)
    wandb_config = run.cfg.to_dict() if run.cfg.log_wandb else None
    with _log_to(run.output_dir, run.info, append=resumed), \
            scalar_log(run.output_dir, run.info, run.cfg.tensorboard, wandb_config,
                       purge_step=_first_step(run, state) if resumed else None) as writer:
        _log_header(run, state)
        prepare_data(run, resumed)
        eval_result: Dict[str, Any] = {}
        initial_eval = _initial_evaluation(run) if run.cfg.initial_checkpoint and not resumed else None
        with Preemption(run.cfg.save_interval, run.info) as run.preemption:
            for epoch in range(state.epoch, run.total_epochs):
                eval_result = _train_epoch(run, state, epoch, writer)
                if run.info.is_primary:
                    for callback in callbacks:
                        callback.on_epoch_end(run, state, eval_result)
                _stop_after_epoch(run, epoch)
        if run.info.is_primary and state.history:
            _write_model_folder(run, state)
            for callback in callbacks:
                callback.on_train_end(run, state, eval_result)
            _logger.info("best top-1 %.2f %% at epoch %d | outputs in %s (model folder: %s)", state.best_top1,
                         state.best_epoch, run.output_dir, run.output_dir / "model")
        return TrainResult(run.output_dir, state.history, state.best_top1, state.best_epoch, state.train_seconds,
                           eval_result, initial_eval)


def _first_step(run: Run, state: TrainState) -> int:
    """The step axis value of the first micro-batch this run trains (see :func:`_log_step`)."""
    return state.epoch * batches_per_epoch(run.train_loader) + state.batch + 1


def _repair_after_kill(output_dir: Path, state: TrainState) -> None:
    """A run killed while saving may have left temporary files, and a summary.csv one epoch behind last.pth: remove
    the one, rewrite the other from the checkpoint's records."""
    for leftover in [*output_dir.glob(".*.tmp"), *output_dir.glob(".*.old")]:
        shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink(missing_ok=True)
    if state.history:
        _write_summary(state.history, output_dir / "summary.csv")


def _stop_after_epoch(run: Run, epoch: int) -> None:
    """The epoch's checkpoint is a save: restart the save-interval clock, and stop if a signal came meanwhile."""
    run.preemption.saved()
    _, signum = run.preemption.check(0)
    if signum is not None and epoch + 1 < run.total_epochs:
        raise run.preemption.stop_message(signum, f"after epoch {epoch + 1}", run.output_dir / "last.pth")


def _evaluate(run: Run, model: nn.Module) -> Dict[str, Any]:
    return evaluate(model, run.eval_loader, num_classes=run.data_cfg.num_classes, info=run.info, autocast=run.autocast,
                    channels_last=run.cfg.channels_last)


def _initial_evaluation(run: Run) -> Dict[str, Any]:
    """Where a fine-tune starts: the initial weights evaluated before the first step."""
    result = _evaluate(run, run.model)
    _logger.info("epoch   0 (initial weights) | eval loss %.6f top-1 %6.2f top-5 %6.2f", result["loss"], result["top1"],
                 result["top5"])
    return result


def _write_model_folder(run: Run, state: TrainState) -> None:
    """RUN/model: the best epoch's weights (its EMA weights when those evaluated better) with the trained
    preprocessing and label names, in the layout timm loads (``local-dir:RUN/model``)."""
    suffix = "" if sharded_checkpoints(run) else ".pth"  # a sharded run's best/ is read whole: weights only
    source = run.output_dir / f"best{suffix}"
    if not source.exists():
        _logger.info("model folder: %s is missing, so it holds the last epoch's weights", source)
        source = run.output_dir / f"last{suffix}"
    best = read_checkpoint(source)
    row = next((r for r in state.history if r["epoch"] == best.training["epoch"]), {})
    use_ema = best.ema_state_dict is not None and row.get("ema_eval_top1", -1.0) > row.get("eval_top1", 0.0)
    save_model(model_from_checkpoint(best, use_ema=use_ema), run.output_dir / "model", data_config=best.data_config)


def _evaluate_row(run: Run, epoch: int, train_stats: Dict[str, float]):
    """The epoch's summary row, after evaluating the model (and the EMA), and the model's evaluation."""
    evaluate_on_val = partial(_evaluate, run)
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
    set_epoch(run.train_loader, epoch, run.cfg.seed, run.info.rank, start_batch=state.batch)
    epoch_start = time.perf_counter()
    with listing_unreadable_on_error(run):
        train_stats = train_one_epoch(run, state, epoch, writer)
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
    """Every process's RNG, and the weights: each process's own experts into sharded folders, or every expert
    gathered into files the primary writes. A collective either way."""
    rng = all_gather_objects(rng_state(), run.info)  # so that a resume continues each process's stream
    ema = run.ema.module if run.ema is not None else None
    if sharded_checkpoints(run):
        tensors, optimizer_rest = sharded_state(run.model, run.optimizer, ema, run.info)
        _save_sharded_epoch(dict(_training_state(run, state, rng), optimizer=optimizer_rest), tensors, run, is_best)
        return
    weights = full_state(run.model, run.optimizer, ema, run.info)
    if run.info.is_primary:
        _save_epoch({**_training_state(run, state, rng), **weights}, run.output_dir, is_best, run.cfg)


def sharded_checkpoints(run: Run) -> bool:
    """Whether the run saves sharded checkpoint folders (``checkpoint_format``; auto: under expert parallelism)."""
    return run.cfg.checkpoint_format == "sharded" or (run.cfg.checkpoint_format == "auto" and run.expert_parallel)


def _training_state(run: Run, state: TrainState, rng: List[Any]) -> Dict[str, Any]:
    """A checkpoint's content besides the weights and the optimiser."""
    return {
        "model_name": run.cfg.model, "model_args": run.model.model_args,
        "data_config": run.data_cfg.to_dict(), "class_names": run.data_cfg.class_names,
        "scheduler": run.scheduler.state_dict() if run.scheduler is not None else None,
        "scaler": run.scaler.state_dict() if run.scaler is not None else None,
        "epoch": state.epoch, "step": state.num_updates, "rng": rng, "history": state.history,
        "batch": state.batch, "epoch_sums": state.epoch_sums,
        "best": {"top1": state.best_top1, "epoch": state.best_epoch}, "world_size": run.info.world_size,
        "config": run.cfg.to_dict(),
    }


WEIGHTS_ONLY_DROPS = ("optimizer", "scheduler", "scaler", "rng")


def _save_epoch(state: Dict[str, Any], output_dir: Path, is_best: bool, cfg: TrainConfig) -> None:
    """last.pth (complete, for resuming), best.pth (weights, EMA and records, without the optimiser) when the epoch
    is the best so far, checkpoint-<epoch>.pth every ``checkpoint_every`` epochs (the newest ``keep_last`` kept),
    summary.csv."""
    # best.pth before last.pth: a kill between them resumes from the older last.pth, whose rerun of the epoch writes
    # the same best.pth again, so best.pth is never older than what last.pth records
    if is_best:
        save_checkpoint({k: v for k, v in state.items() if k not in WEIGHTS_ONLY_DROPS}, output_dir / "best.pth")
    save_checkpoint(state, output_dir / "last.pth")
    if cfg.checkpoint_every and not state["batch"] and state["epoch"] % cfg.checkpoint_every == 0:
        with atomic_path(output_dir / f"checkpoint-{state['epoch']}.pth") as tmp:
            shutil.copyfile(output_dir / "last.pth", tmp)
        _prune_epoch_checkpoints(output_dir, cfg.keep_last)
    _write_summary(state["history"], output_dir / "summary.csv")


def _save_sharded_epoch(training: Dict[str, Any], tensors: Dict[str, torch.Tensor], run: Run, is_best: bool) -> None:
    """As :func:`_save_epoch`, in folders every process writes its own tensors into: last/, best/ (without the
    optimiser) and checkpoint-<epoch>/."""
    output_dir, cfg, epoch = run.output_dir, run.cfg, training["epoch"]
    if is_best:  # before last/, as in _save_epoch
        save_sharded(output_dir / "best", {k: v for k, v in tensors.items() if not k.startswith("optimizer.")},
                     {k: v for k, v in training.items() if k not in WEIGHTS_ONLY_DROPS}, run.info)
    save_sharded(output_dir / "last", tensors, training, run.info)
    if not run.info.is_primary:
        return
    if cfg.checkpoint_every and not training["batch"] and epoch % cfg.checkpoint_every == 0:
        with atomic_dir(output_dir / f"checkpoint-{epoch}") as tmp:
            shutil.copytree(output_dir / "last", tmp, dirs_exist_ok=True)
        _prune_epoch_checkpoints(output_dir, cfg.keep_last)
    _write_summary(training["history"], output_dir / "summary.csv")


def _prune_epoch_checkpoints(output_dir: Path, keep_last: int) -> None:
    for old in epoch_checkpoints(output_dir)[:-keep_last] if keep_last else []:
        _remove_checkpoint(old)


def _remove_checkpoint(path: Path) -> None:
    """Remove a checkpoint file or sharded checkpoint folder."""
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _log_epoch(row: Dict[str, float], total_epochs: int, seconds: float, unreadable: int = 0) -> None:
    ema_text = f" | ema top-1 {row['ema_eval_top1']:6.2f}" if "ema_eval_top1" in row else ""
    if unreadable:
        ema_text += f" | {unreadable} unreadable image{'s' * (unreadable != 1)} skipped"
    _logger.info(
        "epoch %3d/%d | train loss %.4f aux %.4f | eval loss %.4f top-1 %6.2f top-5 %6.2f%s | lr %.2e | "
        "dropped %.2f%% | %.0f img/s | %.1fs", row["epoch"], total_epochs, row["train_loss"], row["train_aux_loss"],
        row["eval_loss"], row["eval_top1"], row["eval_top5"], ema_text, row["lr"], 100 * row["dropped_fraction"],
        row["images_per_s"], seconds)


def _restore_weights(resume: Dict[str, Any], run: Run) -> None:
    """The model, optimiser and EMA: this process's share of the experts, from a sharded folder (every process reads
    its own) or from a file's dict holding every expert. An EMA the checkpoint lacks starts from the weights."""
    model, info, ema = run.model, run.info, run.ema.module if run.ema is not None else None
    if resume.get(SHARDED_KEY):
        load_sharded(resume[SHARDED_KEY], model, run.optimizer, ema, resume["optimizer"], info)
        return
    model.load_state_dict(local_state_dict(resume["state_dict"], model, info))
    run.optimizer.load_state_dict(local_optimizer_state(resume["optimizer"], model, run.optimizer, info))
    if ema is not None:
        ema.load_state_dict(local_state_dict(resume.get("ema_state_dict", resume["state_dict"]), model, info))


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
    _restore_weights(resume, run)
    for target, key in ((run.scheduler, "scheduler"), (run.scaler, "scaler")):
        if target is not None and resume.get(key) is not None:
            target.load_state_dict(resume[key])
    rng = resume.get("rng") or []
    if len(rng) == info.world_size:
        set_rng_state(rng[info.rank])
    else:
        _logger.info("resume: the checkpoint comes from %d process(es), this run has %d; random streams restart",
                     len(rng), info.world_size)
        random_seed(run.cfg.seed + resume["epoch"], info.rank)
    best = resume.get("best", {})
    state = TrainState(epoch=resume["epoch"], num_updates=resume["step"], history=list(resume.get("history", [])),
                       best_top1=best.get("top1", -1.0), best_epoch=best.get("epoch", 0))
    if resume.get("batch"):
        if len(resume.get("epoch_sums") or []) == info.world_size:
            state.batch, state.epoch_sums = resume["batch"], resume["epoch_sums"]
        else:  # another process count shards the epoch's images differently: its position has no meaning here
            _logger.info("resume: the checkpoint stopped inside epoch %d with %d process(es); with %d this epoch "
                         "starts over", resume["epoch"] + 1, len(resume.get("epoch_sums") or []), info.world_size)
    return state
