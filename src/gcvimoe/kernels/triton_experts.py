"""Triton kernels for the experts of the sorted plan: gathers, biases, activation and gates fused into the GEMMs.

The ``grouped_mm`` path spends its passes over ``[t, d]`` and ``[n, h]`` beside the two GEMMs: the gather of the
rows, the activation, the combine, the gate and bias products, and their gradients. Here each GEMM reads its rows
where they are (a token's row by the plan's permutation) and writes its result where it belongs, with the bias,
the activation and the gate in its epilogue (as ScatterMoE and MegaBlocks do):

- :func:`rows_gemm`: ``out[dest(r)] = epilogue(A[src(r)] @ W[e(r)])``, the forward GEMMs and the input gradient;
- :func:`rows_gemm_gate_grad`: fc2's input gradient, through the activation, and the gates' gradient in one pass;
- :func:`expert_weight_grad`: ``dW[e] = sum over e's rows of A[src(r)]^T B[src(r)]``, and the bias gradient.

Rows are the plan's: row ``r`` computes assignment ``row_assignment[r]`` (choice-major ``a = choice * t + token``),
rows of expert ``e`` span ``bounds[e]:bounds[e + 1]``. A kernel program takes one tile of one expert's rows; the
tiles are found from ``bounds`` inside the kernel, so nothing is read on the host and the launch grid depends on
the shapes alone. Every output element is written once (no atomics): a step is deterministic.

Each kernel is a ``torch.library`` custom operator (one launch to a dispatch counter, opaque to ``torch.compile``)
with a shape-only implementation for ``meta`` tensors. Triton runs them on CUDA, or on the CPU with
``TRITON_INTERPRET=1`` (set before this module is imported), which the tests use.
"""
# ruff: noqa: PLR0913  (a kernel or operator takes every pointer, size, stride and mode it needs as one argument)
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

BLOCK_ROWS = 64
BLOCK_COLS = 64
BLOCK_INNER = 32

# how a GEMM's rows find their input row and their output row
ROW = 0         # row r itself (a row-ordered [n, *] tensor)
TOKEN = 1       # the token of row r's assignment, row_assignment[r] % t
ASSIGNMENT = 2  # row r's assignment, row_assignment[r]

ACTIVATIONS = {'none': 0, 'gelu': 1, 'gelu_tanh': 2}


@triton.jit
def _tile_rows(pid, bounds_ptr, NUM_EXPERTS: tl.constexpr, BLOCK_M: tl.constexpr):
    """``(expert, rows [BLOCK_M], row mask)`` of tile ``pid``; all rows masked for a program past the last tile (the
    grid has room for one partial tile per expert)."""
    tile_start = 0
    row_start = -1
    row_end = 0
    expert = 0
    for e in range(NUM_EXPERTS):
        lo = tl.load(bounds_ptr + e)
        hi = tl.load(bounds_ptr + e + 1)
        tiles = (hi - lo + BLOCK_M - 1) // BLOCK_M
        hit = (pid >= tile_start) & (pid < tile_start + tiles)
        row_start = tl.where(hit, lo + (pid - tile_start) * BLOCK_M, row_start)
        row_end = tl.where(hit, hi, row_end)
        expert = tl.where(hit, e, expert)
        tile_start += tiles
    rows = row_start + tl.arange(0, BLOCK_M)
    return expert, rows, (rows < row_end) & (row_start >= 0)


@triton.jit
def _map_rows(rows, mask, assignment_ptr, num_tokens, MODE: tl.constexpr):
    """Rows ``[BLOCK]`` -> the rows they address under ``MODE`` (:data:`ROW`, :data:`TOKEN`, :data:`ASSIGNMENT`)."""
    if MODE == 0:
        return rows
    assignment = tl.load(assignment_ptr + rows, mask=mask, other=0)
    if MODE == 1:
        return assignment % num_tokens
    return assignment


@triton.jit
def _activate(x, ACTIVATION: tl.constexpr):
    if ACTIVATION == 1:
        return 0.5 * x * (1. + tl.erf(x * 0.7071067811865476))
    if ACTIVATION == 2:
        inner = 0.7978845608028654 * (x + 0.044715 * x * x * x)
        return 0.5 * x * (1. + (2. * tl.sigmoid(2. * inner) - 1.))
    return x


@triton.jit
def _activation_grad(x, ACTIVATION: tl.constexpr):
    if ACTIVATION == 1:
        return 0.5 * (1. + tl.erf(x * 0.7071067811865476)) + x * 0.3989422804014327 * tl.exp(-0.5 * x * x)
    if ACTIVATION == 2:
        inner = 0.7978845608028654 * (x + 0.044715 * x * x * x)
        tanh = 2. * tl.sigmoid(2. * inner) - 1.
        return 0.5 * (1. + tanh) + 0.5 * x * (1. - tanh * tanh) * 0.7978845608028654 * (1. + 0.134145 * x * x)
    return 1.


@triton.jit
def _kept_gates(rows, row_mask, row_start_of_expert, gate_ptr, assignment_ptr, capacity):
    """The gate of each row's assignment ``[BLOCK]`` in fp32, 0 past its expert's capacity (``capacity`` < 0: none)."""
    assignment = tl.load(assignment_ptr + rows, mask=row_mask, other=0)
    gate = tl.load(gate_ptr + assignment, mask=row_mask, other=0.).to(tl.float32)
    if capacity >= 0:
        gate = tl.where(rows < row_start_of_expert + capacity, gate, 0.)
    return gate


@triton.jit
def _rows_times_weight(acc, a_ptr, a_rows, stride_a, row_mask, w_base, stride_wk, stride_wn, cols_n, col_mask, inner,
                       IEEE: tl.constexpr, BLOCK_K: tl.constexpr):
    """``acc + a[a_rows] @ w[:, cols_n]`` for one tile, in fp32: the rows gathered as the tile reads them. The caller
    makes ``acc`` (Triton's interpreter cannot run ``tl.zeros``, itself jitted, from a nested function)."""
    for k0 in range(0, inner, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_mask = ks < inner
        a = tl.load(a_ptr + a_rows[:, None] * stride_a + ks[None, :], mask=row_mask[:, None] & k_mask[None, :],
                    other=0.)
        w = tl.load(w_base + ks[:, None] * stride_wk + cols_n[None, :] * stride_wn,
                    mask=k_mask[:, None] & col_mask[None, :], other=0.)
        if IEEE:
            acc += tl.dot(a, w, input_precision="ieee")
        else:
            acc += tl.dot(a, w)
    return acc


@triton.jit
def _rows_gemm_kernel(a_ptr, w_ptr, bias_ptr, gate_ptr, out_ptr, pre_ptr, assignment_ptr, bounds_ptr,
                      num_tokens, inner, cols, stride_a, stride_we, stride_wk, stride_wn, stride_out, capacity,
                      NUM_EXPERTS: tl.constexpr, A_MODE: tl.constexpr, OUT_MODE: tl.constexpr,
                      HAS_BIAS: tl.constexpr, HAS_GATE: tl.constexpr, ACTIVATION: tl.constexpr,
                      STORE_PRE: tl.constexpr, IEEE: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    expert, rows, row_mask = _tile_rows(tl.program_id(0), bounds_ptr, NUM_EXPERTS, BLOCK_M)
    a_rows = _map_rows(rows, row_mask, assignment_ptr, num_tokens, A_MODE).to(tl.int64)
    cols_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols_n < cols
    acc = _rows_times_weight(tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), a_ptr, a_rows, stride_a, row_mask,
                             w_ptr + expert.to(tl.int64) * stride_we, stride_wk, stride_wn, cols_n, col_mask, inner,
                             IEEE, BLOCK_K)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + expert * cols + cols_n, mask=col_mask, other=0.).to(tl.float32)[None, :]
    mask = row_mask[:, None] & col_mask[None, :]
    out_rows = _map_rows(rows, row_mask, assignment_ptr, num_tokens, OUT_MODE).to(tl.int64)
    if STORE_PRE:
        tl.store(pre_ptr + rows.to(tl.int64)[:, None] * stride_out + cols_n[None, :],
                 acc.to(pre_ptr.dtype.element_ty), mask=mask)
    acc = _activate(acc, ACTIVATION)
    if HAS_GATE:
        acc = acc * _kept_gates(rows, row_mask, tl.load(bounds_ptr + expert), gate_ptr, assignment_ptr, capacity)[:, None]
    tl.store(out_ptr + out_rows[:, None] * stride_out + cols_n[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=mask)


@triton.jit
def _rows_gemm_gate_grad_kernel(grad_ptr, w_ptr, bias_ptr, gate_ptr, pre_ptr, act_ptr, mask_ptr, grad_pre_ptr,
                                grad_gate_ptr, assignment_ptr, bounds_ptr, num_tokens, inner, cols, stride_we,
                                stride_wk, stride_wn, capacity,
                                NUM_EXPERTS: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr,
                                ACTIVATION: tl.constexpr, IEEE: tl.constexpr,
                                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    expert, rows, row_mask = _tile_rows(tl.program_id(0), bounds_ptr, NUM_EXPERTS, BLOCK_M)
    tokens = _map_rows(rows, row_mask, assignment_ptr, num_tokens, 1).to(tl.int64)
    group_start = tl.load(bounds_ptr + expert)
    gate = _kept_gates(rows, row_mask, group_start, gate_ptr, assignment_ptr, capacity)
    w_base = w_ptr + expert.to(tl.int64) * stride_we
    grad_gate = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for n0 in range(0, cols, BLOCK_N):
        cols_n = n0 + tl.arange(0, BLOCK_N)
        col_mask = cols_n < cols
        acc = _rows_times_weight(tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), grad_ptr, tokens, inner, row_mask,
                                 w_base, stride_wk, stride_wn, cols_n, col_mask, inner, IEEE,
                                 BLOCK_K)  # d out / d act, before the gate
        mask = row_mask[:, None] & col_mask[None, :]
        offsets = rows.to(tl.int64)[:, None] * cols + cols_n[None, :]
        act = tl.load(act_ptr + offsets, mask=mask, other=0.).to(tl.float32)
        grad_gate += tl.sum(act * acc, 1)
        grad = acc * gate[:, None]
        if HAS_MASK:
            grad = grad * tl.load(mask_ptr + offsets, mask=mask, other=0.).to(tl.float32)
        if ACTIVATION != 0:
            grad = grad * _activation_grad(tl.load(pre_ptr + offsets, mask=mask, other=0.).to(tl.float32), ACTIVATION)
        tl.store(grad_pre_ptr + offsets, grad.to(grad_pre_ptr.dtype.element_ty), mask=mask)
    if HAS_BIAS:  # the bias row of the expert is part of what the gate scaled
        for k0 in range(0, inner, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_mask = ks < inner
            g = tl.load(grad_ptr + tokens[:, None] * inner + ks[None, :], mask=row_mask[:, None] & k_mask[None, :],
                        other=0.).to(tl.float32)
            b = tl.load(bias_ptr + expert * inner + ks, mask=k_mask, other=0.).to(tl.float32)
            grad_gate += tl.sum(g * b[None, :], 1)
    if capacity >= 0:
        grad_gate = tl.where(rows < group_start + capacity, grad_gate, 0.)
    assignment = tl.load(assignment_ptr + rows, mask=row_mask, other=0)
    tl.store(grad_gate_ptr + assignment, grad_gate.to(grad_gate_ptr.dtype.element_ty), mask=row_mask)


@triton.jit
def _expert_weight_grad_kernel(a_ptr, b_ptr, gate_ptr, grad_w_ptr, grad_bias_ptr, assignment_ptr, bounds_ptr,
                               num_tokens, a_cols, b_cols, capacity,
                               A_MODE: tl.constexpr, B_MODE: tl.constexpr, B_GATE: tl.constexpr,
                               HAS_BIAS: tl.constexpr, IEEE: tl.constexpr,
                               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    expert = tl.program_id(0)
    pid_k = tl.program_id(1)
    lo = tl.load(bounds_ptr + expert)
    hi = tl.load(bounds_ptr + expert + 1)
    cols_n = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols_n < b_cols
    cols_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    bias_program = pid_k * BLOCK_K >= a_cols  # the one program past a's columns sums b's rows: the bias gradient
    k_mask = (cols_k < a_cols) & (bias_program == 0)
    acc = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
    column_sum = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for r0 in range(lo, hi, BLOCK_M):
        rows = r0 + tl.arange(0, BLOCK_M)
        row_mask = rows < hi
        b_rows = _map_rows(rows, row_mask, assignment_ptr, num_tokens, B_MODE).to(tl.int64)
        b = tl.load(b_ptr + b_rows[:, None] * b_cols + cols_n[None, :], mask=row_mask[:, None] & col_mask[None, :],
                    other=0.)
        if B_GATE:
            b = (b.to(tl.float32) * _kept_gates(rows, row_mask, lo, gate_ptr, assignment_ptr, capacity)[:, None])
            b = b.to(a_ptr.dtype.element_ty)
        if bias_program:
            column_sum += tl.sum(b.to(tl.float32), 0)
        else:
            a_rows = _map_rows(rows, row_mask, assignment_ptr, num_tokens, A_MODE).to(tl.int64)
            a = tl.load(a_ptr + a_rows[:, None] * a_cols + cols_k[None, :],
                        mask=row_mask[:, None] & k_mask[None, :], other=0.)
            if IEEE:
                acc += tl.dot(tl.trans(a), b, input_precision="ieee")
            else:
                acc += tl.dot(tl.trans(a), b)
    if bias_program:
        if HAS_BIAS:
            tl.store(grad_bias_ptr + expert * b_cols + cols_n, column_sum.to(grad_bias_ptr.dtype.element_ty),
                     mask=col_mask)
    else:
        offsets = expert.to(tl.int64) * a_cols * b_cols + cols_k[:, None] * b_cols + cols_n[None, :]
        tl.store(grad_w_ptr + offsets, acc.to(grad_w_ptr.dtype.element_ty), mask=k_mask[:, None] & col_mask[None, :])


def _row_tiles(num_rows: int, num_experts: int) -> int:
    """Programs along the rows: every full tile, plus one partial tile per expert at most."""
    return triton.cdiv(num_rows, BLOCK_ROWS) + num_experts


def _ieee(x: Tensor) -> bool:
    """fp32 GEMMs stay fp32 (no TF32 rounding), as the plain path's ``mm`` does by default."""
    return x.dtype == torch.float32


@torch.library.custom_op('gcvimoe::rows_gemm', mutates_args=())
def rows_gemm(a: Tensor, weight: Tensor, bias: Optional[Tensor], gates: Optional[Tensor], assignment: Tensor,
              bounds: Tensor, num_out_rows: int, num_tokens: int, a_mode: int, out_mode: int, activation: int,
              store_pre: bool, capacity: int) -> Tuple[Tensor, Tensor]:
    """``out[dest(r)] = gate(r) * act(A[src(r)] @ weight[e(r)] + bias[e(r)])`` for every row ``r`` of the plan.

    Args:
        a: Inputs, rows addressed by ``a_mode`` ``[*, k]`` (contiguous).
        weight: ``[e, k, m]`` (any strides: a transposed view is read as it lies).
        bias: ``[e, m]`` or None.
        gates: Gate of each assignment ``[n]`` or None for 1; 0 past ``capacity`` (-1: none).
        assignment: Assignment of each row ``[n]`` (int).
        bounds: First row of each expert, then ``n`` ``[e + 1]`` (int32).
        num_out_rows: Rows of ``out``; every one of them must be some row's destination.
        num_tokens: Tokens ``t``.
        a_mode: How row ``r`` finds its input row: :data:`ROW`, :data:`TOKEN`, :data:`ASSIGNMENT`.
        out_mode: How it finds its output row, the same way.
        activation: :data:`ACTIVATIONS` value applied after the bias, before the gate.
        store_pre: Also return the pre-activation, row-ordered ``[n, m]`` (else an empty tensor).

    Returns:
        ``(out [num_out_rows, m], pre [n, m] or [0])``, in ``a``'s dtype.
    """
    num_rows, num_experts = assignment.shape[0], weight.shape[0]
    inner, cols = weight.shape[1], weight.shape[2]
    out = a.new_empty(num_out_rows, cols)
    pre = a.new_empty(num_rows if store_pre else 0, cols)
    if num_rows:
        grid = (_row_tiles(num_rows, num_experts), triton.cdiv(cols, BLOCK_COLS))
        _rows_gemm_kernel[grid](
            a, weight, bias, gates, out, pre, assignment, bounds, num_tokens, inner, cols, a.stride(0),
            weight.stride(0), weight.stride(1), weight.stride(2), cols, capacity,
            NUM_EXPERTS=num_experts, A_MODE=a_mode, OUT_MODE=out_mode, HAS_BIAS=bias is not None,
            HAS_GATE=gates is not None, ACTIVATION=activation, STORE_PRE=store_pre, IEEE=_ieee(a),
            BLOCK_M=BLOCK_ROWS, BLOCK_N=BLOCK_COLS, BLOCK_K=BLOCK_INNER)
    return out, pre


@rows_gemm.register_fake
def _(a, weight, bias, gates, assignment, bounds, num_out_rows, num_tokens, a_mode, out_mode, activation, store_pre,
      capacity):
    cols = weight.shape[2]
    return a.new_empty(num_out_rows, cols), a.new_empty(assignment.shape[0] if store_pre else 0, cols)


@torch.library.custom_op('gcvimoe::rows_gemm_gate_grad', mutates_args=())
def rows_gemm_gate_grad(grad: Tensor, weight: Tensor, bias: Optional[Tensor], gates: Tensor, pre: Tensor, act: Tensor,
                        mask: Optional[Tensor], assignment: Tensor, bounds: Tensor, activation: int,
                        capacity: int) -> Tuple[Tensor, Tensor]:
    """fc2's backward into fc1's output, and the gates' gradient, in one pass over the rows.

    With ``G = grad[token(r)] @ weight[e]^T`` (``weight`` ``[e, h, d]``): ``grad_pre[r] = gate(r) * mask[r] * G *
    act'(pre[r])`` and ``grad_gate[a(r)] = <act[r], G> + <grad[token(r)], bias[e]>`` (``act``: what fc2 read, after
    dropout), 0 past capacity.

    Returns:
        ``(grad_pre [n, h], grad_gates [n])`` (``grad_gates`` in assignment order).
    """
    num_rows, num_experts = assignment.shape[0], weight.shape[0]
    hidden, width = weight.shape[1], weight.shape[2]
    grad_pre = pre.new_empty(num_rows, hidden)
    grad_gates = gates.new_empty(num_rows)
    if num_rows:
        _rows_gemm_gate_grad_kernel[(_row_tiles(num_rows, num_experts),)](
            grad, weight, bias, gates, pre, act, mask, grad_pre, grad_gates, assignment, bounds,
            grad.shape[0], width, hidden, weight.stride(0), weight.stride(2), weight.stride(1), capacity,
            NUM_EXPERTS=num_experts, HAS_BIAS=bias is not None, HAS_MASK=mask is not None, ACTIVATION=activation,
            IEEE=_ieee(grad), BLOCK_M=BLOCK_ROWS, BLOCK_N=BLOCK_COLS, BLOCK_K=BLOCK_INNER)
    return grad_pre, grad_gates


@rows_gemm_gate_grad.register_fake
def _(grad, weight, bias, gates, pre, act, mask, assignment, bounds, activation, capacity):
    return pre.new_empty(assignment.shape[0], weight.shape[1]), gates.new_empty(assignment.shape[0])


@torch.library.custom_op('gcvimoe::expert_weight_grad', mutates_args=())
def expert_weight_grad(a: Tensor, b: Tensor, gates: Optional[Tensor], assignment: Tensor, bounds: Tensor,
                       num_tokens: int, a_mode: int, b_mode: int, with_bias: bool,
                       capacity: int) -> Tuple[Tensor, Tensor]:
    """``dW[e] = sum over e's rows r of A[src_a(r)]^T (gate(r) B[src_b(r)])`` ``[e, k, m]`` and, with ``with_bias``,
    ``db[e] = sum_r gate(r) B[src_b(r)]`` ``[e, m]`` (else an empty tensor); no gate when ``gates`` is None."""
    num_experts = bounds.shape[0] - 1
    a_cols, b_cols = a.shape[1], b.shape[1]
    grad_w = a.new_empty(num_experts, a_cols, b_cols)
    grad_bias = a.new_empty(num_experts if with_bias else 0, b_cols)
    grid = (num_experts, triton.cdiv(a_cols, BLOCK_INNER) + int(with_bias), triton.cdiv(b_cols, BLOCK_COLS))
    _expert_weight_grad_kernel[grid](
        a, b, gates, grad_w, grad_bias, assignment, bounds, num_tokens, a_cols, b_cols, capacity,
        A_MODE=a_mode, B_MODE=b_mode, B_GATE=gates is not None, HAS_BIAS=with_bias, IEEE=_ieee(a),
        BLOCK_M=BLOCK_ROWS, BLOCK_N=BLOCK_COLS, BLOCK_K=BLOCK_INNER)
    return grad_w, grad_bias


@expert_weight_grad.register_fake
def _(a, b, gates, assignment, bounds, num_tokens, a_mode, b_mode, with_bias, capacity):
    num_experts = bounds.shape[0] - 1
    return (a.new_empty(num_experts, a.shape[1], b.shape[1]),
            a.new_empty(num_experts if with_bias else 0, b.shape[1]))
