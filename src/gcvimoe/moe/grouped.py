"""Grouped matrix products over rows sorted by expert, as custom operators that ``torch.compile`` keeps whole.

``rows [n, a]`` hold expert 0's rows first, then expert 1's, ..., ``counts [e]`` of them, and possibly a tail of rows
that belong to no expert (assignments dropped by capacity). :func:`grouped_mm` multiplies each expert's rows by its
weight ``[a, b]`` and returns zeros for the tail. The row counts depend on the routing, so a plain per-expert loop
would need them on the host and break a compiled graph; as custom operators with a fake (shape-only) implementation
the loop stays opaque to the compiler, and every shape around it depends on ``n`` alone. (On a GPU in bf16 the
experts use ``F.grouped_mm`` instead, which needs no host read; see :mod:`gcvimoe.moe.experts`.)
"""
from typing import Optional, Tuple

import torch
from torch import Tensor


def rows_in_groups(counts: Tensor, num_rows: int) -> Tensor:
    """Whether each of ``num_rows`` rows belongs to an expert ``[n]`` (False for the tail)."""
    return torch.arange(num_rows, device=counts.device) < counts.sum()


def group_of_rows(counts: Tensor, num_rows: int) -> Tensor:
    """The expert of each row ``[n]`` (the tail gets the last expert), without host reads or a search op."""
    ends = counts.cumsum(0)
    rows = torch.arange(num_rows, device=counts.device)
    return (rows[:, None] >= ends[None, :]).sum(1).clamp(max=counts.shape[0] - 1)


@torch.library.custom_op("gcvimoe::grouped_mm", mutates_args=())
def grouped_mm(rows: Tensor, weight: Tensor, counts: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """``out[r] = rows[r] @ weight[expert of r] + bias[expert of r]`` for the rows of each expert, zeros for the tail.

    The bias is added inside each expert's GEMM (``addmm``), as a dense ``Linear`` adds its bias, instead of in a
    pass over the ``[n, b]`` output.

    Args:
        rows: ``[n, a]``, grouped by expert.
        weight: ``[e, a, b]``.
        counts: Rows per expert ``[e]``.
        bias: ``[e, b]`` or None.

    Returns:
        ``[n, b]``.
    """
    out = rows.new_empty(rows.shape[0], weight.shape[-1])
    start = 0
    for expert, count in enumerate(counts.tolist()):
        if count:
            if bias is None:
                torch.mm(rows[start:start + count], weight[expert], out=out[start:start + count])
            else:
                torch.addmm(bias[expert], rows[start:start + count], weight[expert], out=out[start:start + count])
        start += count
    out[start:].zero_()
    return out


@grouped_mm.register_fake
def _(rows: Tensor, weight: Tensor, counts: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    return rows.new_empty(rows.shape[0], weight.shape[-1])


@torch.library.custom_op("gcvimoe::grouped_mm_weight_grad", mutates_args=())
def grouped_mm_weight_grad(rows: Tensor, grad: Tensor, counts: Tensor, num_groups: int) -> Tensor:
    """``out[e] = rows_e^T @ grad_e`` over the rows of each expert ``e``: the weight gradient of :func:`grouped_mm`.

    Returns:
        ``[e, a, b]`` for rows ``[n, a]`` and grad ``[n, b]`` (zeros for an expert without rows).
    """
    out = rows.new_empty(num_groups, rows.shape[1], grad.shape[1])
    start = 0
    for expert, count in enumerate(counts.tolist()):
        if count:
            torch.mm(rows[start:start + count].t(), grad[start:start + count], out=out[expert])
        else:
            out[expert].zero_()
        start += count
    return out


@grouped_mm_weight_grad.register_fake
def _(rows: Tensor, grad: Tensor, counts: Tensor, num_groups: int) -> Tensor:
    return rows.new_empty(num_groups, rows.shape[1], grad.shape[1])


@torch.library.custom_op("gcvimoe::grouped_sum", mutates_args=())
def grouped_sum(grad: Tensor, counts: Tensor, num_groups: int) -> Tensor:
    """``out[e] = grad_e.sum(0)`` over the rows of each expert ``e``: the bias gradient of :func:`grouped_mm`, summed
    in fp32 for half-precision rows.

    Returns:
        ``[e, b]`` for grad ``[n, b]`` (zeros for an expert without rows).
    """
    out = grad.new_zeros(num_groups, grad.shape[1], dtype=torch.promote_types(grad.dtype, torch.float32))
    start = 0
    for expert, count in enumerate(counts.tolist()):
        if count:
            torch.sum(grad[start:start + count], 0, dtype=out.dtype, out=out[expert])
        start += count
    return out


@grouped_sum.register_fake
def _(grad: Tensor, counts: Tensor, num_groups: int) -> Tensor:
    return grad.new_empty(num_groups, grad.shape[1], dtype=torch.promote_types(grad.dtype, torch.float32))


def _setup_context(ctx, inputs: Tuple[Tensor, Tensor, Tensor, Optional[Tensor]], output: Tensor) -> None:
    rows, weight, counts, bias = inputs
    ctx.save_for_backward(rows, weight, counts)
    ctx.bias_dtype = None if bias is None else bias.dtype


def _backward(ctx, grad: Tensor) -> Tuple[Optional[Tensor], Optional[Tensor], None, Optional[Tensor]]:
    rows, weight, counts = ctx.saved_tensors
    grad = grad.contiguous()
    grad_rows = grad_weight = grad_bias = None
    if ctx.needs_input_grad[0]:
        grad_rows = grouped_mm(grad, weight.transpose(-2, -1), counts)  # a transposed view: the GEMM reads it as is
    if ctx.needs_input_grad[1]:
        grad_weight = grouped_mm_weight_grad(rows, grad, counts, weight.shape[0])
    if ctx.bias_dtype is not None and ctx.needs_input_grad[3]:  # (no bias: only three inputs are tracked)
        grad_bias = grouped_sum(grad, counts, weight.shape[0]).to(ctx.bias_dtype)
    return grad_rows, grad_weight, None, grad_bias


grouped_mm.register_autograd(_backward, setup_context=_setup_context)
