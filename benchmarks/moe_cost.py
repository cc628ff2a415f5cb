"""What one MoE layer step asks of a GPU, counted on the CPU: ops launched, bytes moved, GEMM FLOPs, generated kernels.

    python benchmarks/moe_cost.py                    # D 384, H 768, E 8, k 1, T 8192, capacity 1.25, GPU expert path
    python benchmarks/moe_cost.py --top-k 2 --tokens 4096 --no-write
    python benchmarks/moe_cost.py --no-compile       # skip the inductor kernel count (a minute of compiling)
    python benchmarks/moe_cost.py --meta --tokens 262144   # the GPU benchmark's size in bf16, shapes only (no values)
    TRITON_INTERPRET=1 python benchmarks/moe_cost.py --path triton   # the fused kernels (on the CPU: interpreted)

The MoE layer runs its GPU expert path (``grouped_mm``, pinned with ``gcvimoe.moe.set_expert_path``) eagerly in fp32;
the dense side is timm's ``Mlp`` of the same widths. A train step is the forward, a loss ``(y * g).sum()`` (plus the
aux loss for the MoE) and the backward; inference is the forward under ``torch.inference_mode`` in eval mode with
the training capacity. Launches and bytes follow ``benchmarks/op_counter.py``'s rules (views and allocations launch
nothing; bytes are every launching op's tensor inputs and outputs). The compiled column is the number of kernels
inductor generates for the step in bf16 (``torch._inductor.metrics.generated_kernel_count``), GEMMs excluded.
"""
import argparse
import copy
import os

import torch
from timm.layers import Mlp
from torch.utils.flop_counter import FlopCounterMode

from _common import machine, write_section
from op_counter import OpCounter

from gcvimoe.moe import MoE, set_expert_path


def _train_step(layer, x, grad):
    out = layer(x)
    loss = (out * grad).sum()
    aux = getattr(layer, 'aux_loss', None)
    return loss if aux is None else loss + aux


def _grouped_mm_flops(a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    """``F.grouped_mm``'s FLOPs: ``2 m k n`` over the groups, whether the groups split the rows (``[m, k] @ [g, k,
    n]``) or the reduction (``[k, m]^T``-style ``[m, K] @ [K, n] -> [g, m, n]``)."""
    if len(b_shape) == 3:  # rows grouped: every row meets one expert's [k, n]
        return 2 * a_shape[0] * a_shape[1] * b_shape[2]
    return 2 * a_shape[0] * a_shape[1] * b_shape[1]  # reduction grouped: the groups partition k


def _addmm_in_place_flops(self_shape, a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    return 2 * a_shape[0] * a_shape[1] * b_shape[1]


def _rows_gemm_flops(a_shape, w_shape, *args, out_shape=None, **kwargs) -> int:
    """Every row of the plan (``assignment``, the 5th argument) meets one expert's ``[k, m]``."""
    return 2 * args[2][0] * w_shape[1] * w_shape[2]


def _gate_grad_flops(grad_shape, w_shape, bias, gates, pre_shape, *args, out_shape=None, **kwargs) -> int:
    """fc2's input-gradient GEMM, and the gate's dot product over each row's hidden values."""
    return 2 * pre_shape[0] * w_shape[1] * w_shape[2] + 2 * pre_shape[0] * pre_shape[1]


def _weight_grad_flops(a_shape, b_shape, gates, assignment_shape, *args, out_shape=None, **kwargs) -> int:
    return 2 * assignment_shape[0] * a_shape[1] * b_shape[1]


# torch's counter has no formula for the grouped GEMM, nor for addmm written in place, nor for our fused kernels
FLOP_FORMULAS = {torch.ops.aten._grouped_mm: _grouped_mm_flops, torch.ops.aten.addmm_: _addmm_in_place_flops}


def _add_fused_formulas() -> None:
    from gcvimoe.kernels import triton_experts  # noqa: F401  (defines the operators)
    FLOP_FORMULAS.update({torch.ops.gcvimoe.rows_gemm: _rows_gemm_flops,
                          torch.ops.gcvimoe.rows_gemm_gate_grad: _gate_grad_flops,
                          torch.ops.gcvimoe.expert_weight_grad: _weight_grad_flops})


def count_step(layer, x, grad, train: bool):
    """``(forward counter, backward counter or None, GEMM FLOPs)`` of one step, after one uncounted step (what a
    layer makes once, such as constant index tensors, is not part of a step)."""
    layer.train(train)
    flops = FlopCounterMode(display=False, custom_mapping=FLOP_FORMULAS)
    if train:
        _train_step(layer, x.detach().requires_grad_(), grad).backward()
        layer.zero_grad(set_to_none=True)
    else:
        with torch.inference_mode():
            layer(x)
    if not train:
        with torch.inference_mode(), flops, OpCounter() as forward:
            layer(x)
        return forward, None, flops.get_total_flops()
    x = x.detach().requires_grad_()
    with flops:
        with OpCounter() as forward:
            loss = _train_step(layer, x, grad)
        with OpCounter() as backward:
            loss.backward()
    return forward, backward, flops.get_total_flops()


def compiled_kernels(layer, x, grad, train: bool) -> int:
    """Kernels inductor generates for one compiled step (forward and backward graphs), in bf16 as on a GPU (the
    grouped GEMM traces in half precision only)."""
    from torch._inductor import metrics
    torch._dynamo.reset()
    metrics.reset()
    layer = copy.deepcopy(layer).to(torch.bfloat16).train(train)
    x, grad = x.to(torch.bfloat16), grad.to(torch.bfloat16)
    step = torch.compile(_train_step if train else (lambda layer, x, grad: layer(x)), fullgraph=True)
    x = x.detach().requires_grad_(train)
    if train:
        step(layer, x, grad).backward()
    else:
        with torch.no_grad():
            step(layer, x, grad)
    return metrics.generated_kernel_count


def build(args):
    """The dense Mlp, the MoE layer, tokens and an upstream gradient; with ``args.meta``, in bf16 on the ``meta``
    device (shapes without values: the GPU's op sequence and bytes at any size, in no time)."""
    torch.manual_seed(0)
    device, dtype = ('meta', torch.bfloat16) if getattr(args, 'meta', False) else ('cpu', torch.float32)
    dense = Mlp(args.dim, args.hidden).to(device, dtype)
    moe = MoE(args.dim, args.hidden, num_experts=args.experts, top_k=args.top_k, capacity_factor=args.capacity,
              eval_capacity_factor=args.capacity).to(device, dtype)
    x = torch.randn(args.tokens, args.dim).to(device, dtype)
    grad = torch.randn(args.tokens, args.dim).to(device, dtype)
    return dense, moe, x, grad


def _mb(value: float) -> str:
    return f"{value / 1e6:.1f}"


def table(args) -> str:
    dense, moe, x, grad = build(args)
    set_expert_path(args.path)
    rows, tops = [], []
    for train in (True, False):
        counts = {}
        for name, layer in (('dense Mlp', dense), ('MoE', moe)):
            forward, backward, flops = count_step(layer, x, grad, train)
            kernels = compiled_kernels(layer, x, grad, train) if args.compile and not args.meta else None
            counts[name] = (forward, backward, flops, kernels)
        mode = 'train' if train else 'inference'
        dense_bytes = sum(c.bytes for c in counts['dense Mlp'][:2] if c is not None)
        for name, (forward, backward, flops, kernels) in counts.items():
            moved = forward.bytes + (backward.bytes if backward else 0)
            rows.append(f"| {mode} | {name} | {forward.launches} | {backward.launches if backward else '-'} | "
                        f"{forward.views + (backward.views if backward else 0)} | {_mb(moved)} | "
                        f"**{moved / dense_bytes:.2f}** | {flops / 1e9:.2f} | {forward.syncs + (backward.syncs if backward else 0)} | "
                        f"{'-' if kernels is None else kernels} |")
            if name == 'MoE':
                for phase, counter in (('forward', forward), ('backward', backward)):
                    if counter is not None:
                        top = ', '.join(f"{op} {n}x {_mb(b)}" for op, n, b in counter.top(10))
                        tops.append(f"- {mode} {phase}: {top}")
    set_expert_path(None)
    where = "bf16, shapes only on the meta device" if args.meta else "fp32 on the CPU"
    header = (f"D {args.dim}, H {args.hidden}, E {args.experts}, k {args.top_k}, T {args.tokens}, capacity "
              f"{args.capacity}, {where}, expert path `{args.path}`{PATH_NOTES[args.path]}; {machine()}")
    return '\n'.join([
        f"## One MoE layer step, counted (`benchmarks/moe_cost.py{_flags(args)}`)", "", header, "",
        "| step | layer | ops forward | ops backward | views | MB moved | bytes vs dense | GEMM GFLOP | host syncs "
        "| compiled kernels |",
        "|---|---|---|---|---|---|---|---|---|---|", *rows, "",
        "The ten ops of the MoE step that move the most bytes (op, launches, MB):", *tops, ""])


PATH_NOTES = {'grouped_mm': " (the GPU's op sequence)",
              'triton': " (the fused Triton kernels; on the CPU through Triton's interpreter, each kernel one op)"}


def _flags(args) -> str:
    return (' --meta' if args.meta else '') + ('' if args.path == 'grouped_mm' else f' --path {args.path}')


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--dim', type=int, default=384)
    parser.add_argument('--hidden', type=int, default=768)
    parser.add_argument('--experts', type=int, default=8)
    parser.add_argument('--top-k', type=int, default=1)
    parser.add_argument('--tokens', type=int, default=8192)
    parser.add_argument('--capacity', type=float, default=1.25)
    parser.add_argument('--meta', action='store_true', help="count in bf16 on the meta device (no compiled column)")
    parser.add_argument('--no-compile', dest='compile', action='store_false')
    parser.add_argument('--no-write', dest='write', action='store_false')
    parser.add_argument('--path', choices=sorted(PATH_NOTES), default='grouped_mm', help="the expert path counted")
    args = parser.parse_args()
    if args.path == 'triton':
        if not torch.cuda.is_available() and os.environ.get('TRITON_INTERPRET') != '1':
            parser.error("--path triton without a GPU needs TRITON_INTERPRET=1 in the environment (Triton reads it "
                         "when it is imported)")
        _add_fused_formulas()
    body = table(args)
    print(body)
    if args.write:
        write_section('moe_cost' + ('_meta' if args.meta else '') + ('' if args.path == 'grouped_mm' else f'_{args.path}'),
                      body)


if __name__ == '__main__':
    main()
