"""Checkpoints that rebuild their model alone and load with ``torch.load(path, weights_only=True)``.

A checkpoint is a dict of tensors and plain Python values:

- ``model_name``, ``model_args``: the constructor call, so ``gcvimoe.models.create_model(**)`` rebuilds the model;
- ``state_dict`` (and ``ema_state_dict`` when EMA is on);
- ``data_config``: dataset, image size, channels, mean/std, interpolation, crop and ``class_names``;
- ``optimizer``, ``scheduler``, ``scaler``, ``epoch`` (epochs completed), ``step`` (optimiser updates), ``rng`` (one
  entry per process), ``history`` (the summary.csv rows), ``best``, and ``config`` (the training config).

Files are written to a temporary name and renamed, so a crash while saving never loses the previous checkpoint.
"""
import os
import random
from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np
import torch
from torch import nn

from gcvimoe.errors import GcvimoeError
from gcvimoe.models.export import load_weights

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
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(dict(state, format_version=FORMAT_VERSION), tmp)
    os.replace(tmp, path)


def load_checkpoint(path) -> Dict[str, Any]:
    """Read a gcvimoe checkpoint on the CPU, with one-line errors for a missing, foreign or damaged file."""
    path = Path(path)
    if not path.is_file():
        raise GcvimoeError(f"checkpoint {path} not found; pass the path of a last.pth or best.pth")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a damaged or foreign file
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise GcvimoeError(f"cannot read checkpoint {path} ({reason[:200]}); pass a file written by gcvimoe train") \
            from None
    required = ("model_name", "model_args", "state_dict", "data_config")
    if not isinstance(checkpoint, dict) or any(key not in checkpoint for key in required):
        raise GcvimoeError(f"{path} is not a gcvimoe training checkpoint; pass a file written by gcvimoe train")
    return checkpoint


def build_model(model_name: str, model_args: Dict[str, Any]) -> nn.Module:
    """Build a registered gcvimoe model from its name and constructor arguments."""
    from gcvimoe.models import create_model
    try:
        return create_model(model_name, **model_args)
    except (TypeError, ValueError) as e:
        raise GcvimoeError(f"cannot build {model_name} with {model_args} ({e}); check img_size, model_kwargs and "
                           "the MoE keys") from None


def model_from_checkpoint(checkpoint: Dict[str, Any], use_ema: bool = False) -> nn.Module:
    """Rebuild the model of ``checkpoint`` in eval mode, with the trained (or the EMA) weights."""
    model = build_model(checkpoint["model_name"], checkpoint["model_args"])
    key = "state_dict"
    if use_ema:
        if "ema_state_dict" not in checkpoint:
            raise GcvimoeError("this checkpoint holds no EMA weights (trained without ema); drop --use-ema")
        key = "ema_state_dict"
    # the same strict load, with one-line mismatch errors, as every other checkpoint reader
    load_weights(model, checkpoint[key], source=f"the checkpoint's {key}")
    return model.eval()


def find_resume_checkpoint(resume: str, output_dir: Optional[str]) -> Optional[Path]:
    """The checkpoint ``--resume`` names: a path, or 'auto' for ``<output>/last.pth`` (None when there is none)."""
    if resume != "auto":
        path = Path(resume)
        if not path.is_file():
            raise GcvimoeError(f"resume checkpoint {path} not found; pass an existing .pth file or --resume auto")
        return path
    if not output_dir:
        raise GcvimoeError("--resume auto needs --output DIR naming the run folder to continue")
    path = Path(output_dir) / "last.pth"
    return path if path.is_file() else None
