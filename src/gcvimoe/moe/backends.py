"""Expert backends: how a MoE layer's experts run, registered by name and chosen by one function.

- ``grouped_mm``: the assignments sorted by expert (:func:`~gcvimoe.moe.dispatch.plan_sorted`) and two
  ``F.grouped_mm`` calls between two gathers; no value read on the host and no atomics. The path of a GPU in bf16;
  on the CPU it runs the same op sequence eagerly (fp32 or bf16), which the tests and ``benchmarks/moe_cost.py`` use.
- ``plain``: the kept assignments compacted per expert (:func:`~gcvimoe.moe.dispatch.plan_dispatch`) and one GEMM
  per expert, as custom operators that ``torch.compile`` keeps whole; any device and dtype.
- ``cpu_kernel``: the compacted plan and the chunked CPU kernel of :mod:`gcvimoe.kernels` (eager CPU runs).
- ``triton``: the sorted plan and the fused kernels of :mod:`gcvimoe.moe.fused` (the gather, activation, gate and
  combine inside the GEMMs). Never chosen automatically until a GPU measures it faster end to end; pin it.

Without a choice the layer takes the first backend, in the order above, that is the best for the tokens' device;
``GCVIMOE_EXPERT_PATH=NAME`` in the environment, or :func:`set_expert_path`, pins one, and a pinned backend that
cannot run on the tokens is an error, never a silent fallback.
"""
import os
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple, Union

import torch
from torch import Tensor

from gcvimoe import kernels
from gcvimoe.errors import GcvimoeError, did_you_mean
from gcvimoe.moe.dispatch import DispatchPlan, SortedPlan, plan_dispatch, plan_sorted
from gcvimoe.moe.experts import Experts, _grouped_mm_supported
from gcvimoe.moe.fused import forward_fused, fused_runs_on
from gcvimoe.moe.router import Routing

Plan = Union[DispatchPlan, SortedPlan]
ENV_VARIABLE = 'GCVIMOE_EXPERT_PATH'


@dataclass(frozen=True)
class ExpertBackend:
    """One way to run the experts.

    Attributes:
        run: ``run(experts, tokens [t, d], routing, num_experts, capacity, batch_priority) -> (out [t, d_out], plan)``
            (``num_experts`` over all processes); the plan
            must offer ``requested_per_expert``, ``tokens_per_expert`` and ``kept_per_token(t)`` for the statistics.
        preferred: Whether this backend is the best one for these tokens (picked when nothing is pinned).
        runs_on: Whether it can run these tokens and experts at all (checked when pinned).
        where: Where it runs, for the error when ``runs_on`` says no.
    """
    run: Callable[[Experts, Tensor, Routing, int, Optional[int], bool], Tuple[Tensor, Plan]]
    preferred: Callable[[Tensor, Experts], bool]
    runs_on: Callable[[Tensor, Experts], bool] = lambda tokens, experts: True
    where: str = 'anywhere'


def _run_grouped(experts: Experts, tokens: Tensor, routing: Routing, num_experts: int, capacity: Optional[int],
                 batch_priority: bool) -> Tuple[Tensor, SortedPlan]:
    plan = plan_sorted(routing, num_experts, capacity, batch_priority=batch_priority)
    gates = routing.gates if plan.keep is None else routing.gates * plan.keep
    return experts.forward_sorted(tokens, plan, routing.expert_index, gates), plan


def _run_fused(experts: Experts, tokens: Tensor, routing: Routing, num_experts: int, capacity: Optional[int],
               batch_priority: bool) -> Tuple[Tensor, Plan]:
    plan = plan_sorted(routing, num_experts, capacity, batch_priority=batch_priority)
    if plan.row_token is not None:  # expert choice: a token feeds any number of rows, which the kernels do not sum
        return EXPERT_BACKENDS['plain'].run(experts, tokens, routing, num_experts, capacity, batch_priority)
    return forward_fused(experts, tokens, plan, routing.gates), plan


def _run_compacted(kernel: bool):
    def run(experts: Experts, tokens: Tensor, routing: Routing, num_experts: int, capacity: Optional[int],
            batch_priority: bool) -> Tuple[Tensor, DispatchPlan]:
        plan = plan_dispatch(routing, num_experts, capacity, batch_priority=batch_priority)
        return experts(tokens, plan.tokens_per_expert, plan.token_index, gates=plan.gates, kernel=kernel), plan
    return run


def _grouped_mm_preferred(tokens: Tensor, experts: Experts) -> bool:
    """torch's grouped GEMM kernel runs both expert GEMMs, and the experts all live in this process."""
    return (experts.local_experts_only and _grouped_mm_supported(tokens, experts.fc1_weight)
            and _grouped_mm_supported(tokens, experts.fc2_weight))


def _eager_cpu(tokens: Tensor, experts: Optional[Experts] = None) -> bool:
    return tokens.device.type == 'cpu' and not torch.compiler.is_compiling() and not torch.jit.is_tracing()


EXPERT_BACKENDS: Dict[str, ExpertBackend] = {}
"""Backend name -> :class:`ExpertBackend`, in the order the automatic choice tries them."""


def register_expert_backend(name: str, backend: ExpertBackend) -> ExpertBackend:
    """Add a backend (it can then be pinned by name; it is picked automatically where ``preferred`` says so)."""
    EXPERT_BACKENDS[name] = backend
    return backend


register_expert_backend('grouped_mm', ExpertBackend(_run_grouped, _grouped_mm_preferred,
                                                    runs_on=lambda tokens, experts: experts.local_experts_only,
                                                    where='experts in one process'))
register_expert_backend('cpu_kernel', ExpertBackend(
    _run_compacted(kernel=True), lambda tokens, experts: kernels.enabled('expert_mlp') and _eager_cpu(tokens),
    runs_on=_eager_cpu, where='eager CPU only, experts in one process'))
register_expert_backend('plain', ExpertBackend(_run_compacted(kernel=False), lambda tokens, experts: True))
register_expert_backend('triton', ExpertBackend(
    _run_fused, lambda tokens, experts: False, runs_on=fused_runs_on,
    where='Triton installed, CUDA or TRITON_INTERPRET=1, experts in one process, a GELU activation'))

_pinned: Optional[str] = None


def _check_name(name: str) -> str:
    if name not in EXPERT_BACKENDS:
        hint = did_you_mean(name, EXPERT_BACKENDS, fallback=f"choose from {', '.join(EXPERT_BACKENDS)}")
        raise GcvimoeError(f"unknown expert path {name!r}; {hint}")
    return name


def set_expert_path(name: Optional[str]) -> Optional[str]:
    """Pin the experts' path (``'grouped_mm'``, ``'plain'``, ``'cpu_kernel'`` or a registered name) for every MoE
    layer, or None for the best one per device; overrides ``GCVIMOE_EXPERT_PATH``. Returns the previous pin."""
    global _pinned
    previous = _pinned
    _pinned = None if name is None else _check_name(name)
    return previous


def pinned_expert_path() -> Optional[str]:
    """The pinned path: :func:`set_expert_path`'s, else ``GCVIMOE_EXPERT_PATH``'s, else None."""
    if _pinned is not None:
        return _pinned
    from_env = os.environ.get(ENV_VARIABLE, '').strip()
    return _check_name(from_env) if from_env else None


def choose_expert_backend(tokens: Tensor, experts: Experts) -> ExpertBackend:
    """The pinned backend (an error if it cannot run these tokens), else the first one preferred for them."""
    name = pinned_expert_path()
    if name is not None:
        backend = EXPERT_BACKENDS[name]
        if not backend.runs_on(tokens, experts):
            raise GcvimoeError(f"expert path {name!r} cannot run {tokens.device.type} tokens here ({backend.where}); "
                               f"unset {ENV_VARIABLE} or pick another path")
        return backend
    return next(backend for backend in EXPERT_BACKENDS.values() if backend.preferred(tokens, experts))
