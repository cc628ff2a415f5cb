"""One MoE layer on a GPU, forward and backward timed apart, with achieved TFLOP/s, GB/s and peak memory.

    python benchmarks/gpu_layer.py                              # T 2^16 and 2^18, H 768 and 1536, k 1 and 2
    python benchmarks/gpu_layer.py --compile                    # both layers torch.compile'd (fullgraph)
    python benchmarks/gpu_layer.py --path triton --tokens 262144 --hidden 768 --top-k 1   # one expert path pinned
    python benchmarks/gpu_layer.py --device cpu --tokens 2048 --hidden 768 --top-k 1 --no-write   # a dry run

bf16 (autocast) on the GPU, D 384, E 8, capacity 1.25, against a dense timm ``Mlp`` of the same widths. Times are
CUDA-event medians over ``--rounds`` interleaved rounds. FLOPs come from ``torch.utils.flop_counter`` (grouped GEMMs
included), bytes from ``benchmarks/op_counter.py``'s dispatch-mode counter on the same step, so TFLOP/s and GB/s are
what the step asked for divided by its time. Peak memory is the step's allocation above what existed before it.
"""
import argparse
import itertools
import statistics
import time

import torch
from timm.layers import Mlp
from torch.utils.flop_counter import FlopCounterMode

from _common import machine, write_section
from moe_cost import FLOP_FORMULAS
from op_counter import OpCounter

from gcvimoe.moe import MoE, set_expert_path


class Timer:
    """Wall time of a region: CUDA events on a GPU, the host clock on a CPU."""

    def __init__(self, device: str):
        self.cuda = device.startswith('cuda')

    def __call__(self, fn):
        if not self.cuda:
            start = time.perf_counter()
            out = fn()
            return out, time.perf_counter() - start
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = fn()
        end.record()
        torch.cuda.synchronize()
        return out, start.elapsed_time(end) / 1e3


def _forward(layer, x, cuda):
    with torch.autocast('cuda', dtype=torch.bfloat16, enabled=cuda):
        out = layer(x)
        aux = getattr(layer, 'aux_loss', None)
    return out, aux


def _backward(out, aux, grad):
    torch.autograd.backward([out] + ([aux] if aux is not None and aux.requires_grad else []),
                            [grad.to(out.dtype)] + ([torch.ones_like(aux)] if aux is not None and aux.requires_grad
                                                    else []))


def measure(layer, x, grad, rounds: int, device: str) -> dict:
    """Median forward / backward / inference seconds, FLOPs and bytes of each phase, peak memory of a train step."""
    cuda, timer = device.startswith('cuda'), Timer(device)
    forward_s, backward_s, infer_s = [], [], []
    for _ in range(rounds + 2):  # the first two warm up (compilation, library handles)
        layer.train()
        x.grad = None
        (out, aux), seconds = timer(lambda: _forward(layer, x, cuda))
        forward_s.append(seconds)
        _, seconds = timer(lambda: _backward(out, aux, grad))
        backward_s.append(seconds)
        layer.eval()
        with torch.inference_mode():
            _, seconds = timer(lambda: _forward(layer, x, cuda))
        infer_s.append(seconds)
    counts = {}
    for phase in ('forward', 'backward'):
        counts[phase] = (FlopCounterMode(display=False, custom_mapping=FLOP_FORMULAS), OpCounter())
    layer.train()
    with counts['forward'][0], counts['forward'][1]:
        out, aux = _forward(layer, x, cuda)
    with counts['backward'][0], counts['backward'][1]:
        _backward(out, aux, grad)
    peak = None
    if cuda:
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        _backward(*_forward(layer.train(), x, cuda), grad)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
    median = statistics.median
    return {'forward_s': median(forward_s[2:]), 'backward_s': median(backward_s[2:]), 'infer_s': median(infer_s[2:]),
            **{f'{phase}_flops': flops.get_total_flops() for phase, (flops, _) in counts.items()},
            **{f'{phase}_bytes': ops.bytes for phase, (_, ops) in counts.items()}, 'peak': peak}


def rows(tokens: int, hidden: int, top_k: int, args) -> list:
    torch.manual_seed(0)
    dense = Mlp(args.dim, hidden).to(args.device)
    moe = MoE(args.dim, hidden, num_experts=args.experts, top_k=top_k, capacity_factor=args.capacity,
              eval_capacity_factor=args.capacity).to(args.device)
    if args.compile:
        torch._dynamo.reset()
        dense, moe = torch.compile(dense, fullgraph=True), torch.compile(moe, fullgraph=True)
    x = torch.randn(tokens, args.dim, device=args.device, requires_grad=True)
    grad = torch.randn(tokens, args.dim, device=args.device)
    results = {name: measure(layer, x, grad, args.rounds, args.device) for name, layer in (('dense', dense),
                                                                                          ('MoE', moe))}
    out = []
    for name, r in results.items():
        dense_r = results['dense']
        cells = []
        for phase in ('forward', 'backward'):
            seconds = r[f'{phase}_s']
            cells.append(f"{1e3 * seconds:.3g} ({seconds / dense_r[f'{phase}_s']:.2f}x), "
                         f"{r[f'{phase}_flops'] / seconds / 1e12:.1f} TF/s, {r[f'{phase}_bytes'] / seconds / 1e9:.0f} GB/s")
        peak = '-' if r['peak'] is None else f"{r['peak'] / 2**20:.0f} ({r['peak'] / dense_r['peak']:.2f}x)"
        out.append(f"| {tokens} | {hidden} | {top_k} | {name} | {cells[0]} | {cells[1]} | "
                   f"{1e3 * r['infer_s']:.3g} ({r['infer_s'] / dense_r['infer_s']:.2f}x) | "
                   f"{(r['forward_s'] + r['backward_s']) / (dense_r['forward_s'] + dense_r['backward_s']):.2f} | {peak} |")
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--device', default='cuda')
    parser.add_argument('--tokens', type=int, nargs='+', default=[2 ** 16, 2 ** 18])
    parser.add_argument('--hidden', type=int, nargs='+', default=[768, 1536])
    parser.add_argument('--top-k', type=int, nargs='+', default=[1, 2])
    parser.add_argument('--dim', type=int, default=384)
    parser.add_argument('--experts', type=int, default=8)
    parser.add_argument('--capacity', type=float, default=1.25)
    parser.add_argument('--rounds', type=int, default=10)
    parser.add_argument('--compile', action='store_true')
    parser.add_argument('--path', help="pin the MoE layer's expert path (gcvimoe.moe.set_expert_path), e.g. triton")
    parser.add_argument('--no-write', dest='write', action='store_false')
    args = parser.parse_args()
    set_expert_path(args.path)
    flags = (' --compile' if args.compile else '') + (f' --path {args.path}' if args.path else '')
    lines = [f"## One MoE layer on a GPU, phases apart (`benchmarks/gpu_layer.py{flags}`)",
             "", f"Latest run: {machine()}; bf16 autocast, D {args.dim}, E {args.experts}, capacity {args.capacity}, "
             f"{'compiled (fullgraph)' if args.compile else 'eager'}, expert path {args.path or 'default'}; medians of {args.rounds} rounds. Each cell: ms "
             "(vs dense), achieved TFLOP/s, GB/s. Targets at T = 2^18, H = 768: MoE train and inference at most 1.3x "
             "dense eager, 1.2x compiled; peak memory at most 1.3x.", "",
             "| T | H | k | layer | forward | backward | inference | train vs dense | train peak MiB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for tokens, hidden, top_k in itertools.product(args.tokens, args.hidden, args.top_k):
        for row in rows(tokens, hidden, top_k, args):
            print(row, flush=True)
            lines.append(row)
    if args.write:
        write_section('gpu_layer' + ('_compiled' if args.compile else '') + (f'_{args.path}' if args.path else ''),
                      '\n'.join(lines))


if __name__ == '__main__':
    main()
