"""Everything that knows about several processes: process-group setup from torchrun, the DDP wrapper, reductions.

Launch lines::

    gcvimoe train -c configs/digits.yaml                                      # one process
    torchrun --nproc_per_node 4 -m gcvimoe train -c configs/gcvimoe_tiny.yaml  # one node, 4 processes
    torchrun --nnodes 2 --node_rank R --master_addr HOST --nproc_per_node 8 -m gcvimoe train ...  # two nodes

torchrun sets RANK, LOCAL_RANK and WORLD_SIZE; the backend is NCCL on GPUs and gloo on CPU.
"""
from dataclasses import dataclass
from typing import Any, List

import torch
import torch.distributed as dist
from timm.utils.distributed import init_distributed_device_so
from torch import nn
from torch.nn.parallel import DistributedDataParallel


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


def resolve_device(name: str) -> str:
    """'auto' is the GPU when there is one, else the CPU."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def init_distributed(device: str = "auto") -> DistInfo:
    """Join the torchrun process group when launched by torchrun (WORLD_SIZE > 1), else describe one process."""
    info = init_distributed_device_so(device=resolve_device(device))
    return DistInfo(
        device=torch.device(info["device"]),
        rank=info["global_rank"],
        local_rank=info["local_rank"],
        world_size=info["world_size"],
    )


def wrap_model(model: nn.Module, info: DistInfo) -> nn.Module:
    """Wrap ``model`` for data-parallel training.

    Expert parameters (``p.is_expert``) are plain replicated parameters here, all-reduced like the rest: each process
    holds every expert. This is the one place that would change for expert parallelism.
    """
    if not info.distributed:
        return model
    device_ids = [info.device.index] if info.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids)


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
