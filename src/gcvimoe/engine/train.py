"""The training loop, top to bottom: config -> data -> model -> optimiser and schedule -> epochs -> checkpoints.

One process::

    gcvimoe train                                   # gcvimoe_nano on the embedded digits
    gcvimoe train -c configs/digits.yaml --epochs 5 --output runs/digits
    gcvimoe train -c configs/gcvimoe_tiny.yaml --data-dir /data/imagenet --output runs/tiny
    gcvimoe train --resume auto --output runs/tiny  # continue where runs/tiny/last.pth stopped

Several processes (DDP; gloo on CPU, NCCL on GPU)::

    torchrun --nproc_per_node 8 -m gcvimoe train -c configs/gcvimoe_tiny.yaml --data-dir /data/imagenet
    torchrun --nproc_per_node 8 -m gcvimoe train -c configs/gcvimoe_tiny.yaml --expert-parallel  # 1 expert each

With ``expert_parallel`` each process holds ``num_experts / world_size`` experts of every MoE layer and tokens reach
their expert by all-to-all; checkpoints still hold every expert (see :mod:`gcvimoe.engine.distributed`).

``batch_size`` is per process; with ``lr_batch_size`` set, the LR follows the global batch
(``batch_size * grad_accum_steps * world_size``), see :mod:`gcvimoe.engine.config`.

The loss is cross-entropy (soft-target with Mixup/CutMix, label-smoothed otherwise) plus the MoE aux loss the model's
MoE layers computed in the forward pass; both are logged on their own.

The output folder holds ``config.yaml`` (the effective config), ``summary.csv`` (one row per epoch: the columns of
``SUMMARY_COLUMNS``, ``lr`` at the end of the epoch, ``images_per_s`` summed over processes, ``dropped_fraction`` the
share of token-to-expert assignments dropped for capacity in training), ``last.pth``, ``best.pth`` (best
``eval_top1``), ``checkpoint-<epoch>.pth`` every ``checkpoint_every`` epochs, ``train.log``, ``curves.png`` and
``expert_usage.png``, and ``tensorboard/`` when asked for.
"""
import csv
import difflib
import logging
import math
import shutil
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2, list_optimizers
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3, dispatch_clip_grad, random_seed
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from gcvimoe.data import DataConfig, build_transform, create_dataset, create_loader, resolve_data_config, set_epoch
from gcvimoe.engine.checkpoint import build_model, rng_state, save_checkpoint, set_rng_state
from gcvimoe.engine.config import TrainConfig, save_config, scaled_lr
from gcvimoe.engine.distributed import (
    DistInfo, all_gather_objects, all_reduce_sum, average_expert_grads, check_expert_parallel_optimizer, cleanup,
    clip_grad_norm_expert_parallel, full_state, init_distributed, local_optimizer_state, local_state_dict,
    shard_experts, wrap_model)
from gcvimoe.engine.evaluate import ExpertUsage, evaluate, iterate
from gcvimoe.errors import GcvimoeError
from gcvimoe.moe import collect_aux_loss, collect_moe_report
from gcvimoe.moe.parallel import is_expert_parallel

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


# config keys passed to the model constructor when set (null keeps the model's default)
MODEL_KEYS = ("num_experts", "top_k", "capacity_factor", "drop_path_rate", "moe_blocks", "eval_capacity_factor",
              "router", "gate_noise", "normalize_gates", "batch_priority", "expert_dropout", "balance_loss",
              "aux_loss_weight", "z_loss_weight", "shared_expert")


def model_args(cfg: TrainConfig, data_cfg: DataConfig) -> Dict[str, Any]:
    """The model constructor arguments: the data's shape and classes, the MoE keys that are set, ``model_kwargs``."""
    args = dict(num_classes=data_cfg.num_classes, in_chans=data_cfg.in_chans, img_size=data_cfg.img_size)
    for key in MODEL_KEYS:
        if getattr(cfg, key) is not None:
            args[key] = getattr(cfg, key)
    args.update(cfg.model_kwargs)
    return args


def _autocast(cfg: TrainConfig, device: torch.device) -> Callable:
    if not cfg.amp or device.type != "cuda":
        return nullcontext
    dtype = torch.float16 if cfg.amp_dtype == "float16" else torch.bfloat16
    return partial(torch.autocast, device_type="cuda", dtype=dtype)


def check_finite_loss(loss: torch.Tensor, info: DistInfo, where: str) -> None:
    """Stop every process together when the loss of any of them is not finite. One process stopping alone would
    leave the others waiting in the next collective (DDP's all-reduce, an expert all-to-all) until it times out."""
    value = loss.detach().float().reshape(1)
    if info.distributed:
        value = all_reduce_sum(value.clone(), info)  # NaN or inf anywhere makes the sum non-finite
    if not math.isfinite(value.item()):
        on = f" on at least one of the {info.world_size} processes" if info.distributed else ""
        raise GcvimoeError(f"the loss became {value.item()}{on} {where}; lower --lr or raise --warmup-epochs")


def _clip_gradients(model: nn.Module, cfg: TrainConfig, info: DistInfo, expert_parallel: bool) -> None:
    if expert_parallel and cfg.clip_mode == "norm":
        clip_grad_norm_expert_parallel(model, cfg.clip_grad, info)
    else:  # 'value' and 'agc' clip each parameter on its own: the same with sharded experts
        dispatch_clip_grad(model.parameters(), cfg.clip_grad, mode=cfg.clip_mode)


def _create_optimizer(cfg: TrainConfig, model: nn.Module, lr: float) -> torch.optim.Optimizer:
    kwargs = dict(opt=cfg.opt, lr=lr, weight_decay=cfg.weight_decay, momentum=cfg.momentum)
    if cfg.opt_eps is not None:
        kwargs["eps"] = cfg.opt_eps
    if cfg.opt_betas is not None:
        kwargs["betas"] = tuple(cfg.opt_betas)
    if cfg.opt.lower().split("_")[-1] not in list_optimizers():
        close = difflib.get_close_matches(cfg.opt.lower(), list_optimizers(), n=1)
        hint = f"did you mean '{close[0]}'?" if close else "see timm.optim.list_optimizers()"
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
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for row in history:
            writer.writerow({k: (f"{v:.8g}" if isinstance(v, float) else v) for k, v in row.items()})
    tmp.replace(path)


def train_one_epoch(
        epoch: int,
        model: nn.Module,
        train_model: nn.Module,
        loader,
        loss_fn: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler,
        num_updates: int,
        cfg: TrainConfig,
        info: DistInfo,
        autocast: Callable,
        scaler: Optional[torch.amp.GradScaler] = None,
        mixup_fn: Optional[Mixup] = None,
        ema: Optional[ModelEmaV3] = None,
        ddp: Optional[DistributedDataParallel] = None,
        desc: str = "",
) -> Dict[str, float]:
    """One pass over ``loader`` with gradient accumulation; returns the epoch's training metrics.

    Args:
        model: The bare model (its MoE layers hold the aux losses and routing statistics).
        train_model: What the forward pass runs: ``model``, its DDP wrapper, or a compiled version of either.
        num_updates: Optimiser updates before this epoch (the scheduler and EMA step on it).
        ddp: The DDP wrapper in a multi-process run, whose gradient all-reduce waits for the last micro-batch.
    """
    train_model.train()
    expert_parallel = info.distributed and is_expert_parallel(model)
    accum = cfg.grad_accum_steps
    num_batches = len(loader)
    last_window_start = num_batches - (num_batches % accum or accum)
    sums = torch.zeros(3, dtype=torch.float64)  # cross-entropy, aux loss (each times batch size), images
    usage = ExpertUsage(model)
    start = time.perf_counter()
    bar = tqdm(iterate(loader), total=num_batches, desc=desc, disable=not info.is_primary, leave=False,
               dynamic_ncols=True, file=sys.stderr)
    optimizer.zero_grad(set_to_none=True)
    for batch_idx, (images, targets) in enumerate(bar):
        window = accum if batch_idx < last_window_start else num_batches - last_window_start
        need_update = batch_idx == num_batches - 1 or (batch_idx + 1) % accum == 0
        images = images.to(info.device, non_blocking=True)
        targets = targets.to(info.device, non_blocking=True)
        if mixup_fn is not None:
            images, targets = mixup_fn(images, targets)
        if cfg.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)

        # DDP all-reduces gradients on the last micro-batch of an accumulation window only
        no_sync = ddp.no_sync if ddp is not None and not need_update else nullcontext
        with no_sync():
            with autocast():
                logits = train_model(images)
                ce_loss = loss_fn(logits, targets)
                aux_loss = collect_aux_loss(model)
                loss = ce_loss + aux_loss
            check_finite_loss(loss, info, f"at epoch {epoch + 1}, batch {batch_idx}")
            if scaler is not None:
                scaler.scale(loss / window).backward()
            else:
                (loss / window).backward()

        if need_update:
            if expert_parallel:
                average_expert_grads(model, info)
            if scaler is not None:
                if cfg.clip_grad:
                    scaler.unscale_(optimizer)
                    _clip_gradients(model, cfg, info, expert_parallel)
                scaler.step(optimizer)
                scaler.update()
            else:
                if cfg.clip_grad:
                    _clip_gradients(model, cfg, info, expert_parallel)
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            num_updates += 1
            if scheduler is not None:
                scheduler.step_update(num_updates=num_updates)
            if ema is not None:
                ema.update(model, step=num_updates)

        batch_size = images.shape[0]
        ce_value, aux_value = ce_loss.item(), aux_loss.item()
        sums += torch.tensor([ce_value * batch_size, aux_value * batch_size, batch_size], dtype=torch.float64)
        usage.update(collect_moe_report(model))
        images_per_s = float(sums[2]) * info.world_size / (time.perf_counter() - start)
        bar.set_postfix(loss=f"{ce_value:.3f}", aux=f"{aux_value:.4f}", img_s=f"{images_per_s:.0f}",
                        lr=f"{optimizer.param_groups[0]['lr']:.2e}", refresh=False)
    bar.close()
    elapsed = time.perf_counter() - start
    sums = all_reduce_sum(sums.to(info.device), info).cpu()  # losses and throughput of all processes
    usage.all_reduce(info)
    count = max(float(sums[2]), 1.0)
    return {
        "train_loss": float(sums[0]) / count,
        "train_aux_loss": float(sums[1]) / count,
        "dropped_fraction": usage.dropped_fraction,
        "images_per_s": float(sums[2]) / elapsed,
        "num_updates": num_updates,
    }


def train(cfg: TrainConfig, resume: Optional[Dict[str, Any]] = None) -> TrainResult:
    """Train as ``cfg`` says, continuing from the checkpoint dict ``resume`` when given.

    Joins the torchrun process group when launched by torchrun and leaves it at the end.
    """
    threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    info = init_distributed(cfg.device)
    try:
        return _train(cfg, resume, info)
    finally:
        cleanup(info)
        torch.set_num_threads(threads)


def _train(cfg: TrainConfig, resume: Optional[Dict[str, Any]], info: DistInfo) -> TrainResult:
    # everything a user can get wrong (data, model, optimiser) is checked before the output folder is made
    dataset = cfg.resolved_dataset
    data_cfg = resolve_data_config(
        dataset, cfg.data_dir, img_size=cfg.img_size, in_chans=cfg.in_chans, interpolation=cfg.interpolation,
        crop_pct=cfg.crop_pct)

    # data
    aug = dict(scale=tuple(cfg.scale), ratio=tuple(cfg.ratio), hflip=cfg.hflip, color_jitter=cfg.color_jitter,
               auto_augment=cfg.auto_augment, re_prob=cfg.reprob)
    train_set = create_dataset(data_cfg, "train", build_transform(data_cfg, is_training=True, **aug))
    eval_set = create_dataset(data_cfg, "val", build_transform(data_cfg, is_training=False))
    pin_memory = info.device.type == "cuda"
    train_loader = create_loader(train_set, cfg.batch_size, True, cfg.workers, info.rank, info.world_size, cfg.seed,
                                 pin_memory)
    eval_loader = create_loader(eval_set, cfg.eval_batch_size or cfg.batch_size, False, cfg.workers, info.rank,
                                info.world_size, cfg.seed, pin_memory)
    if len(train_loader) == 0:
        raise GcvimoeError(f"the training set has {len(train_set)} images, fewer than one batch per process; "
                           "lower --batch-size")

    # model: identical initial weights on every process, then a different random stream per process
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, model_args(cfg, data_cfg))
    random_seed(cfg.seed, info.rank)
    model.to(info.device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    if cfg.grad_checkpointing:
        model.set_grad_checkpointing(True)
    num_params = sum(p.numel() for p in model.parameters())
    if cfg.expert_parallel:
        shard_experts(model, info)  # before the optimiser and EMA take the parameters
    expert_parallel = is_expert_parallel(model)

    # optimiser, precision, schedule, EMA
    global_batch = cfg.batch_size * cfg.grad_accum_steps * info.world_size
    lr = scaled_lr(cfg, global_batch)
    optimizer = _create_optimizer(cfg, model, lr)
    if expert_parallel:
        check_expert_parallel_optimizer(optimizer, cfg.opt)
    autocast = _autocast(cfg, info.device)
    scaler = torch.amp.GradScaler("cuda") if autocast is not nullcontext and cfg.amp_dtype == "float16" else None
    if scaler is not None and expert_parallel:
        # the scaler skips a step on the processes whose own experts overflowed, and the replicas would drift apart
        raise GcvimoeError("expert_parallel does not support float16 mixed precision (its loss scaler decides per "
                           "process); use --amp-dtype bfloat16")
    updates_per_epoch = math.ceil(len(train_loader) / cfg.grad_accum_steps)
    scheduler, total_epochs = create_scheduler_v2(
        optimizer, sched=cfg.sched, num_epochs=cfg.epochs, warmup_epochs=cfg.warmup_epochs, warmup_lr=cfg.warmup_lr,
        min_lr=cfg.min_lr, cooldown_epochs=cfg.cooldown_epochs, step_on_epochs=not cfg.sched_on_updates,
        updates_per_epoch=updates_per_epoch)
    ema = ModelEmaV3(model, decay=cfg.ema_decay, use_warmup=cfg.ema_warmup) if cfg.ema else None

    start_epoch, num_updates, history = 0, 0, []
    best_top1, best_epoch = -1.0, 0
    if resume is not None:
        start_epoch, num_updates, history, best_top1, best_epoch = _restore(
            resume, model, optimizer, scheduler, scaler, ema, cfg, data_cfg, info)

    train_model = wrap_model(model, info)
    ddp = train_model if isinstance(train_model, DistributedDataParallel) else None
    if cfg.compile:
        train_model = torch.compile(train_model)

    mixup_fn = None
    if cfg.mixup > 0 or cfg.cutmix > 0:
        mixup_fn = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, prob=cfg.mixup_prob,
                         switch_prob=cfg.mixup_switch_prob, mode=cfg.mixup_mode, label_smoothing=cfg.smoothing,
                         num_classes=data_cfg.num_classes)
        loss_fn = SoftTargetCrossEntropy()
    elif cfg.smoothing > 0:
        loss_fn = LabelSmoothingCrossEntropy(smoothing=cfg.smoothing)
    else:
        loss_fn = nn.CrossEntropyLoss()

    summary_writer = _tensorboard_writer_class() if cfg.tensorboard and info.is_primary else None

    output_dir = _output_dir(cfg)
    if info.is_primary:
        output_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, output_dir / "config.yaml")
    with _log_to(output_dir, info, append=resume is not None):
        writer = summary_writer(str(output_dir / "tensorboard")) if summary_writer is not None else None
        if cfg.amp and info.device.type != "cuda":
            _logger.info("amp: mixed precision needs a GPU; training in float32 on %s", info.device)
        _logger.info(
            "model %s: %.2fM parameters | data %s: %d train / %d val images, %d classes, %dx%d px, %d channel(s) | "
            "%d process(es) on %s, global batch %d, lr %.3g | output %s",
            cfg.model, num_params / 1e6, dataset, len(train_set), len(eval_set), data_cfg.num_classes,
            cfg.img_size, cfg.img_size, data_cfg.in_chans, info.world_size, info.device, global_batch, lr, output_dir)
        if cfg.expert_parallel:
            if expert_parallel:
                layout = f"every process holds 1/{info.world_size} of each MoE layer's experts"
            else:
                layout = "one process holds every expert" if info.world_size == 1 else "the model has no MoE layers"
            _logger.info("expert parallel: %s", layout)
        if start_epoch:
            _logger.info("resumed after epoch %d (%d optimiser updates)", start_epoch, num_updates)

        train_seconds, eval_result = 0.0, {}
        for epoch in range(start_epoch, total_epochs):
            set_epoch(train_loader, epoch, cfg.seed, info.rank)
            epoch_start = time.perf_counter()
            train_stats = train_one_epoch(
                epoch, model, train_model, train_loader, loss_fn, optimizer, scheduler, num_updates, cfg, info,
                autocast, scaler=scaler, mixup_fn=mixup_fn, ema=ema, ddp=ddp,
                desc=f"epoch {epoch + 1}/{total_epochs}")
            num_updates = train_stats.pop("num_updates")
            if scheduler is not None:
                scheduler.step(epoch + 1)
            evaluate_on_val = partial(evaluate, loader=eval_loader, num_classes=data_cfg.num_classes, info=info,
                                      autocast=autocast, channels_last=cfg.channels_last)
            eval_result = evaluate_on_val(model)
            row = {"epoch": epoch + 1, **train_stats, "eval_loss": eval_result["loss"],
                   "eval_top1": eval_result["top1"], "eval_top5": eval_result["top5"],
                   "lr": optimizer.param_groups[0]["lr"]}
            if ema is not None:
                ema_result = evaluate_on_val(ema.module)
                row.update(ema_eval_loss=ema_result["loss"], ema_eval_top1=ema_result["top1"],
                           ema_eval_top5=ema_result["top5"])
            history.append(row)
            train_seconds += time.perf_counter() - epoch_start
            is_best = row["eval_top1"] > best_top1
            if is_best:
                best_top1, best_epoch = row["eval_top1"], epoch + 1

            rng = all_gather_objects(rng_state(), info)  # every process's RNG, so a resume continues each stream
            # every expert, also under expert parallelism (a collective then), so the file loads on any process count
            weights = full_state(model, optimizer, ema.module if ema is not None else None, info)
            if info.is_primary:
                state = {
                    "model_name": cfg.model, "model_args": model.model_args, **weights,
                    "data_config": data_cfg.to_dict(), "class_names": data_cfg.class_names,
                    "scheduler": scheduler.state_dict() if scheduler is not None else None,
                    "scaler": scaler.state_dict() if scaler is not None else None,
                    "epoch": epoch + 1, "step": num_updates, "rng": rng, "history": history,
                    "best": {"top1": best_top1, "epoch": best_epoch}, "world_size": info.world_size,
                    "config": cfg.to_dict(),
                }
                _save_epoch(state, output_dir, is_best, cfg.checkpoint_every)
                if writer is not None:
                    for key, value in row.items():
                        writer.add_scalar(key, value, epoch + 1)
                    writer.flush()
            _log_epoch(row, total_epochs, time.perf_counter() - epoch_start)

        if writer is not None:
            writer.close()
        if info.is_primary and history:
            from gcvimoe.viz import plot_expert_usage, plot_training_curves
            plot_training_curves(history, output_dir / "curves.png")
            if eval_result:
                plot_expert_usage(eval_result["experts"], output_dir / "expert_usage.png",
                                  title=f"expert usage on the val set, epoch {history[-1]['epoch']}")
            _logger.info("best top-1 %.2f %% at epoch %d | outputs in %s", best_top1, best_epoch, output_dir)
        return TrainResult(output_dir, history, best_top1, best_epoch, train_seconds, eval_result)


def _save_epoch(state: Dict[str, Any], output_dir: Path, is_best: bool, checkpoint_every: int) -> None:
    """last.pth, best.pth when the epoch is the best so far, checkpoint-<epoch>.pth every N epochs, summary.csv."""
    save_checkpoint(state, output_dir / "last.pth")
    copies = ["best.pth"] if is_best else []
    if checkpoint_every and state["epoch"] % checkpoint_every == 0:
        copies.append(f"checkpoint-{state['epoch']}.pth")
    for name in copies:
        tmp = output_dir / f".{name}.tmp"
        shutil.copyfile(output_dir / "last.pth", tmp)
        tmp.replace(output_dir / name)
    _write_summary(state["history"], output_dir / "summary.csv")


def _log_epoch(row: Dict[str, float], total_epochs: int, seconds: float) -> None:
    ema_text = f" | ema top-1 {row['ema_eval_top1']:6.2f}" if "ema_eval_top1" in row else ""
    _logger.info(
        "epoch %3d/%d | train loss %.4f aux %.4f | eval loss %.4f top-1 %6.2f top-5 %6.2f%s | lr %.2e | "
        "dropped %.2f%% | %.0f img/s | %.1fs", row["epoch"], total_epochs, row["train_loss"], row["train_aux_loss"],
        row["eval_loss"], row["eval_top1"], row["eval_top5"], ema_text, row["lr"], 100 * row["dropped_fraction"],
        row["images_per_s"], seconds)


def _tensorboard_writer_class():
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise GcvimoeError("tensorboard logging needs the tensorboard package: pip install 'gcvimoe[tensorboard]'") \
            from None
    return SummaryWriter


def _restore(resume, model, optimizer, scheduler, scaler, ema, cfg, data_cfg, info):
    """Load a checkpoint's training state into the freshly built objects; returns where to continue."""
    if resume["model_name"] != cfg.model or resume["model_args"] != model.model_args:
        raise GcvimoeError(
            f"the checkpoint holds {resume['model_name']} {resume['model_args']}, the config builds {cfg.model} "
            f"{model.model_args}; resume with the run's own config")
    if resume["data_config"]["class_names"] != data_cfg.class_names:
        raise GcvimoeError("the checkpoint was trained on other classes than this dataset's; resume on the same data")
    model.load_state_dict(local_state_dict(resume["state_dict"], model, info))
    optimizer.load_state_dict(local_optimizer_state(resume["optimizer"], model, optimizer, info))
    if scheduler is not None and resume.get("scheduler") is not None:
        scheduler.load_state_dict(resume["scheduler"])
    if scaler is not None and resume.get("scaler") is not None:
        scaler.load_state_dict(resume["scaler"])
    if ema is not None:
        ema.module.load_state_dict(local_state_dict(resume.get("ema_state_dict", resume["state_dict"]), model, info))
    rng = resume.get("rng") or []
    if len(rng) == info.world_size:
        set_rng_state(rng[info.rank])
    else:
        _logger.info("resume: the checkpoint comes from %d process(es), this run has %d; random streams restart",
                     len(rng), info.world_size)
        random_seed(cfg.seed + resume["epoch"], info.rank)
    best = resume.get("best", {})
    return resume["epoch"], resume["step"], list(resume.get("history", [])), best.get("top1", -1.0), \
        best.get("epoch", 0)
