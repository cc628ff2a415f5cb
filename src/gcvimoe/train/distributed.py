"""Everything that knows about several processes: process-group setup from torchrun, the DDP wrapper, reductions.

Launch lines::

    gcvimoe train -c digits                                      # one process
    torchrun --nproc_per_node 4 -m gcvimoe train -c gcvimoe_tiny  # one node, 4 processes
    torchrun --nnodes 2 --node_rank R --master_addr HOST --nproc_per_node 8 -m gcvimoe train ...  # two nodes

    torchrun --nproc_per_node 4 -m gcvimoe train -c gcvimoe_tiny --expert-parallel  # DDP + EP

torchrun sets RANK, LOCAL_RANK and WORLD_SIZE; the backend is NCCL on GPUs and gloo on CPU.

With expert parallelism every process keeps ``e / w`` experts of each MoE layer (:mod:`gcvimoe.moe.parallel`); DDP
then reduces the other parameters only, the expert gradients are averaged here as DDP averages the rest, and gradient
clipping uses the norm over the whole job. Checkpoints load on any number of processes: a sharded one
(:func:`save_sharded`, ``torch.distributed.checkpoint``) has every process write its own experts and optimiser state
and read back the share of its new place, a file one (:func:`full_state`) gathers every expert to the first process.

A frozen or lost process never hangs the job (:class:`Heartbeat`): every collective waits ``dist_timeout`` at most,
and each process watches the next one's heartbeat in the rendezvous store, so the job ends within the timeout with
one line naming the process that stopped (exit code :data:`EXIT_LOST_PROCESS`).
"""
import datetime
import functools
import os
import sys
import threading
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from timm.utils.distributed import is_distributed_env, world_info_from_env
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from gcvimoe.errors import GcvimoeError
from gcvimoe.train.device import resolve_device
from gcvimoe.files import atomic_dir, temporary_path
from gcvimoe.models.sharded import TRAINING_FILE, SafeFileSystemReader, tensor_index
from gcvimoe.moe.parallel import (
    EXPERT_PARAM_NAMES, gather_expert_optimizer_state, gather_expert_state_dict, is_expert_parallel,
    shard_expert_optimizer_state, shard_expert_state_dict, shard_experts_,
)

EXIT_LOST_PROCESS = 3
"""Exit code of a process that ends the job because another stopped responding or a collective timed out."""


class LostProcessError(GcvimoeError):
    """Another process stopped responding, or a collective waited ``dist_timeout`` for the others."""
    exit_code = EXIT_LOST_PROCESS


@dataclass
class DistInfo:
    """This process's place in the job."""
    device: torch.device
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    heartbeat: Optional['Heartbeat'] = field(default=None, repr=False, compare=False)

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_primary(self) -> bool:
        return self.rank == 0


def init_distributed(device: str = "auto", timeout: float = 600.0) -> DistInfo:
    """Join the torchrun (or SLURM) process group when launched by one (WORLD_SIZE > 1), else describe one process.

    As timm's ``init_distributed_device_so`` (NCCL on GPUs, gloo otherwise; GPU ``LOCAL_RANK`` for each process), plus
    a collective timeout of ``timeout`` seconds and a :class:`Heartbeat` in the rendezvous store.
    """
    resolved = resolve_device(device)
    if not is_distributed_env():
        return DistInfo(device=resolved)
    local_rank, rank, world_size = world_info_from_env()
    os.environ.update(LOCAL_RANK=str(local_rank), RANK=str(rank), WORLD_SIZE=str(world_size))  # SLURM's too
    if resolved.type == "cuda":
        resolved = torch.device("cuda", local_rank)
        torch.cuda.set_device(resolved)
    wait = datetime.timedelta(seconds=timeout)
    store, rank, world_size = next(dist.rendezvous("env://", rank, world_size, timeout=wait))
    store.set_timeout(wait)
    # the prefix init_process_group gives the store itself, so that the keys match a timm-initialised job's
    dist.init_process_group("nccl" if resolved.type == "cuda" else "gloo", store=dist.PrefixStore("default_pg", store),
                            rank=rank, world_size=world_size, timeout=wait)
    heartbeat = Heartbeat(dist.PrefixStore("gcvimoe/heartbeat", store), rank, world_size, timeout)
    heartbeat.start()
    return DistInfo(device=resolved, rank=rank, local_rank=local_rank, world_size=world_size, heartbeat=heartbeat)


class Heartbeat:
    """Every process bumps a counter in the rendezvous store from a daemon thread, and watches the next process's
    (rank ``r`` watches ``r + 1 mod w``, so each is watched once and the store sees ``2 w`` small requests per beat).

    A counter that stays still for 80 % of ``timeout`` means a stopped, frozen or lost process: the watcher prints
    one line naming it and ends its own process with :data:`EXIT_LOST_PROCESS` (torchrun then stops the others),
    within ``timeout``, before any collective times out. Only the watcher's own clock is read, so clocks that differ
    between machines do not matter. A process that leaves normally marks its counter done first.
    """
    DONE = "done"

    def __init__(self, store: dist.Store, rank: int, world_size: int, timeout: float):
        self.store, self.rank, self.world_size, self.timeout = store, rank, world_size, timeout
        self.watched = (rank + 1) % world_size
        self.interval = min(max(timeout / 10, 0.1), 30.0)
        self.stale_after = 0.8 * timeout
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="gcvimoe-heartbeat", daemon=True)
        self.beats = 0

    def start(self) -> None:
        self.store.set(str(self.rank), "0")
        self._thread.start()

    def stop(self) -> None:
        """Stop beating and watching; the counter says done, so that the watcher does not take this for a loss."""
        self._stop.set()
        self._thread.join(timeout=self.interval + self.timeout)
        try:
            self.store.set(str(self.rank), self.DONE)
        except (RuntimeError, dist.DistError):  # the store's host has already left: nobody is watching
            pass

    def _run(self) -> None:
        seen, seen_at, answered_at = None, time.monotonic(), time.monotonic()
        while not self._stop.wait(self.interval):
            try:
                self.beats += 1
                self.store.set(str(self.rank), str(self.beats))
                key = str(self.watched)
                value = self.store.get(key).decode() if self.store.check([key]) else None
                answered_at = time.monotonic()
            except (RuntimeError, dist.DistError):
                if time.monotonic() - answered_at > self.stale_after:
                    self._end(f"the rendezvous store (MASTER_ADDR {os.environ.get('MASTER_ADDR', '?')}) stopped "
                              f"answering for {self._seconds(time.monotonic() - answered_at)}: the process hosting it "
                              f"(torchrun's agent or rank 0) is stopped, frozen or lost")
                continue
            if value == self.DONE or self._stop.is_set():
                return
            if value != seen:
                seen, seen_at = value, time.monotonic()
            elif time.monotonic() - seen_at > self.stale_after:
                self._end(f"process {self.watched} of {self.world_size} (rank {self.watched}) has given no sign of "
                          f"life for {self._seconds(time.monotonic() - seen_at)}: it is stopped, frozen or its machine "
                          f"is lost")

    @staticmethod
    def _seconds(seconds: float) -> str:
        return f"{seconds:.0f} s"

    def _end(self, problem: str) -> None:
        print(f"error: {problem}; ending the job (--dist-timeout {self._seconds(self.timeout)}); restart it with "
              f"--resume auto", file=sys.stderr, flush=True)
        os._exit(EXIT_LOST_PROCESS)


_BACKEND_FAILURES = ("gloo", "NCCL", "c10d", "Timed out waiting", "Connection closed by peer",
                     "Connection reset by peer")


def is_collective_failure(error: BaseException, info: DistInfo) -> bool:
    """Whether ``error`` is a collective's failure (torch raises DistError, or gloo's RuntimeError) in a job."""
    return info.distributed and (isinstance(error, dist.DistError) or (
        isinstance(error, RuntimeError) and any(text in str(error) for text in _BACKEND_FAILURES)))


def collective_failure(error: BaseException, info: DistInfo) -> LostProcessError:
    """One line for a collective that failed or timed out (the error of torch's backend, as a LostProcessError)."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    text = text.split("] ", 1)[-1] if text.startswith("[") else text  # gloo starts with its source file
    timeout = f" (--dist-timeout {info.heartbeat.timeout:.0f} s)" if info.heartbeat is not None else ""
    return LostProcessError(f"a collective of process {info.rank} of {info.world_size} failed{timeout}: {text[:200]}; "
                            f"another process left, stopped or waits in a different collective; restart the job with "
                            f"--resume auto")


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
        text = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise GcvimoeError(f"cannot load the sharded checkpoint {folder} into this model ({text}); resume with "
                           f"the run's own config") from None
    model.load_state_dict(_part(targets, "state_dict."))
    if ema_model is not None:
        ema_model.load_state_dict(_part(targets, "ema_state_dict.") if saved_ema else model.state_dict())
    if optimizer is not None:
        state = {position: {**optimizer_rest["state"].get(position, {}),
                            **{key: _local(value) for key, value in tensors.items()}}
                 for position, tensors in optimizer_targets.items()}
        optimizer.load_state_dict({"state": state, "param_groups": optimizer_rest["param_groups"]})


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
    if info.heartbeat is not None:
        info.heartbeat.stop()
        info.heartbeat = None
    if info.distributed and dist.is_initialized():
        dist.destroy_process_group()
