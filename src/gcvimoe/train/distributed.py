"""Everything that knows about several processes: the process group from torchrun, its heartbeat, the DDP wrapper,
the expert-parallel gradients and the reductions.

Launch lines::

    gcvimoe train -c digits                                      # one process
    torchrun --nproc_per_node 4 -m gcvimoe train -c gcvimoe_tiny  # one node, 4 processes
    torchrun --nnodes 2 --node_rank R --master_addr HOST --nproc_per_node 8 -m gcvimoe train ...  # two nodes

    torchrun --nproc_per_node 4 -m gcvimoe train -c gcvimoe_tiny --expert-parallel  # DDP + EP

torchrun sets RANK, LOCAL_RANK and WORLD_SIZE; the backend is NCCL on GPUs and gloo on CPU.

With expert parallelism every process keeps ``e / w`` experts of each MoE layer (:mod:`gcvimoe.moe.parallel`); DDP
then reduces the other parameters only, the expert gradients are averaged here as DDP averages the rest, and gradient
clipping uses the norm over the whole job. Checkpoints load on any number of processes
(:mod:`gcvimoe.train.sharded_checkpoints`).

A frozen or lost process never hangs the job (:class:`Heartbeat`): every collective waits ``dist_timeout`` at most,
and each process watches the next one's heartbeat in the rendezvous store, so the job ends within the timeout with
one line naming the process that stopped (exit code :data:`EXIT_LOST_PROCESS`).
"""
import datetime
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, List, Optional

import torch
import torch.distributed as dist
from timm.utils.distributed import is_distributed_env, world_info_from_env
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from gcvimoe.errors import GcvimoeError, first_line
from gcvimoe.moe.parallel import is_expert_parallel, shard_experts_
from gcvimoe.train.device import resolve_device

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
    text = first_line(error)
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
