"""Assembling a run: what the data and the machine decide, then the data, the model, the optimiser, the schedule,
the precision and the EMA, everything a user can get wrong checked before the output folder is made.

Read :func:`build_run` first; the helpers follow in the order it calls them. :func:`wrap` adds DDP and
``torch.compile`` once the checkpoint is restored, and :func:`log_header` says what was built and why.
"""
import dataclasses
import logging
import math
import os
import shutil
import sys
from contextlib import nullcontext
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2, list_optimizers
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3, random_seed
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from gcvimoe.data import (
    DataConfig, build_transform, create_dataset, create_loader, get_source, resolve_data_config, train_image_count)
from gcvimoe.errors import GcvimoeError, did_you_mean
from gcvimoe.models import (
    Checkpoint, build_model, experts_per_layer, load_initial_weights, read_checkpoint, variant_of)
from gcvimoe.moe import moe_layers
from gcvimoe.moe.parallel import is_expert_parallel, whole_model_parameters
from gcvimoe.train.config import TrainConfig, scaled_lr
from gcvimoe.train.distributed import DistInfo, check_expert_parallel_optimizer, shard_experts, wrap_model
from gcvimoe.train.recipe import DERIVED_RECIPE, derive_recipe
from gcvimoe.train.run import Callback, Run, TrainState

_logger = logging.getLogger("gcvimoe.train")


def build_run(cfg: TrainConfig, info: DistInfo, resumed: bool, callbacks: Sequence[Callback] = (),
              origins: Optional[Dict[str, str]] = None, notes: Sequence[str] = ()) -> Run:
    """Data, model, optimiser, precision, schedule, EMA; the header notes say where each derived value came from.

    Args:
        cfg: The run's config; what it leaves to the data and the machine is decided here (:func:`derive_from_data`).
        info: This process's place in the job.
        resumed: Whether a checkpoint will be restored into the run (then no initial weights are loaded).
        callbacks: Handed to the run.
        origins: Where each non-default config value came from, for the header.
        notes: Header lines from the caller, printed first.
    """
    check_compile_combination(cfg)
    origins = dict(origins or {})
    cfg, initial, initial_notes = _initial_checkpoint(cfg, resumed, origins)
    origin_notes = [f"{key} {_short(value)} (from {origin})" for key, value, origin in _origin_items(cfg, origins)]
    cfg, data_cfg, data_notes = derive_from_data(cfg)
    torch.set_num_threads(cfg.threads)  # train() restores the caller's count at the end
    train_loader, eval_loader = _build_data(cfg, data_cfg, info)
    model, model_notes = _build_model(cfg, data_cfg, info, initial)
    optimizer = _create_optimizer(cfg, model, scaled_lr(cfg, global_batch(cfg, info)))
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
               callbacks=tuple(callbacks), notes=[*notes, *initial_notes] + data_notes + model_notes + origin_notes)


def _initial_checkpoint(cfg: TrainConfig, resumed: bool, origins: Dict[str, str]):
    """The initial weights to start from (none when resuming: the checkpoint holds the weights).

    The weights decide the variant unless ``--model`` names one (another variant's weights would not load), so a
    timm ``gcvit_xxtiny`` file trains ``gcvimoe_xxtiny``. Upcycling dense weights turns gate normalisation on, so
    that the MoE model starts with the dense model's outputs; the run's config records both, so a resume builds the
    same model."""
    if not cfg.initial_checkpoint or resumed:
        return cfg, None, []
    initial = read_checkpoint(cfg.initial_checkpoint)
    notes = []
    variant = initial.model_name or variant_of(initial.state_dict)
    if variant is not None and variant != cfg.model and origins.get("model") != "the command line":
        cfg = dataclasses.replace(cfg, model=variant)
        origins.pop("model", None)  # the header's line below says where it came from
        notes.append(f"model {variant} (from the initial checkpoint's weights; --model overrides)")
    if cfg.moe.num_experts > 0 and not experts_per_layer(initial.state_dict) and not cfg.moe.normalize_gates:
        cfg = dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, normalize_gates=True))
        notes.append("moe.normalize_gates True (upcycling: the MoE model starts with the dense outputs)")
    return cfg, initial, notes


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
                                             data_cfg.img_size, global_batch, cfg.epochs, data_cfg)
        cfg = dataclasses.replace(cfg, **chosen)
        notes += recipe_notes
    return cfg, data_cfg, notes


def default_workers(dataset: str) -> int:
    """Loader processes when the config leaves it to the machine: none for the in-memory built-in datasets (their
    images are tiny, inter-process traffic costs more than decoding), else a core per loader, one kept for the
    training process, at most 8 each."""
    if get_source(dataset).in_memory:
        return 0
    return max(1, min(8, (os.cpu_count() or 1) // _processes_here() - 1))


def default_threads(workers: int) -> int:
    """CPU threads per process when the config leaves it to the machine: the cores of this process less its loader
    processes. Threads beyond the free cores make this model's many small operations wait on each other, and a thread
    that shares its core with another job stalls the rest."""
    return max(1, (os.cpu_count() or 1) // _processes_here() - workers)


def _processes_here() -> int:
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1"))  # torchrun's count of processes on this machine


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


def model_args(cfg: TrainConfig, data_cfg: DataConfig) -> Dict[str, Any]:
    """The model constructor arguments: the data's shape and classes, then what the config decides."""
    return dict(num_classes=data_cfg.num_classes, in_chans=data_cfg.in_chans, img_size=data_cfg.img_size,
                **cfg.model_args())


def global_batch(cfg: TrainConfig, info: DistInfo) -> int:
    """Images per optimiser step over all processes (the LR follows it, see :func:`scaled_lr`)."""
    return cfg.batch_size * cfg.grad_accum_steps * info.world_size


def _create_optimizer(cfg: TrainConfig, model: nn.Module, lr: float) -> torch.optim.Optimizer:
    kwargs = dict(opt=cfg.opt, lr=lr, weight_decay=cfg.weight_decay, momentum=cfg.momentum)
    if cfg.layer_decay is not None:
        kwargs["layer_decay"] = cfg.layer_decay  # timm groups the layers by the model's group_matcher
    if cfg.opt_eps is not None:
        kwargs["eps"] = cfg.opt_eps
    if cfg.opt_betas is not None:
        kwargs["betas"] = tuple(cfg.opt_betas)
    if cfg.opt.lower().split("_")[-1] not in list_optimizers():
        hint = did_you_mean(cfg.opt.lower(), list_optimizers(), fallback="see timm.optim.list_optimizers()")
        raise GcvimoeError(f"unknown optimiser '{cfg.opt}'; {hint}")
    return create_optimizer_v2(model, **kwargs)


def _autocast(cfg: TrainConfig, device: torch.device) -> Callable:
    if not cfg.amp or device.type != "cuda":
        return nullcontext
    dtype = torch.float16 if cfg.amp_dtype == "float16" else torch.bfloat16
    return partial(torch.autocast, device_type="cuda", dtype=dtype)


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


def _origin_items(cfg: TrainConfig, origins: Optional[Dict[str, str]]):
    values = cfg.to_dict()
    for key, origin in (origins or {}).items():
        section, _, name = key.partition(".")
        yield key, values[section][name] if name else values[key], origin


def _short(value: Any) -> str:
    text = str(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _output_dir(cfg: TrainConfig) -> Path:
    if cfg.output:
        return Path(cfg.output)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("output") / "train" / f"{stamp}-{cfg.model}-{get_source(cfg.resolved_dataset).name}"


def wrap(run: Run) -> None:
    """DDP around the model (several processes), then torch.compile when asked for."""
    run.train_model = wrap_model(run.model, run.info)
    run.ddp = run.train_model if isinstance(run.train_model, DistributedDataParallel) else None
    if run.cfg.compile == "regional":
        check_compile_supported(run.info.device)
        run.model.compile_blocks()  # in place: DDP wraps the same modules
    elif run.cfg.compile:
        check_compile_supported(run.info.device)
        run.train_model = torch.compile(run.train_model)


def check_compile_combination(cfg: TrainConfig) -> None:
    """One line before any data is read, instead of the inductor error a training run met with this combination
    (``cannot determine truth value of Relational``)."""
    if cfg.compile is True and cfg.channels_last and cfg.grad_checkpointing:
        raise GcvimoeError("--compile cannot be combined with both --channels-last and --grad-checkpointing (the "
                           "compiler fails on them together); drop --channels-last or --grad-checkpointing, or train "
                           "without --compile")


def check_compile_supported(device: torch.device) -> None:
    """One line instead of a compiler traceback when this torch, Python or machine cannot compile."""
    if not torch._dynamo.is_dynamo_supported():
        raise GcvimoeError(f"--compile: torch.compile is not supported with this Python or torch "
                           f"({sys.version.split()[0]}, torch {torch.__version__}); train without --compile")
    if device.type == "cpu" and not any(shutil.which(name) for name in ("c++", "g++", "clang++")):
        raise GcvimoeError("--compile on the CPU needs a C++ compiler (inductor builds C++ kernels); install g++ or "
                           "train without --compile")


def log_header(run: Run, state: TrainState) -> None:
    """What the run trains, on what, where, for how long, and where its derived values came from."""
    cfg, info, data_cfg = run.cfg, run.info, run.data_cfg
    if cfg.amp and info.device.type != "cuda":
        _logger.info("amp: mixed precision needs a GPU; training in float32 on %s", info.device)
    num_params = whole_model_parameters(run.model)
    _logger.info(
        "model %s: %.2fM parameters | data %s: %d train / %d val images, %d classes, %dx%d px, %d channel(s) | "
        "%d process(es) on %s, global batch %d, lr %.3g | output %s",
        cfg.model, num_params / 1e6, cfg.resolved_dataset, len(run.train_loader.dataset),
        len(run.eval_loader.dataset), data_cfg.num_classes, data_cfg.img_size, data_cfg.img_size, data_cfg.in_chans,
        info.world_size, info.device, global_batch(cfg, info), scaled_lr(cfg, global_batch(cfg, info)),
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
