"""The fused expert path: the sorted plan's experts as four Triton kernels, the ``triton`` expert backend.

Beside the two GEMMs, the ``grouped_mm`` path makes passes of its own over the rows: the gather, the activation, the
combine and the gate, and their gradients. Here the GEMMs do that work where they read and write (the kernels are in
:mod:`gcvimoe.kernels.triton_experts`): a train step is two kernels forward and four backward, and moves about the
bytes of a dense MLP plus the experts' weights. The results equal the ``plain`` path's; the tests compare them.

It is not the default anywhere: a kernel becomes one only after it measures faster end to end on a GPU. Pin it with
``GCVIMOE_EXPERT_PATH=triton`` or ``gcvimoe.moe.set_expert_path('triton')``. It runs on CUDA, or on the CPU under
``TRITON_INTERPRET=1`` (slowly; for tests and for counting), for token-choice routers with an exact or tanh GELU.
"""
import importlib.util
import os
from typing import Optional

import torch
from torch import Tensor, nn

from gcvimoe.moe.dispatch import SortedPlan
from gcvimoe.moe.experts import Experts
from gcvimoe.moe.router import autocast_off


def _kernels():
    """The kernel module, imported on first use (Triton is a GPU dependency, and the interpreter is chosen when its
    kernels are defined)."""
    from gcvimoe.kernels import triton_experts
    return triton_experts


def activation_code(act: nn.Module) -> Optional[str]:
    """The kernels' name for an activation module, or None when they have none for it."""
    if type(act) is nn.GELU:
        return 'gelu' if act.approximate == 'none' else 'gelu_tanh'
    return None


def fused_runs_on(tokens: Tensor, experts: Experts) -> bool:
    """Triton is installed and can run these tokens (CUDA, or the CPU interpreter), every expert is local, and the
    kernels know the activation."""
    return (importlib.util.find_spec('triton') is not None
            and (tokens.is_cuda or os.environ.get('TRITON_INTERPRET') == '1')
            and experts.local_experts_only and activation_code(experts.act) is not None)


class _FusedExperts(torch.autograd.Function):
    """Both expert layers of every row of a choice-major sorted plan, gated and summed per token."""

    @staticmethod
    def forward(ctx, x, gates, fc1_weight, fc1_bias, fc2_weight, fc2_bias,  # noqa: PLR0913  (the op's inputs)
                assignment, bounds, capacity, activation, dropout):
        k = _kernels()
        num_tokens, num_rows = x.shape[0], assignment.shape[0]
        single = num_rows == num_tokens  # one assignment per token: the output rows are the tokens themselves
        store_pre = torch.is_grad_enabled() or any(ctx.needs_input_grad)
        code = k.ACTIVATIONS[activation]
        act, pre = k.rows_gemm(x, fc1_weight, fc1_bias, None, assignment, bounds, num_rows, num_tokens, k.TOKEN,
                               k.ROW, code, store_pre, -1)
        mask = None
        if dropout > 0:
            mask = torch.empty_like(act).bernoulli_(1 - dropout).div_(1 - dropout)
            act = act.mul_(mask)
        out, _ = k.rows_gemm(act, fc2_weight, fc2_bias, gates, assignment, bounds,
                             num_tokens if single else num_rows, num_tokens, k.ROW,
                             k.TOKEN if single else k.ASSIGNMENT, 0, False, capacity)
        if not single:
            out = out.view(-1, num_tokens, out.shape[-1]).sum(0)
        ctx.save_for_backward(x, gates, fc1_weight, fc1_bias, fc2_weight, fc2_bias, assignment, bounds, pre, act,
                              mask)
        ctx.setup = (capacity, code)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        k = _kernels()
        x, gates, fc1_weight, fc1_bias, fc2_weight, fc2_bias, assignment, bounds, pre, act, mask = ctx.saved_tensors
        capacity, code = ctx.setup
        num_tokens, num_rows = x.shape[0], assignment.shape[0]
        single = num_rows == num_tokens
        grad_out = grad_out.contiguous()
        grad_pre, grad_gates = k.rows_gemm_gate_grad(grad_out, fc2_weight, fc2_bias, gates, pre, act, mask,
                                                     assignment, bounds, code, capacity)
        grad_fc2 = grad_fc2_bias = grad_fc1 = grad_fc1_bias = grad_x = None
        if ctx.needs_input_grad[4] or ctx.needs_input_grad[5]:
            grad_fc2, grad_fc2_bias = k.expert_weight_grad(act, grad_out, gates, assignment, bounds, num_tokens,
                                                           k.ROW, k.TOKEN, fc2_bias is not None, capacity)
        if ctx.needs_input_grad[2] or ctx.needs_input_grad[3]:
            grad_fc1, grad_fc1_bias = k.expert_weight_grad(x, grad_pre, None, assignment, bounds, num_tokens,
                                                           k.TOKEN, k.ROW, fc1_bias is not None, -1)
        if ctx.needs_input_grad[0]:
            grad_x, _ = k.rows_gemm(grad_pre, fc1_weight.transpose(1, 2), None, None, assignment, bounds,
                                    num_tokens if single else num_rows, num_tokens, k.ROW,
                                    k.TOKEN if single else k.ASSIGNMENT, 0, False, -1)
            if not single:
                grad_x = grad_x.view(-1, num_tokens, grad_x.shape[-1]).sum(0)
        return (grad_x, grad_gates, grad_fc1, None if fc1_bias is None else grad_fc1_bias, grad_fc2,
                None if fc2_bias is None else grad_fc2_bias, None, None, None, None, None)


def forward_fused(experts: Experts, x: Tensor, plan: SortedPlan, gates: Tensor) -> Tensor:
    """The experts of ``plan`` on ``x`` ``[t, d]`` through the fused kernels -> ``[t, d_out]``.

    Args:
        experts: The experts (their weights, activation and dropout).
        x: Tokens ``[t, d]``.
        plan: A choice-major sorted plan (:func:`gcvimoe.moe.dispatch.plan_sorted`).
        gates: Gate of each assignment ``[n]`` before capacity: the kernels zero what capacity drops.
    """
    x, (fc1_weight, fc1_bias, fc2_weight, fc2_bias) = experts._cast(x)
    dropout = experts.drop1.p if experts.training else 0.
    capacity = -1 if plan.capacity is None else plan.capacity
    with autocast_off(x):
        out = _FusedExperts.apply(x.contiguous(), gates.to(x.dtype).contiguous(), fc1_weight, fc1_bias, fc2_weight,
                                  fc2_bias, plan.row_assignment, plan.bounds, capacity,
                                  activation_code(experts.act), dropout)
    return experts.drop2(out)
