"""The training loop, read top to bottom: :func:`train` -> :func:`fit` -> :func:`run_epoch` -> :func:`train_one_epoch`
-> :func:`train_step` and :func:`optimizer_step`. Assembling a run is :mod:`gcvimoe.train.build`'s, its folder and
checkpoints :mod:`gcvimoe.train.checkpointing`'s, several processes :mod:`gcvimoe.train.distributed`'s.

One process::

    gcvimoe train                                   # gcvimoe_nano on the embedded digits
    gcvimoe train -c digits --epochs 5 --output runs/digits
    gcvimoe train -c gcvimoe_tiny --data-dir /data/imagenet --output runs/tiny
    gcvimoe train --resume auto --output runs/tiny  # continue where runs/tiny/last.pth stopped

Several processes (DDP; gloo on CPU, NCCL on GPU)::

    torchrun --nproc_per_node 8 -m gcvimoe train -c gcvimoe_tiny --data-dir /data/imagenet
    torchrun --nproc_per_node 8 -m gcvimoe train -c gcvimoe_tiny --expert-parallel  # 1 expert each

With ``expert_parallel`` each process holds ``num_experts / world_size`` experts of every MoE layer and tokens reach
their expert by all-to-all; checkpoints still hold every expert (see :mod:`gcvimoe.train.sharded_checkpoints`).

The loop emits records and never draws: callbacks (:class:`Callback`) receive every epoch's row and the final
evaluation; the command line hands in the one that plots (:mod:`gcvimoe.analysis`).

``batch_size`` is per process; with ``lr_batch_size`` set, the LR follows the global batch
(``batch_size * grad_accum_steps * world_size``), see :mod:`gcvimoe.train.config`.

The loss is cross-entropy (soft-target with Mixup/CutMix, label-smoothed otherwise) plus the MoE aux loss the model's
MoE layers computed in the forward pass; both are logged on their own.

The output folder holds ``config.yaml`` (the effective config), ``summary.csv`` (one row per epoch: the columns of
:data:`gcvimoe.train.checkpointing.SUMMARY_COLUMNS`, ``lr`` at the end of the epoch, ``images_per_s`` summed over
processes, ``dropped_fraction`` the share of token-to-expert assignments dropped for capacity in training),
``last.pth``, ``best.pth`` (best
``eval_top1``), ``checkpoint-<epoch>.pth`` every ``checkpoint_every`` epochs, ``train.log`` (a line every
``log_interval`` steps and one per epoch), and ``tensorboard/`` when tensorboard is installed (see
:mod:`gcvimoe.train.sinks`); the command line's plotting callback adds ``curves.png`` and ``expert_usage.png``.
"""
import dataclasses
import logging
import math
import time
from contextlib import nullcontext
from functools import partial
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

import torch
from timm.utils import dispatch_clip_grad
from torch import nn

from gcvimoe.data import batches_per_epoch, set_epoch
from gcvimoe.errors import GcvimoeError
from gcvimoe.moe import collect_aux_loss, collect_moe_report
from gcvimoe.train.build import build_run, log_header, wrap
from gcvimoe.train.checkpointing import (
    check_output_dir, repair_after_kill, restore, save_run_checkpoint, write_model_folder)
from gcvimoe.train.checks import (
    check_learning, check_output_folder, checkpoint_bytes, collect_unreadable, listing_unreadable_on_error,
    prepare_data)
from gcvimoe.train.config import TrainConfig, save_config
from gcvimoe.train.durations import parse_duration
from gcvimoe.train.distributed import (
    DistInfo, all_gather_objects, all_reduce_sum, average_expert_grads, barrier, cleanup,
    clip_grad_norm_expert_parallel, collective_failure, init_distributed, is_collective_failure)
from gcvimoe.train.evaluate import evaluate, iterate
from gcvimoe.train.preemption import Preemption
from gcvimoe.train.progress import StepMeter, expert_load_scalars, log_to, resolve_log_interval
from gcvimoe.train.run import Callback, Run, TrainResult, TrainState
from gcvimoe.train.sinks import ScalarLog, scalar_log

_logger = logging.getLogger("gcvimoe.train")


def train(cfg: TrainConfig, resume: Optional[Dict[str, Any]] = None, callbacks: Sequence[Callback] = (),
          origins: Optional[Dict[str, str]] = None, notes: Sequence[str] = ()) -> TrainResult:
    """Train as ``cfg`` says, continuing from the checkpoint dict ``resume`` when given.

    Joins the torchrun process group when launched by torchrun and leaves it at the end.

    Args:
        cfg: The run's config.
        resume: A training checkpoint's dict (:func:`gcvimoe.train.checkpointing.load_training_checkpoint`), or None.
        callbacks: Called on the primary process after every epoch and at the end (plots, for instance).
        origins: Where each non-default config value came from (``origins`` of
            :func:`gcvimoe.train.config.build_config`), for the run's header.
        notes: Lines the caller adds to the header (the command line's choice of recipe, for instance).
    """
    threads = torch.get_num_threads()
    info = init_distributed(cfg.device, parse_duration("dist_timeout", cfg.dist_timeout))
    try:
        if resume is not None and resume["epoch"] > cfg.epochs + cfg.cooldown_epochs:
            return _already_trained(cfg, resume, info)
        run = build_run(cfg, info, resumed=resume is not None, callbacks=callbacks, origins=origins, notes=notes)
        check_output_dir(run.output_dir, resumed=resume is not None, overwrite=run.cfg.overwrite)
        state = restore(resume, run) if resume is not None else TrainState()
        result = fit(run, state, resumed=resume is not None)
        barrier(info)  # a process that tears gloo down while a peer still works (writing the model folder) can abort
        return result
    except RuntimeError as e:  # a collective timed out or lost its peer (the heartbeat names a frozen process)
        if is_collective_failure(e, info):
            raise collective_failure(e, info) from None
        raise
    finally:
        cleanup(info)
        torch.set_num_threads(threads)


def _already_trained(cfg: TrainConfig, resume: Dict[str, Any], info: DistInfo) -> TrainResult:
    """A resume asked for fewer epochs than the checkpoint has: one line, and the run folder (config.yaml included)
    stays as it is, so it keeps describing the run that produced it. (Asking for exactly the epochs done finishes the
    run folder instead: a kill between the last checkpoint and the model folder must be able to complete it.)"""
    done, requested = resume["epoch"], cfg.epochs + cfg.cooldown_epochs
    if info.is_primary:
        print(f"resume: {cfg.output} has already trained {done} epochs of the {requested} requested: nothing to "
              f"train, the run folder is left as it is; to train longer, pass --epochs above {done - cfg.cooldown_epochs}")
    best = resume.get("best", {})
    return TrainResult(Path(cfg.output), list(resume.get("history", [])), best.get("top1", -1.0), best.get("epoch", 0),
                       0.0, {})


def fit(run: Run, state: TrainState, resumed: bool) -> TrainResult:
    """The run folder and its logs, then the epochs from ``state`` on, then the model folder."""
    wrap(run)
    expert_copies = run.info.world_size if run.expert_parallel else 1
    check_output_folder(run.output_dir, checkpoint_bytes(run.model, run.ema is not None, expert_copies)
                        * (1 if resumed else 2), run.info)  # room for the new file beside the old (last and best)
    if run.info.is_primary:
        run.output_dir.mkdir(parents=True, exist_ok=True)
        # the absolute data path, so that the folder's config and checkpoints find the data from anywhere
        save_config(dataclasses.replace(run.cfg, output=str(run.output_dir), data_dir=run.data_cfg.data_dir
                                        if run.cfg.data_dir else ""), run.output_dir / "config.yaml")
        if resumed:
            repair_after_kill(run.output_dir, state)
    with log_to(run.output_dir, run.info, append=resumed), \
            scalar_log(run.output_dir, run.info, run.cfg, _first_step(run, state) if resumed else None) as writer:
        log_header(run, state)
        if resumed and state.epoch >= run.total_epochs:
            _logger.info("all %d epochs were already trained: writing the model folder and figures again", state.epoch)
        prepare_data(run, resumed)
        eval_result: Dict[str, Any] = {}
        initial_eval = _initial_evaluation(run) if run.cfg.initial_checkpoint and not resumed else None
        with Preemption(run.cfg.save_interval, run.info) as run.preemption:
            for epoch in range(state.epoch, run.total_epochs):
                eval_result = run_epoch(run, state, epoch, writer)
                if run.info.is_primary:
                    for callback in run.callbacks:
                        callback.on_epoch_end(run, state, eval_result)
                _stop_after_epoch(run, epoch)
        if run.info.is_primary and state.history:
            write_model_folder(run, state)
            for callback in run.callbacks:
                callback.on_train_end(run, state, eval_result)
            _logger.info("best top-1 %.2f %% at epoch %d | outputs in %s (model folder: %s)", state.best_top1,
                         state.best_epoch, run.output_dir, run.output_dir / "model")
        return TrainResult(run.output_dir, state.history, state.best_top1, state.best_epoch, state.train_seconds,
                           eval_result, initial_eval)


def run_epoch(run: Run, state: TrainState, epoch: int, writer: ScalarLog) -> Dict[str, Any]:
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
    save_run_checkpoint(run, state, is_best)
    writer.add("epoch", epoch + 1, {**{key: value for key, value in row.items() if key != "epoch"},
                                    **expert_load_scalars(eval_result["experts"], "eval_experts")})
    _log_epoch(row, run.total_epochs, time.perf_counter() - epoch_start, unreadable)
    _advise_on_drops(run, epoch, row["dropped_fraction"])
    if run.info.is_primary:
        check_learning(row, run.cfg.warmup_epochs, run.data_cfg.num_classes, run.cfg.lr)
    return eval_result


DROPPED_ADVICE_THRESHOLD = 0.10  # above it, capacity cuts enough tokens to cost accuracy, beyond the usual few %


def _advise_on_drops(run: Run, epoch: int, dropped_fraction: float) -> None:
    """One line per run when an epoch after warmup dropped more token-to-expert assignments than the threshold."""
    after_warmup = epoch >= (run.cfg.warmup_epochs or 0)
    if run.drops_advised or not after_warmup or dropped_fraction <= DROPPED_ADVICE_THRESHOLD:
        return
    run.drops_advised = True
    _logger.info("note: epoch %d dropped %.1f%% of token-to-expert assignments after warmup (above %.0f%%: the "
                 "experts' capacity is cutting tokens); raise --capacity-factor (now %g), train dropless with "
                 "--capacity-factor 0, or balance the experts harder with a larger --aux-loss-weight (now %g)",
                 epoch + 1, 100 * dropped_fraction, 100 * DROPPED_ADVICE_THRESHOLD, run.cfg.moe.capacity_factor,
                 run.cfg.moe.aux_loss_weight)


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
        writer: Where the log steps' scalars go (the sinks of :mod:`gcvimoe.train.sinks`), or None.
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
            ce_loss, aux_loss = train_step(run, images, targets.to(info.device, non_blocking=True), window,
                                           need_update)
            if need_update:
                state.num_updates = optimizer_step(run, state.num_updates)
            meter.update(ce_loss, aux_loss, images.shape[0], collect_moe_report(run.model),
                         peak_lr(run.optimizer))
            if meter.is_log_step(batch_idx):
                _log_step(run, meter, writer, epoch, batch_idx)
            if need_update and batch_idx < num_batches - 1 and run.preemption is not None:
                _maybe_save_mid_epoch(run, state, epoch, batch_idx, meter, writer)
    state.batch, state.epoch_sums = 0, None
    stats, experts = meter.epoch_stats()
    writer.add("epoch", epoch + 1, expert_load_scalars(experts))
    return stats


def peak_lr(optimizer: torch.optim.Optimizer) -> float:
    """The largest LR of the optimiser's groups: the head's, which layer-wise decay leaves unscaled."""
    return max(group["lr"] for group in optimizer.param_groups)


def train_step(run: Run, images: torch.Tensor, targets: torch.Tensor, window: int, sync: bool):
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


def optimizer_step(run: Run, num_updates: int) -> int:
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


def _clip_gradients(run: Run) -> None:
    cfg = run.cfg
    if run.expert_parallel and cfg.clip_mode == "norm":
        clip_grad_norm_expert_parallel(run.model, cfg.clip_grad, run.info)
    else:  # 'value' and 'agc' clip each parameter on its own: the same with sharded experts
        dispatch_clip_grad(run.model.parameters(), cfg.clip_grad, mode=cfg.clip_mode)


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
    save_run_checkpoint(run, state, is_best=False)
    run.preemption.saved()
    where = f"in epoch {epoch + 1} after batch {batch_idx + 1} of {meter.num_batches}"
    _logger.info("saved %s %s (optimiser step %d)", run.output_dir / "last.pth", where, state.num_updates)
    state.batch, state.epoch_sums = 0, None
    if signum is not None:
        raise run.preemption.stop_message(signum, where, run.output_dir / "last.pth")


def _evaluate_row(run: Run, epoch: int, train_stats: Dict[str, float]):
    """The epoch's summary row, after evaluating the model (and the EMA), and the model's evaluation."""
    evaluate_on_val = partial(_evaluate, run)
    eval_result = evaluate_on_val(run.model)
    row = {"epoch": epoch + 1, **train_stats, "eval_loss": eval_result["loss"], "eval_top1": eval_result["top1"],
           "eval_top5": eval_result["top5"], "lr": peak_lr(run.optimizer)}
    if run.ema is not None:
        ema_result = evaluate_on_val(run.ema.module)
        row.update(ema_eval_loss=ema_result["loss"], ema_eval_top1=ema_result["top1"],
                   ema_eval_top5=ema_result["top5"])
    return row, eval_result


def _evaluate(run: Run, model: nn.Module) -> Dict[str, Any]:
    return evaluate(model, run.eval_loader, num_classes=run.data_cfg.num_classes, info=run.info, autocast=run.autocast,
                    channels_last=run.cfg.channels_last)


def _initial_evaluation(run: Run) -> Dict[str, Any]:
    """Where a fine-tune starts: the initial weights evaluated before the first step."""
    result = _evaluate(run, run.model)
    _logger.info("epoch   0 (initial weights) | eval loss %.6f top-1 %6.2f top-5 %6.2f", result["loss"], result["top1"],
                 result["top5"])
    return result


def _log_epoch(row: Dict[str, float], total_epochs: int, seconds: float, unreadable: int = 0) -> None:
    ema_text = f" | ema top-1 {row['ema_eval_top1']:6.2f}" if "ema_eval_top1" in row else ""
    if unreadable:
        ema_text += f" | {unreadable} unreadable image{'s' * (unreadable != 1)} skipped"
    _logger.info(
        "epoch %3d/%d | train loss %.4f aux %.4f | eval loss %.4f top-1 %6.2f top-5 %6.2f%s | lr %.2e | "
        "dropped %.2f%% | %.0f img/s | %.1fs", row["epoch"], total_epochs, row["train_loss"], row["train_aux_loss"],
        row["eval_loss"], row["eval_top1"], row["eval_top5"], ema_text, row["lr"], 100 * row["dropped_fraction"],
        row["images_per_s"], seconds)


def _stop_after_epoch(run: Run, epoch: int) -> None:
    """The epoch's checkpoint is a save: restart the save-interval clock, and stop if a signal came meanwhile."""
    run.preemption.saved()
    _, signum = run.preemption.check(0)
    if signum is not None and epoch + 1 < run.total_epochs:
        raise run.preemption.stop_message(signum, f"after epoch {epoch + 1}", run.output_dir / "last.pth")


def _first_step(run: Run, state: TrainState) -> int:
    """The step axis value of the first micro-batch this run trains (see :func:`_log_step`)."""
    return state.epoch * batches_per_epoch(run.train_loader) + state.batch + 1
