"""Dispatch and combine: apply expert capacity, group the kept assignments by expert, and sum expert outputs back.

Nothing here is ``[t, e, c]``: the assignments are sorted by expert (a stable argsort, O(n log n) for ``n = t * k``
assignments) so every expert reads one contiguous segment and no padding slot is ever computed; the ones capacity
drops follow in a tail with gate 0. Shapes depend on ``(t, e, k)`` alone and nothing waits for the device. The CPU
expert kernel combines inside its chunks; :func:`combine` serves the other paths.
"""
import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from gcvimoe.moe.router import Routing


@dataclass
class DispatchPlan:
    """Every assignment, grouped by expert, those that capacity dropped in a tail after the last expert's rows.

    Every shape depends only on ``(t, e, k)``, never on the routing, and no value is read on the host, so the plan
    runs inside one ``torch.compile`` graph and on a GPU without waiting for it.

    Attributes:
        token_index: Token each assignment reads and writes ``[n]``: expert 0's kept rows first, ..., then the
            dropped rows; within a segment assignments keep their slot-claiming order.
        gates: Weight of each assignment's expert output ``[n]``, 0 for a dropped one.
        tokens_per_expert: Kept assignments per expert ``[e]``, i.e. the segment lengths.
        requested_per_expert: Assignments per expert before capacity ``[e]``.
        kept: Whether each row of ``token_index`` is computed ``[n]`` (the first ``tokens_per_expert.sum()`` rows).
    """
    token_index: Tensor
    gates: Tensor
    tokens_per_expert: Tensor
    requested_per_expert: Tensor
    kept: Tensor


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
        The plan: all ``n`` assignments, a dropped one moved to the tail with gate 0.
    """
    expert_index = routing.expert_index
    num_assignments = expert_index.numel()
    requested = count_per_expert(expert_index, num_experts)
    rows = torch.arange(num_assignments, device=expert_index.device)
    if capacity is None:
        order = torch.argsort(expert_index, stable=True)
        kept = requested
        keep = torch.ones(num_assignments, dtype=torch.bool, device=expert_index.device)
    else:
        claim_order = rows
        num_tokens = routing.top1_prob.shape[0]
        if batch_priority and num_tokens:
            token_order = torch.argsort(routing.top1_prob, descending=True, stable=True)
            claim_order = claim_order.view(-1, num_tokens)[:, token_order].reshape(-1)
        by_expert = claim_order[torch.argsort(expert_index[claim_order], stable=True)]  # claim order inside
        experts = expert_index[by_expert]
        slot = rows - (requested.cumsum(0) - requested)[experts]
        kept = requested.clamp(max=capacity)
        # where each assignment goes: a kept one to its slot in its expert's (shortened) segment, a dropped one to
        # the tail in claiming order; a scatter of positions, so no second sort
        dropped = slot >= capacity
        kept_start = kept.cumsum(0) - kept
        num_kept = kept.sum()
        tail_position = num_kept + dropped.cumsum(0) - 1
        destination = torch.where(dropped, tail_position, kept_start[experts] + slot)
        order = torch.empty_like(by_expert).scatter_(0, destination, by_expert)
        keep = rows < num_kept
    gates = torch.where(keep, routing.gates[order], 0.)
    return DispatchPlan(token_index=routing.token_index[order], gates=gates, tokens_per_expert=kept,
                        requested_per_expert=requested, kept=keep)


def combine(expert_out: Tensor, token_index: Tensor, num_tokens: int, start: Optional[Tensor] = None) -> Tensor:
    """Sum the (already gated) expert outputs of every token; a token without a kept assignment gets zeros.

    Args:
        expert_out: Gated expert outputs ``[n, d]``.
        token_index: Token of each row ``[n]``.
        num_tokens: Tokens ``t``.
        start: What the sums start from ``[t, d]`` instead of zeros (it is added to, not modified).

    Returns:
        The MoE output ``[t, d]``.
    """
    if start is None:
        return expert_out.new_zeros(num_tokens, expert_out.shape[-1]).index_add_(0, token_index, expert_out)
    return start.to(expert_out.dtype).index_add(0, token_index, expert_out)
