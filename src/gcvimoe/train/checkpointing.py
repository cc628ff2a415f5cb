"""The run folder: writing its checkpoints and summary, pruning old ones, repairing what a kill left, restoring a run.

They are read by the package's one reader, :func:`gcvimoe.models.read_checkpoint`. A checkpoint is a dict of tensors
and plain Python values:

- ``model_name``, ``model_args``: the constructor call, so ``gcvimoe.models.create_model(**)`` rebuilds the model;
- ``state_dict`` (and ``ema_state_dict`` when EMA is on);
- ``data_config``: dataset, image size, channels, mean/std, interpolation, crop and ``class_names``;
- ``optimizer``, ``scheduler``, ``scaler``, ``epoch`` (epochs completed), ``step`` (optimiser updates), ``rng`` (one
  entry per process), ``history`` (the summary.csv rows), ``best``, and ``config`` (the training config).

Files are written to a temporary name and renamed, so a crash while saving never loses the previous checkpoint.

A sharded checkpoint (``last/``, ``best/``: ``checkpoint_format: sharded``, the default under expert parallelism) is
a folder of the same content: DCP files with the tensors, each process's experts and optimiser state written by that
process, and ``training.pth`` with the rest (see :mod:`gcvimoe.models.sharded`; written and resharded by
:mod:`gcvimoe.train.sharded_checkpoints`). Resuming reads ``training.pth`` first and the tensors after the model is
built, so that every process reads its own experts only.

The folder holds ``last.pth`` (complete, for resuming), ``best.pth`` (best ``eval_top1``, without the optimiser),
``checkpoint-<epoch>.pth`` every ``checkpoint_every`` epochs (the newest ``keep_last`` kept), ``summary.csv`` (one row
per epoch), and ``model/``: the best weights in the layout timm loads.
"""
import logging
import random
import re
import shutil
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch
from timm.utils import random_seed

from gcvimoe.errors import GcvimoeError
from gcvimoe.files import atomic_dir, atomic_path, write_records
from gcvimoe.models import build_model, model_from_checkpoint, read_checkpoint, save_model
from gcvimoe.models.sharded import TRAINING_FILE, is_sharded_checkpoint, read_training_state
from gcvimoe.train.distributed import all_gather_objects
from gcvimoe.train.run import Run, TrainState
from gcvimoe.train.sharded_checkpoints import (
    full_state, load_sharded, local_optimizer_state, local_state_dict, save_sharded, sharded_state)

_logger = logging.getLogger("gcvimoe.train")

FORMAT_VERSION = 1

SHARDED_KEY = "sharded_from"
"""Set in the training state of a sharded checkpoint to its folder: the tensors are still to be read."""

SUMMARY_COLUMNS = ("epoch", "train_loss", "train_aux_loss", "eval_loss", "eval_top1", "eval_top5", "lr",
                   "dropped_fraction", "images_per_s")
EMA_COLUMNS = ("ema_eval_loss", "ema_eval_top1", "ema_eval_top5")

RUN_FILES = ("last.pth", "best.pth", "last", "best", "summary.csv", "train.log", "config.yaml")

WEIGHTS_ONLY_DROPS = ("optimizer", "scheduler", "scaler", "rng")


def save_run_checkpoint(run: Run, state: TrainState, is_best: bool) -> None:
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
        _save_epoch({**_training_state(run, state, rng), **weights}, run.output_dir, is_best, run.cfg.checkpoint_every,
                    run.cfg.keep_last)


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


def _save_epoch(state: Dict[str, Any], output_dir: Path, is_best: bool, checkpoint_every: int, keep_last: int
                ) -> None:
    """last.pth (complete, for resuming), best.pth (weights, EMA and records, without the optimiser) when the epoch
    is the best so far, checkpoint-<epoch>.pth every ``checkpoint_every`` epochs (the newest ``keep_last`` kept),
    summary.csv."""
    # best.pth before last.pth: a kill between them resumes from the older last.pth, whose rerun of the epoch writes
    # the same best.pth again, so best.pth is never older than what last.pth records
    if is_best:
        save_checkpoint({k: v for k, v in state.items() if k not in WEIGHTS_ONLY_DROPS}, output_dir / "best.pth")
    save_checkpoint(state, output_dir / "last.pth")
    if checkpoint_every and not state["batch"] and state["epoch"] % checkpoint_every == 0:
        with atomic_path(output_dir / f"checkpoint-{state['epoch']}.pth") as tmp:
            shutil.copyfile(output_dir / "last.pth", tmp)
        _prune_epoch_checkpoints(output_dir, keep_last)
    write_summary(state["history"], output_dir / "summary.csv")


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
    write_summary(training["history"], output_dir / "summary.csv")


def save_checkpoint(state: Dict[str, Any], path) -> None:
    """Write ``state`` to ``path`` atomically (temporary file, then rename)."""
    with atomic_path(path) as tmp:
        torch.save(dict(state, format_version=FORMAT_VERSION), tmp)


def rng_state() -> Dict[str, Any]:
    """This process's Python, NumPy, torch (and CUDA) RNG states as tensors and plain values."""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def write_summary(history: List[Dict[str, float]], path: Path) -> None:
    """summary.csv: one row per epoch, the columns of ``SUMMARY_COLUMNS`` (and ``EMA_COLUMNS`` with an EMA)."""
    columns = list(SUMMARY_COLUMNS) + [c for c in EMA_COLUMNS if history and c in history[0]]
    rows = [{k: (f"{v:.8g}" if isinstance(v, float) else v) for k, v in row.items()} for row in history]
    write_records(path, rows, columns)


def _prune_epoch_checkpoints(output_dir: Path, keep_last: int) -> None:
    for old in epoch_checkpoints(output_dir)[:-keep_last] if keep_last else []:
        _remove_checkpoint(old)


def epoch_checkpoints(output_dir: Path) -> List[Path]:
    """The run's checkpoint-<epoch>.pth files and sharded checkpoint-<epoch>/ folders, oldest first."""
    found = [(int(m.group(1)), p) for p in output_dir.glob("checkpoint-*")
             if (m := re.fullmatch(r"checkpoint-(\d+)(\.pth)?", p.name))]
    return [p for _, p in sorted(found)]


def _remove_checkpoint(path: Path) -> None:
    """Remove a checkpoint file or sharded checkpoint folder."""
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def write_model_folder(run: Run, state: TrainState) -> None:
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


def never_checkpointed(output_dir: Path) -> bool:
    """Whether ``output_dir`` holds only what a run killed before its first last.pth leaves: its log and config, and
    the best.pth saved just before that last.pth (the restarted run writes the same one again). Anything else (a
    summary, epoch checkpoints) is a run of value that must not be replaced without --overwrite."""
    present = {name for name in RUN_FILES if (output_dir / name).exists()}
    return bool(present) and present <= {"train.log", "config.yaml", "best.pth", "best"} \
        and not epoch_checkpoints(output_dir)


def check_output_dir(output_dir: Path, resumed: bool, overwrite: bool) -> None:
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


def repair_after_kill(output_dir: Path, state: TrainState) -> None:
    """A run killed while saving may have left temporary files, and a summary.csv one epoch behind last.pth: remove
    the one, rewrite the other from the checkpoint's records."""
    for leftover in [*output_dir.glob(".*.tmp"), *output_dir.glob(".*.old")]:
        shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink(missing_ok=True)
    if state.history:
        write_summary(state.history, output_dir / "summary.csv")


def find_resume_checkpoint(resume: str, output_dir: Optional[str]) -> Optional[Path]:
    """The checkpoint ``--resume`` names: a path, or 'auto' for the output folder's ``last.pth`` or sharded ``last/``
    (the newer of the two when a run changed its format; None when there is none)."""
    if resume != "auto":
        path = Path(resume)
        if not (path.is_file() or is_sharded_checkpoint(path)):
            raise GcvimoeError(f"resume checkpoint {path} not found; pass an existing .pth file, a sharded checkpoint "
                               f"folder (RUN/last) or --resume auto")
        return path
    if not output_dir:
        raise GcvimoeError("--resume auto needs --output DIR naming the run folder to continue")
    found = [path for path in (Path(output_dir) / "last.pth", Path(output_dir) / "last")
             if path.is_file() or is_sharded_checkpoint(path)]
    return max(found, key=_written_at) if found else None


def _written_at(path: Path) -> float:
    """When a checkpoint was completed: its file's, or its folder's ``training.pth`` (written last)."""
    return (path / TRAINING_FILE if path.is_dir() else path).stat().st_mtime


def load_training_checkpoint(path) -> Dict[str, Any]:
    """The training state of a gcvimoe training checkpoint, with one-line errors for any other file. A sharded one's
    holds no tensors yet: ``state[SHARDED_KEY]`` names the folder to read them from."""
    if is_sharded_checkpoint(path):
        state = read_training_state(path)
        if "optimizer" not in state:
            raise GcvimoeError(f"{path} holds weights only (best/ keeps no optimiser state); resume from the run's "
                               f"last/, or start from these weights with --initial-checkpoint")
        return dict(state, **{SHARDED_KEY: str(path)})
    checkpoint = read_checkpoint(path)
    if checkpoint.training is None:
        raise GcvimoeError(f"{path} is not a gcvimoe training checkpoint; resume from a last.pth of gcvimoe train, or "
                           f"start from its weights with --initial-checkpoint")
    if "optimizer" not in checkpoint.training:
        raise GcvimoeError(f"{path} holds weights only (best.pth keeps no optimiser state); resume from the run's "
                           f"last.pth, or start from these weights with --initial-checkpoint")
    return checkpoint.training


def restore(resume: Dict[str, Any], run: Run) -> TrainState:
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


def set_rng_state(state: Dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
