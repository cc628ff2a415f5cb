"""Checkpoints of an expert-parallel run, on any number of processes: every expert in one file, or sharded folders.

With expert parallelism every process holds ``e / w`` experts of each MoE layer (:mod:`gcvimoe.moe.parallel`). A file
checkpoint (:func:`full_state`) gathers every expert to the first process, and a resume takes this process's share
back (:func:`local_state_dict`, :func:`local_optimizer_state`). A sharded one (:func:`save_sharded`,
``torch.distributed.checkpoint``) has every process write its own experts and optimiser state as its rows of a DTensor,
and read back the share of its new place (:func:`load_sharded`), whatever the process count that wrote it. Its layout
is :mod:`gcvimoe.models.sharded`'s: ``state_dict.<name>``, ``ema_state_dict.<name>`` and
``optimizer.<parameter name>.<state name>`` tensors, and ``training.pth`` with the rest.
"""
import functools
import warnings
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.distributed.checkpoint as dcp
from torch import nn

from gcvimoe.errors import GcvimoeError, first_line
from gcvimoe.files import atomic_dir, temporary_path
from gcvimoe.models.sharded import TRAINING_FILE, SafeFileSystemReader, tensor_index
from gcvimoe.moe.parallel import (
    EXPERT_PARAM_NAMES, gather_expert_optimizer_state, gather_expert_state_dict, is_expert_parallel,
    shard_expert_optimizer_state, shard_expert_state_dict)
from gcvimoe.train.distributed import DistInfo, barrier


def full_state(model: nn.Module, optimizer: torch.optim.Optimizer, ema_model: Optional[nn.Module],
               info: DistInfo) -> Dict[str, Any]:
    """``state_dict``, ``optimizer`` (and ``ema_state_dict``) as one process holding every expert would have them.

    A collective under expert parallelism: every process must call it.
    """
    state = {"state_dict": model.state_dict(), "optimizer": optimizer.state_dict()}
    if ema_model is not None:
        state["ema_state_dict"] = ema_model.state_dict()
    if info.distributed and is_expert_parallel(model):
        state["state_dict"] = gather_expert_state_dict(state["state_dict"])
        state["optimizer"] = gather_expert_optimizer_state(optimizer)
        if ema_model is not None:
            state["ema_state_dict"] = gather_expert_state_dict(state["ema_state_dict"])
    return state


def local_state_dict(state_dict: Dict[str, torch.Tensor], model: nn.Module, info: DistInfo) -> Dict[str, Any]:
    """The part of a full state dict (every expert) that this process's ``model`` loads."""
    if info.distributed and is_expert_parallel(model):
        return shard_expert_state_dict(state_dict, info.rank, info.world_size)
    return state_dict


def local_optimizer_state(state_dict: Dict[str, Any], model: nn.Module, optimizer: torch.optim.Optimizer,
                          info: DistInfo) -> Dict[str, Any]:
    """The part of a full optimiser state dict (every expert) that this process's ``optimizer`` loads."""
    if info.distributed and is_expert_parallel(model):
        return shard_expert_optimizer_state(state_dict, optimizer, info.rank, info.world_size)
    return state_dict


def _is_expert_tensor(name: str) -> bool:
    module, _, tensor = name.rpartition(".")
    return tensor in EXPERT_PARAM_NAMES and module.endswith("experts")


@functools.lru_cache(maxsize=None)
def _process_mesh(device_type: str, world_size: int):
    from torch.distributed.device_mesh import DeviceMesh
    return DeviceMesh(device_type, list(range(world_size)))


def _global(value: torch.Tensor, sharded: bool, info: DistInfo) -> torch.Tensor:
    """``value`` as DCP sees it: this process's experts as its rows of a DTensor over all processes, else itself."""
    if not sharded:
        return value
    from torch.distributed.tensor import DTensor, Shard
    return DTensor.from_local(value, _process_mesh(info.device.type, info.world_size), [Shard(0)], run_check=False)


def _parameter_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> List[str]:
    """The name of each parameter of ``optimizer`` in its state-dict order (parameter order over groups)."""
    names = {id(param): name for name, param in model.named_parameters()}
    return [names[id(param)] for group in optimizer.param_groups for param in group["params"]]


def sharded_state(model: nn.Module, optimizer: Optional[torch.optim.Optimizer], ema_model: Optional[nn.Module],
                  info: DistInfo) -> Tuple[Dict[str, torch.Tensor], Optional[Dict[str, Any]]]:
    """What :func:`save_sharded` writes: every tensor under its DCP key (see :mod:`gcvimoe.models.sharded`), this
    process's experts as its share of a DTensor, and the optimiser's state dict without its tensors (or None)."""
    sharded = info.distributed and is_expert_parallel(model)
    tensors = {}
    for prefix, module in (("state_dict", model), ("ema_state_dict", ema_model)):
        for name, value in (module.state_dict().items() if module is not None else ()):
            tensors[f"{prefix}.{name}"] = _global(value, sharded and _is_expert_tensor(name), info)
    if optimizer is None:
        return tensors, None
    packed = optimizer.state_dict()
    names, rest = _parameter_names(model, optimizer), {}
    for index, state in packed["state"].items():
        expert = sharded and _is_expert_tensor(names[index])
        for key, value in state.items():
            if torch.is_tensor(value):
                tensors[f"optimizer.{names[index]}.{key}"] = _global(value, expert and value.dim() > 0, info)
        rest[index] = {key: value for key, value in state.items() if not torch.is_tensor(value)}
    return tensors, {"state": rest, "param_groups": packed["param_groups"]}


def save_sharded(path: Path, tensors: Dict[str, torch.Tensor], training: Dict[str, Any], info: DistInfo) -> None:
    """Write a sharded checkpoint folder: every process its own tensors, the first one ``training.pth`` (the rest).

    A collective: every process calls it with its own ``tensors`` (:func:`sharded_state`). The folder is filled under
    a temporary name and renamed into place once complete (:func:`gcvimoe.files.atomic_dir`), so a crash leaves the
    previous checkpoint. Several machines need ``path`` on a file system they share.
    """
    folder = atomic_dir(path) if info.is_primary else nullcontext(temporary_path(path))
    with folder as tmp:
        barrier(info)  # the first process has made the empty folder
        dcp.save(tensors, storage_writer=dcp.FileSystemWriter(str(tmp)), no_dist=not info.distributed)
        if info.is_primary:
            torch.save(training, tmp / TRAINING_FILE)
    barrier(info)  # in place before any process reads or replaces it


def _load_target(key: str, size: torch.Size, dtype: torch.dtype, sharded: bool, device: torch.device,
                 info: DistInfo) -> torch.Tensor:
    """An empty tensor for DCP to fill: this process's rows of a sharded tensor, else the whole one."""
    if not sharded:
        return torch.empty(size, dtype=dtype, device=device)
    if size[0] % info.world_size:
        raise GcvimoeError(f"{key} holds {size[0]} experts, not divisible by {info.world_size} processes; resume "
                           f"on a process count that divides the expert count")
    local = torch.empty(size[0] // info.world_size, *size[1:], dtype=dtype, device=device)
    return _global(local, True, info)


def _optimizer_targets(folder, model: nn.Module, optimizer: torch.optim.Optimizer, info: DistInfo
                       ) -> Dict[int, Dict[str, torch.Tensor]]:
    """Empty tensors for the optimiser state the checkpoint holds, by parameter index and state name."""
    sharded = info.distributed and is_expert_parallel(model)
    index = tensor_index(folder)
    params = [param for group in optimizer.param_groups for param in group["params"]]
    targets: Dict[int, Dict[str, torch.Tensor]] = {}
    for position, name in enumerate(_parameter_names(model, optimizer)):
        prefix = f"optimizer.{name}."
        for key, meta in index.items():
            if key.startswith(prefix):
                expert = sharded and _is_expert_tensor(name) and len(meta.size) > 0
                targets.setdefault(position, {})[key[len(prefix):]] = _load_target(
                    key, meta.size, meta.properties.dtype, expert, params[position].device, info)
    return targets


def _local(value: torch.Tensor) -> torch.Tensor:
    return value.to_local() if hasattr(value, "to_local") else value


def _part(tensors: Dict[str, torch.Tensor], prefix: str) -> Dict[str, torch.Tensor]:
    """The local tensors under ``prefix``, without it."""
    return {key[len(prefix):]: _local(value) for key, value in tensors.items() if key.startswith(prefix)}


def load_sharded(folder, model: nn.Module, optimizer: Optional[torch.optim.Optimizer], ema_model: Optional[nn.Module],
                 optimizer_rest: Optional[Dict[str, Any]], info: DistInfo) -> None:
    """Load a sharded checkpoint into this process's ``model`` (its share of the experts), ``optimizer`` and
    ``ema_model``, whatever the number of processes that wrote it. A collective when several processes run.

    ``optimizer_rest`` is the optimiser's state dict without its tensors (``training.pth``). An EMA the checkpoint
    lacks starts from the weights.
    """
    saved_ema = any(key.startswith("ema_state_dict.") for key in tensor_index(folder))
    targets, _ = sharded_state(model, None, ema_model if saved_ema else None, info)
    optimizer_targets = _optimizer_targets(folder, model, optimizer, info) if optimizer is not None else {}
    names = _parameter_names(model, optimizer) if optimizer is not None else []
    flat = dict(targets, **{f"optimizer.{names[position]}.{key}": value
                            for position, state in optimizer_targets.items() for key, value in state.items()})
    try:
        with warnings.catch_warnings():  # DCP's note that one process reads alone, which is the intent then
            warnings.simplefilter("ignore")
            dcp.load(flat, storage_reader=SafeFileSystemReader(str(folder)), no_dist=not info.distributed)
    except (RuntimeError, dcp.api.CheckpointException) as e:
        raise GcvimoeError(f"cannot load the sharded checkpoint {folder} into this model ({first_line(e, 200)}); "
                           f"resume with the run's own config") from None
    model.load_state_dict(_part(targets, "state_dict."))
    if ema_model is not None:
        ema_model.load_state_dict(_part(targets, "ema_state_dict.") if saved_ema else model.state_dict())
    if optimizer is not None:
        state = {position: {**optimizer_rest["state"].get(position, {}),
                            **{key: _local(value) for key, value in tensors.items()}}
                 for position, tensors in optimizer_targets.items()}
        optimizer.load_state_dict({"state": state, "param_groups": optimizer_rest["param_groups"]})

