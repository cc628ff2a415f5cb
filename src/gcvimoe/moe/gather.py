"""Dispatch and combine for the grouped-GEMM path: gathers by a permutation, each with a backward of its own.

Autograd's backward of ``index_select`` is an atomic ``index_add`` into zeros; here both directions are gathers by
the plan's permutation and its inverse, so forward and backward are deterministic and write every element once.
Rows are choice-major assignments ``a = choice * t + token`` (``n = t * k``), sorted by expert in the plan.
"""
from typing import Optional, Tuple

import torch
from torch import Tensor


def _sum_choices(rows: Tensor, num_tokens: int) -> Tensor:
    """``[k * t, d]`` choice-major rows -> ``[t, d]``, the sum over each token's choices."""
    if rows.shape[0] == num_tokens:
        return rows
    return rows.view(-1, num_tokens, rows.shape[-1]).sum(0)


class GatherRows(torch.autograd.Function):
    """``rows[r] = [x[token of r], pad]``: the tokens in expert order, with ``pad`` columns appended (a bias column
    for the GEMM that follows) in the same pass."""

    @staticmethod
    def forward(ctx, x: Tensor, row_assignment: Tensor, assignment_row: Tensor, pad: Optional[Tensor]) -> Tensor:
        num_tokens, width = x.shape
        row_token = row_assignment if row_assignment.shape[0] == num_tokens else row_assignment % num_tokens
        if pad is None:
            rows = x.index_select(0, row_token)
        elif torch.compiler.is_compiling():  # inductor fuses the two into one kernel (and traces no out= into a view)
            rows = torch.cat([x.index_select(0, row_token), pad.expand(row_token.shape[0], pad.shape[0])], 1)
        else:  # eager: the gather writes the rows beside their pad, one pass
            rows = x.new_empty(row_token.shape[0], width + pad.shape[0])
            torch.index_select(x, 0, row_token, out=rows[:, :width])
            rows[:, width:].copy_(pad.expand(rows.shape[0], pad.shape[0]))
        ctx.save_for_backward(assignment_row)
        ctx.shape = (num_tokens, width)
        return rows

    @staticmethod
    def backward(ctx, grad_rows: Tensor) -> Tuple[Optional[Tensor], None, None, None]:
        (assignment_row,) = ctx.saved_tensors
        num_tokens, width = ctx.shape
        grad_x = grad_rows[:, :width].index_select(0, assignment_row)
        return _sum_choices(grad_x, num_tokens), None, None, None


class CombineRows(torch.autograd.Function):
    """``y[t] = sum_k gates[a] * (rows[row of a] + bias[expert of a])`` over the assignments ``a`` of token ``t``.

    The bias (fc2's, one row per expert) is the same for every row of an expert, so a token's gated share of it is
    one small product ``(gates one-hot) [t, e] @ bias [e, d]`` added in place, not a pass over the ``[n, d]`` rows.
    """

    @staticmethod
    def forward(ctx, rows: Tensor, gates: Tensor, bias: Optional[Tensor], expert_index: Tensor,
                row_assignment: Tensor, assignment_row: Tensor, num_tokens: int) -> Tensor:
        picked = rows.index_select(0, assignment_row)  # [n, d] in assignment order
        picked.mul_(gates.unsqueeze(1))
        out = _sum_choices(picked, num_tokens)
        token_gates = None
        if bias is not None:
            token_gates = _token_gates(gates, expert_index, num_tokens, bias.shape[0])
            out.addmm_(token_gates, bias)
        ctx.save_for_backward(rows, gates, bias, expert_index, row_assignment, assignment_row, token_gates)
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        rows, gates, bias, expert_index, row_assignment, assignment_row, token_gates = ctx.saved_tensors
        num_tokens = grad_out.shape[0]
        row_token = row_assignment if row_assignment.shape[0] == num_tokens else row_assignment % num_tokens
        grad_rows = grad_out.index_select(0, row_token)  # [n, d] in row order
        grad_gates = grad_bias = None
        if ctx.needs_input_grad[1]:
            per_row = torch.bmm(grad_rows.unsqueeze(1), rows.unsqueeze(2)).view(-1)
            grad_gates = per_row.index_select(0, assignment_row)
            if bias is not None:  # d y[t] / d gate[a] also holds the bias row of a's expert
                grad_gates += _pick(grad_out.mm(bias.t()), expert_index)
        if bias is not None and ctx.needs_input_grad[2]:
            grad_bias = token_gates.t().mm(grad_out)
        grad_rows.mul_(gates.index_select(0, row_assignment).unsqueeze(1))
        return grad_rows, grad_gates, grad_bias, None, None, None, None


def _flat_token_expert(expert_index: Tensor, num_tokens: int, num_experts: int) -> Tensor:
    """``token * e + expert`` of every assignment ``[n]``: its place in a flattened ``[t, e]`` table."""
    tokens = torch.arange(num_tokens, device=expert_index.device)
    return (expert_index.view(-1, num_tokens) + tokens * num_experts).view(-1)


def _pick(table: Tensor, expert_index: Tensor) -> Tensor:
    """``table[token of a, expert of a]`` for every assignment ``a`` ``[n]`` of a ``[t, e]`` table."""
    num_tokens, num_experts = table.shape
    if expert_index.shape[0] == num_tokens:
        return table.gather(1, expert_index.unsqueeze(1)).view(-1)
    return table.view(-1).index_select(0, _flat_token_expert(expert_index, num_tokens, num_experts))


def _token_gates(gates: Tensor, expert_index: Tensor, num_tokens: int, num_experts: int) -> Tensor:
    """``[t, e]``: each token's gate for each expert (0 where it has no assignment). A token's ``k`` experts are
    distinct, so every element is written once."""
    table = gates.new_zeros(num_tokens * num_experts)
    if expert_index.shape[0] == num_tokens:  # one choice: the flat place is token * e + expert
        table.view(num_tokens, num_experts).scatter_(1, expert_index.view(-1, 1), gates.view(-1, 1))
    else:
        table.index_put_((_flat_token_expert(expert_index, num_tokens, num_experts),), gates)
    return table.view(num_tokens, num_experts)
