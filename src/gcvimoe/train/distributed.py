"""Everything that knows about several processes: process-group setup from torchrun, the DDP wrapper, reductions.

Launch lines::

    gcvimoe train -c digits                                      # one process
    torchrun --nproc_per_node 4 -m gcvimoe train -c gcvimoe_tiny  # one node, 4 processes
    torchrun --nnodes 2 --node_rank R --master_addr HOST --nproc_per_node 8 -m gcvimoe train ...  # two nodes

    torchrun --nproc_per_node 4 -m gcvimoe train -c gcvimoe_tiny --expert-parallel  # DDP + EP

torchrun sets RANK, LOCAL_RANK and WORLD_SIZE; the backend is NCCL on GPUs and gloo on CPU.

With expert parallelism every process keeps ``e / w`` experts of each MoE layer (:mod:`gcvimoe.moe.parallel`); DDP
then reduces the other parameters only, the expert gradients are averaged here as DDP averages the rest, gradient
clipping uses the norm over the whole job, and checkpoints gather every expert, so they load on any number of
processes.
"""
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import torch
import torch.distributed as dist
from timm.utils.distributed import init_distributed_device_so
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from gcvimoe.errors import GcvimoeError
from gcvimoe.moe.parallel import (
    gather_expert_optimizer_state, gather_expert_state_dict, is_expert_parallel, shard_expert_optimizer_state,
    shard_expert_state_dict, shard_experts_,
)


@dataclass
class DistInfo:
    """This process's place in the job."""
    device: torch.device
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_primary(self) -> bool:
        return self.rank == 0


def resolve_device(name: str) -> torch.device:
    """'auto' is the GPU when there is one, else the CPU; an unknown or absent device is a one-line error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    available = ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    try:
        device = torch.device(name)
    except RuntimeError:
        raise GcvimoeError(f"unknown device {name!r}; available here: auto, {', '.join(available)}") from None
    if device.type not in ("cpu", "cuda"):
        raise GcvimoeError(f"device {name!r} is not supported; available here: auto, {', '.join(available)}")
    if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
        raise GcvimoeError(f"device {name!r} is not available on this machine; available here: auto, "
                           f"{', '.join(available)}")
    return device


def init_distributed(device: str = "auto") -> DistInfo:
    """Join the torchrun process group when launched by torchrun (WORLD_SIZE > 1), else describe one process."""
    info = init_distributed_device_so(device=str(resolve_device(device)))
    return DistInfo(
        device=torch.device(info["device"]),
        rank=info["global_rank"],
        local_rank=info["local_rank"],
        world_size=info["world_size"],
    )


def shard_experts(model: nn.Module, info: DistInfo) -> None:
    """Expert parallelism: keep this process's share of every MoE layer's experts (all processes hold the same full
    weights beforehand). Nothing changes for one process."""
    if not info.distributed:
        return
    try:
        shard_experts_(model)
    except ValueError as e:
        raise GcvimoeError(f"expert_parallel: {e}; launch a number of processes that divides the expert count, or "
                           "train without --expert-parallel") from None


def wrap_model(model: nn.Module, info: DistInfo) -> nn.Module:
    """Wrap ``model`` for data-parallel training.

    Replicated experts are all-reduced like every other parameter. Sharded experts (expert parallelism) are left out
    of DDP: each process's experts are its own, and their gradients already hold every process's tokens.
    """
    if not info.distributed:
        return model
    if is_expert_parallel(model):
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
            model, [name for name, param in model.named_parameters() if getattr(param, "is_expert", False)])
    device_ids = [info.device.index] if info.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids)


def _expert_grads(model: nn.Module) -> List[torch.Tensor]:
    return [p.grad for p in model.parameters() if p.grad is not None and getattr(p, "is_expert", False)]


def average_expert_grads(model: nn.Module, info: DistInfo) -> None:
    """Divide the sharded experts' gradients by the process count. Every process's loss is a mean over its own
    batch, and an expert's gradient sums the gradients of every process's tokens, where DDP averages them."""
    for grad in _expert_grads(model):
        grad.div_(info.world_size)


def check_expert_parallel_optimizer(optimizer: torch.optim.Optimizer, name: str) -> None:
    """Refuse an optimiser whose update of one parameter depends on others under expert parallelism: one that clips
    by a gradient norm of its own (timm's LAMB: ``max_grad_norm``) would take the norm of this process's experts only
    and scale the shared weights differently on each process; Adafactor's factored statistics of a stacked ``[e, h]``
    bias average over the experts, so a process holding some of them would compute other updates."""
    reason = None
    if any(group.get("max_grad_norm") for group in optimizer.param_groups):
        reason = "it clips by a gradient norm over this process's parameters only"
    elif "adafactor" in name.lower():
        reason = "its factored statistics of the stacked expert biases average over all experts"
    if reason is not None:
        raise GcvimoeError(f"expert_parallel cannot train with --opt {name}: {reason}; use another optimiser "
                           "(adamw, sgd, ...) with --clip-grad")


def clip_grad_norm_expert_parallel(model: nn.Module, max_norm: float, info: DistInfo) -> torch.Tensor:
    """Clip all gradients by their norm over the whole job: the shared parameters' (equal on every process after the
    DDP all-reduce) and every process's own experts'. A per-process norm would clip the shared parameters by
    different factors on different processes, and their replicas would drift apart. Returns the total norm."""
    grads = [(p.grad, getattr(p, "is_expert", False)) for p in model.parameters() if p.grad is not None]
    expert = [grad for grad, is_expert in grads if is_expert]
    shared = [grad for grad, is_expert in grads if not is_expert]
    zero = torch.zeros((), device=info.device)
    expert_sq = torch.nn.utils.get_total_norm(expert).float() ** 2 if expert else zero
    shared_sq = torch.nn.utils.get_total_norm(shared).float() ** 2 if shared else zero
    total = (shared_sq + all_reduce_sum(expert_sq, info)).sqrt()
    torch.nn.utils.clip_grads_with_norm_(model.parameters(), max_norm, total)
    return total


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


def max_over_processes(value: int, info: DistInfo) -> int:
    """The largest ``value`` of all processes."""
    if not info.distributed:
        return value
    tensor = torch.tensor(value, device=info.device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return int(tensor)


def all_reduce_sum(tensor: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Sum ``tensor`` over all processes (in place) and return it."""
    if info.distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_gather_objects(obj: Any, info: DistInfo) -> List[Any]:
    """Every process's ``obj``, in rank order."""
    if not info.distributed:
        return [obj]
    gathered = [None] * info.world_size
    dist.all_gather_object(gathered, obj)
    return gathered


def barrier(info: DistInfo) -> None:
    if info.distributed:
        dist.barrier()


def cleanup(info: DistInfo) -> None:
    if info.distributed and dist.is_initialized():
        dist.destroy_process_group()
