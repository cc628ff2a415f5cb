"""Dispatch and combine: apply expert capacity, group the kept assignments by expert, and sum expert outputs back.

Nothing here is ``[t, e, c]``: the assignments are sorted by expert (a stable argsort, O(n log n) for ``n = t * k``
assignments) so every expert reads one contiguous segment and no padding slot is ever computed; the ones capacity
drops follow in a tail with gate 0. Shapes depend on ``(t, e, k)`` alone and nothing waits for the device. The CPU
expert kernel combines inside its chunks; :func:`combine` serves the other paths.
"""
import functools
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

    def first_choices(self) -> Tensor:
        """Assignments per expert before capacity ``[e]``: each expert's first choices when ``k = 1``."""
        return self.requested_per_expert

    def kept_per_token(self, num_tokens: int) -> Tensor:
        """Computed assignments of every token ``[t]`` (a scatter of counts: no data-dependent shape)."""
        counts = torch.zeros(num_tokens, dtype=torch.long, device=self.kept.device)
        return counts.index_add_(0, self.token_index, self.kept.long())


def count_per_expert(expert_index: Tensor, num_experts: int) -> Tensor:
    """Assignments per expert ``[e]`` of ``expert_index`` ``[n]``: a sum over a one-hot ``[n, e]`` comparison, so no
    atomics (the count is the same in every run) and, unlike ``bincount``, a shape that never depends on the data,
    which keeps it inside one ``torch.compile`` graph."""
    experts = torch.arange(num_experts, device=expert_index.device)
    return (expert_index.unsqueeze(1) == experts).sum(0)


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


@dataclass
class SortedPlan:
    """Every assignment sorted by expert, none moved out: the plan of the grouped-GEMM path.

    A grouped GEMM computes every row it is given, so a dropped assignment costs the same wherever it sits; it stays
    in its expert's group and its gate is zeroed. The plan is one sort, one search and one scatter, with no atomics
    and no value read on the host, so its results are deterministic and it compiles into one graph.

    Attributes:
        row_assignment: Assignment computed by each row ``[n]`` (choice-major, ``a = choice * t + token``), grouped
            by expert, in slot-claiming order inside a group.
        assignment_row: Row of each assignment ``[n]``: the inverse permutation.
        bounds: First row of each expert's group, then ``n`` ``[e + 1]`` (int32; ``bounds[1:]`` are the grouped GEMM's
            offsets).
        keep: Whether each assignment is within its expert's capacity ``[n]``, or None when nothing is dropped.
        capacity: Slots per expert, or None for dropless.
        row_token: Token of each row ``[n]`` when assignments are not choice-major (expert choice: a token may have
            any number of them), else None.
    """
    row_assignment: Tensor
    assignment_row: Tensor
    bounds: Tensor
    keep: Optional[Tensor]
    capacity: Optional[int]
    row_token: Optional[Tensor] = None

    @property
    def requested_per_expert(self) -> Tensor:
        """Assignments per expert before capacity ``[e]``."""
        return (self.bounds[1:] - self.bounds[:-1]).long()

    @property
    def tokens_per_expert(self) -> Tensor:
        """Assignments per expert kept by capacity ``[e]``."""
        requested = self.requested_per_expert
        return requested if self.capacity is None else requested.clamp(max=self.capacity)

    def first_choices(self) -> Tensor:
        """Assignments per expert before capacity ``[e]`` in the plan's own integer type (one subtraction)."""
        return self.bounds[1:] - self.bounds[:-1]

    def kept_per_token(self, num_tokens: int) -> Tensor:
        """Computed assignments of every token ``[t]``."""
        if self.row_token is not None:
            counts = torch.zeros(num_tokens, dtype=torch.long, device=self.row_token.device)
            return counts.index_add_(0, self.row_token, torch.ones_like(self.row_token))
        if self.keep is None:
            return torch.full((num_tokens,), self.row_assignment.shape[0] // max(num_tokens, 1),
                              device=self.row_assignment.device)
        return self.keep.view(-1, num_tokens).sum(0)


def _row_numbers(num_rows: int, device: torch.device) -> Tensor:
    """``arange(n)``: eagerly made once per size and device (a constant of every step with ``n`` assignments)."""
    if torch.compiler.is_compiling():  # a graph makes its own constants
        return torch.arange(num_rows, device=device)
    return _cached_row_numbers(num_rows, device)


@functools.lru_cache(maxsize=16)
def _cached_row_numbers(num_rows: int, device: torch.device) -> Tensor:
    with torch.inference_mode(False), torch.no_grad():
        return torch.arange(num_rows, device=device)


def plan_sorted(routing: Routing, num_experts: int, capacity: Optional[int],
                batch_priority: bool = False) -> SortedPlan:
    """Sort the assignments by expert in slot-claiming order and mark those within capacity.

    Claiming order is the assignment order (choice-major), or with batch priority the order of descending top-1
    probability inside each choice; one stable sort over a key that encodes (expert, choice, -priority) gives it.
    The key is exact in fp64: a probability has 24 significant bits, the group number at most 31.

    Args:
        routing: Assignments ``[n]`` in choice-major order (token choice) or already grouped (expert choice).
        num_experts: Experts ``e``.
        capacity: Slots per expert, or None for dropless.
        batch_priority: Batch-priority routing, as :func:`plan_dispatch`.
    """
    expert_index = routing.expert_index
    num_assignments = expert_index.numel()
    num_tokens = routing.top1_prob.shape[0]
    device = expert_index.device
    if batch_priority and capacity is not None and num_tokens:
        top_k = num_assignments // num_tokens
        group, priority = expert_index, routing.top1_prob.double()
        if top_k > 1:
            group = expert_index * top_k + torch.arange(num_assignments, device=device) // num_tokens
            priority = priority.repeat(top_k)
        # group g's keys lie in [g - 1, g - 1/e]: sorted by group, then by descending priority
        key = group - priority
        margin = 1 + 0.5 / num_experts
        boundaries = torch.linspace(-margin, num_experts * top_k - margin, num_experts + 1, dtype=torch.float64,
                                    device=device)
    else:
        key = expert_index
        boundaries = torch.arange(num_experts + 1, device=device)
    sorted_key, row_assignment = torch.sort(key, stable=True)
    bounds = torch.searchsorted(sorted_key, boundaries, out_int32=True)
    assignment_row = torch.empty_like(row_assignment).scatter_(0, row_assignment,
                                                               _row_numbers(num_assignments, device))
    keep = None
    if capacity is not None:
        keep = assignment_row < (bounds[:-1] + capacity)[expert_index]
    row_token = None
    if routing.explicit_token_index is not None:
        row_token = routing.explicit_token_index[row_assignment]
    return SortedPlan(row_assignment=row_assignment, assignment_row=assignment_row, bounds=bounds, keep=keep,
                      capacity=capacity, row_token=row_token)
