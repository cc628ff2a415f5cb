"""Dispatch and combine: apply expert capacity, group the kept assignments by expert, and sum expert outputs back.

Nothing here is ``[t, e, c]``: the kept assignments are sorted by expert (a stable argsort, O(n log n) for
``n = t * k`` assignments) so every expert reads one contiguous segment and no padding slot is ever computed. The
CPU expert kernel combines inside its chunks; :func:`combine` serves the grouped-GEMM and expert-parallel paths.
"""
import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from gcvimoe.moe.router import Routing


@dataclass
class DispatchPlan:
    """The assignments that survived capacity, grouped by expert.

    Attributes:
        token_index: Token each kept assignment reads and writes ``[n]``, grouped by expert (expert 0's segment
            first); within a segment assignments keep their slot-claiming order.
        gates: Weight of each kept assignment's expert output ``[n]``.
        tokens_per_expert: Kept assignments per expert ``[e]``, i.e. the segment lengths.
        requested_per_expert: Assignments per expert before capacity ``[e]``.
    """
    token_index: Tensor
    gates: Tensor
    tokens_per_expert: Tensor
    requested_per_expert: Tensor


def count_per_expert(expert_index: Tensor, num_experts: int) -> Tensor:
    """Assignments per expert ``[e]`` of ``expert_index`` ``[n]``; unlike ``bincount`` its shape never depends on the
    data, which keeps it inside one ``torch.compile`` graph."""
    counts = torch.zeros(num_experts, dtype=torch.long, device=expert_index.device)
    return counts.index_add_(0, expert_index, torch.ones_like(expert_index))


def expert_capacity(num_tokens: int, num_experts: int, top_k: int, capacity_factor: float) -> Optional[int]:
    """Slots per expert, Tutel's rule: ``k * int(capacity_factor * ceil(t / e))``; None (no limit) for factor 0."""
    if capacity_factor == 0:
        return None
    return top_k * int(capacity_factor * math.ceil(num_tokens / num_experts))


def plan_dispatch(routing: Routing, num_experts: int, capacity: Optional[int],
                  batch_priority: bool = False) -> DispatchPlan:
    """Keep each expert's first ``capacity`` assignments in claiming order and group the kept ones by expert.

    Args:
        routing: Assignments ``[n]`` in slot-claiming order.
        num_experts: Experts ``e``.
        capacity: Slots per expert, or None for dropless.
        batch_priority: Batch-priority routing (V-MoE): inside each choice, tokens claim slots in descending order of
            their top-1 probability (stable), so the least confident tokens are dropped first. Needs the choice-major
            layout of :func:`gcvimoe.moe.router.top_k_routing`.

    Returns:
        The plan; an assignment that finds its expert full is absent from it.
    """
    expert_index = routing.expert_index
    requested = count_per_expert(expert_index, num_experts)
    if capacity is None or int(requested.max()) <= capacity:  # nothing to drop, so the claiming order is moot
        order = torch.argsort(expert_index, stable=True)
        kept = requested
    else:
        claim_order = torch.arange(expert_index.numel(), device=expert_index.device)
        if batch_priority:
            num_tokens = routing.top1_prob.shape[0]
            token_order = torch.argsort(routing.top1_prob, descending=True, stable=True)
            claim_order = claim_order.view(-1, num_tokens)[:, token_order].reshape(-1)
        order = claim_order[torch.argsort(expert_index[claim_order], stable=True)]  # by expert, claim order inside
        segment_start = requested.cumsum(0) - requested
        slot = torch.arange(order.numel(), device=order.device) - segment_start[expert_index[order]]
        order = order[slot < capacity]
        kept = requested.clamp(max=capacity)
    return DispatchPlan(token_index=routing.token_index[order], gates=routing.gates[order], tokens_per_expert=kept,
                        requested_per_expert=requested)


def combine(expert_out: Tensor, token_index: Tensor, num_tokens: int) -> Tensor:
    """Sum the (already gated) expert outputs of every token; a token without a kept assignment gets zeros.

    Args:
        expert_out: Gated expert outputs ``[n, d]``.
        token_index: Token of each row ``[n]``.
        num_tokens: Tokens ``t``.

    Returns:
        The MoE output ``[t, d]``.
    """
    return expert_out.new_zeros(num_tokens, expert_out.shape[-1]).index_add_(0, token_index, expert_out)
