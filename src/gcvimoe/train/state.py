"""Training checkpoints: writing them, finding the one to resume, and the random-number state they carry.

They are read by the package's one reader, :func:`gcvimoe.models.read_checkpoint`. A checkpoint is a dict of tensors and plain Python values:

- ``model_name``, ``model_args``: the constructor call, so ``gcvimoe.models.create_model(**)`` rebuilds the model;
- ``state_dict`` (and ``ema_state_dict`` when EMA is on);
- ``data_config``: dataset, image size, channels, mean/std, interpolation, crop and ``class_names``;
- ``optimizer``, ``scheduler``, ``scaler``, ``epoch`` (epochs completed), ``step`` (optimiser updates), ``rng`` (one
  entry per process), ``history`` (the summary.csv rows), ``best``, and ``config`` (the training config).

Files are written to a temporary name and renamed, so a crash while saving never loses the previous checkpoint.

A sharded checkpoint (``last/``, ``best/``: ``checkpoint_format: sharded``, the default under expert parallelism) is
a folder of the same content: DCP files with the tensors, each process's experts and optimiser state written by that
process, and ``training.pth`` with the rest (see :mod:`gcvimoe.models.sharded`; written and resharded by
:mod:`gcvimoe.train.distributed`). Resuming reads ``training.pth`` first and the tensors after the model is built, so
that every process reads its own experts only.
"""
import random
from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np
import torch

from gcvimoe.errors import GcvimoeError
from gcvimoe.files import atomic_path
from gcvimoe.models import read_checkpoint
from gcvimoe.models.sharded import TRAINING_FILE, is_sharded_checkpoint, read_training_state

FORMAT_VERSION = 1


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


def set_rng_state(state: Dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(state: Dict[str, Any], path) -> None:
    """Write ``state`` to ``path`` atomically (temporary file, then rename)."""
    with atomic_path(path) as tmp:
        torch.save(dict(state, format_version=FORMAT_VERSION), tmp)


SHARDED_KEY = "sharded_from"
"""Set in the training state of a sharded checkpoint to its folder: the tensors are still to be read."""


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
