"""Our MoE layer vs a dense timm ``Mlp`` doing the same per-token work, one process: fp32 on the CPU, bf16 on a GPU.

    python benchmarks/moe_layer.py                 # every case, 2 threads
    python benchmarks/moe_layer.py --cases k1-e8 --rounds 20 --repeats 5   # ranges over 5 whole repeats
    python benchmarks/moe_layer.py --device cuda --token-scale 32 --cases k1-e8 k1-e8-h1536   # bf16 on a GPU, T = 2^18
    python benchmarks/moe_layer.py --device cuda --token-scale 32 --compile   # both sides torch.compile'd

Train step = forward + backward of a fixed upstream gradient (input gradient included); inference = forward under
``torch.inference_mode`` in eval mode, with the eval capacity factor set to the training one. Timings are interleaved
(dense, MoE, MoE, dense, ...); a time ratio is given as the median of the per-round ratios and as the ratio of the
fastest rounds (on a shared machine the fastest rounds are the least disturbed). Peak memory is the highest
total of tensor bytes allocated during one step above what existed before it (torch profiler memory events; the
interpreter, the parameters and the input are excluded). The dropped fraction is the share of (token, expert)
assignments over capacity: on the CPU they cost no compute (on a GPU's grouped GEMMs they run through the last expert
with gate 0), so a ratio is only meaningful beside it.
"""
import argparse
import itertools
import os
import statistics
from dataclasses import dataclass

import torch
from timm.layers import Mlp
from torch.profiler import ProfilerActivity, profile

from _common import interleaved_times, machine, write_section

from gcvimoe.moe import MoE


@dataclass
class Case:
    name: str
    num_experts: int
    top_k: int
    capacity_factor: float
    dim: int = 384
    hidden: int = 768
    tokens: int = 8192


CASES = [
    Case('k1-e8', 8, 1, 1.25),
    Case('k1-e8-h1536', 8, 1, 1.25, hidden=1536),
    Case('k1-e16', 16, 1, 1.25),
    Case('k2-e8', 8, 2, 1.25),
    Case('k2-e16', 16, 2, 1.25),
    Case('k1-e8-dropless', 8, 1, 0.0),
    Case('k2-e16-dropless', 16, 2, 0.0),
    Case('stage1-k1-e8', 8, 1, 1.25, dim=96, hidden=384, tokens=50176),
]


def peak_allocated_bytes(step) -> int:
    """Highest running total of the bytes allocated by ``step`` (allocations minus frees, in time order)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted((event.start_ns(), event.nbytes()) for event in prof.profiler.kineto_results.events()
                    if event.name() == '[memory]')
    return max(itertools.accumulate((nbytes for _, nbytes in events), initial=0))


def cuda_peak_bytes(step) -> int:
    """Peak CUDA memory allocated by ``step`` above what was allocated before it."""
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def run_case(case: Case, rounds: int, device: str = 'cpu', token_scale: int = 1, compile: bool = False,
             show_ops: bool = False) -> dict:
    """Time ratios MoE / dense for a train step and inference; on CUDA under bf16 autocast, synchronised. With
    ``show_ops``, also prints the MoE train step's most expensive ops (device time, allocated memory)."""
    torch.manual_seed(0)
    dense_module = Mlp(case.dim, case.hidden).to(device)
    moe_module = MoE(case.dim, case.hidden, num_experts=case.num_experts, top_k=case.top_k,
                     capacity_factor=case.capacity_factor, eval_capacity_factor=case.capacity_factor).to(device)
    dense, moe = dense_module, moe_module
    if compile:
        torch._dynamo.reset()
        dense, moe = (torch.compile(module, fullgraph=True) for module in (dense_module, moe_module))
    tokens = case.tokens * token_scale
    x = torch.randn(tokens, case.dim, device=device, requires_grad=True)
    grad = torch.randn(tokens, case.dim, device=device)
    cuda = device.startswith('cuda')
    result = {}

    def clear_grads():
        for model in (dense, moe):
            model.zero_grad(set_to_none=True)
        x.grad = None

    def train_step(model):
        model.train()
        clear_grads()
        with torch.autocast('cuda', dtype=torch.bfloat16, enabled=cuda):
            out = model(x)
        out.backward(grad.to(out.dtype))
        if cuda:
            torch.cuda.synchronize()

    def infer_step(model):
        model.eval()
        with torch.inference_mode(), torch.autocast('cuda', dtype=torch.bfloat16, enabled=cuda):
            model(x)
        if cuda:
            torch.cuda.synchronize()

    for mode, step in (('train', train_step), ('infer', infer_step)):
        times = interleaved_times({'dense': lambda: step(dense), 'moe': lambda: step(moe)}, rounds=rounds, warmup=2)
        result[f'{mode}_ratio'] = statistics.median(m / d for m, d in zip(times['moe'], times['dense']))
        result[f'{mode}_best_ratio'] = min(times['moe']) / min(times['dense'])
        result[f'{mode}_dense_ms'] = 1e3 * statistics.median(times['dense'])
        stats = moe_module.stats
        if stats is None:  # a layer that routed records statistics; one that ran the export path does not
            raise SystemExit(f"{case.name} {mode}: the MoE layer recorded no routing statistics, so it did not "
                             "dispatch its tokens; the timings would not be the dispatch's")
        result[f'{mode}_dropped'] = stats.dropped_fraction.item()
        peaks = {}
        for name, model in (('dense', dense), ('moe', moe)):
            clear_grads()  # gradients freed inside the profiled step would be frees of unknown size
            peaks[name] = (cuda_peak_bytes if cuda else peak_allocated_bytes)(lambda: step(model))
        result[f'{mode}_memory_ratio'] = peaks['moe'] / peaks['dense']
    if show_ops:
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with profile(activities=activities, profile_memory=True) as prof:
            train_step(moe)
        print(prof.key_averages().table(sort_by='self_cuda_time_total' if cuda else 'self_cpu_time_total',
                                        row_limit=20, max_name_column_width=60), flush=True)
    return result


def _range(values) -> str:
    return f"{min(values):.2f}-{max(values):.2f}" if len(values) > 1 else f"{values[0]:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--cases', nargs='+', default=[case.name for case in CASES],
                        choices=[case.name for case in CASES])
    parser.add_argument('--rounds', type=int, default=10)
    parser.add_argument('--repeats', type=int, default=1, help="repeat every case this often; tables give ranges")
    parser.add_argument('--threads', type=int, default=os.cpu_count() or 1)
    parser.add_argument('--device', default='cpu', help="cpu (fp32) or cuda (bf16 autocast)")
    parser.add_argument('--token-scale', type=int, default=1, help="multiply every case's token count T")
    parser.add_argument('--compile', action='store_true', help="torch.compile both layers (fullgraph)")
    parser.add_argument('--show-ops', action='store_true', help="print each case's costliest ops in a MoE train step")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cuda = args.device.startswith('cuda')
    where = "bf16 autocast on the GPU" if cuda else f"fp32 CPU, {torch.get_num_threads()} threads"
    where += ", both layers torch.compile'd (fullgraph)" if args.compile else ", eager"
    lines = [
        f"## MoE layer vs a dense timm Mlp (`benchmarks/moe_layer.py`{' --device cuda' if cuda else ''}"
        f"{' --compile' if args.compile else ''})",
        "",
        f"Latest run: {machine()}; {where}; T x {args.token_scale}; {args.repeats} repeat(s) of {args.rounds} "
        "interleaved rounds. Time ratio MoE / dense = median of per-round ratios; the range is over repeats. "
        + ("Target (GPU, bf16, k = 1, E = 8, T = 2^18): MoE at most 1.5x the dense Mlp, train and inference."
           if cuda else
           "Targets (CPU, k = 1, E = 8): train at most 1.15, inference at most 1.10; k = 2 train at most 2.3."),
        "",
        '| case | E | k | capacity factor | D, H, T | train time ratio (latest, range) | inference time ratio (latest, '
        'range) | dropped (train) | train / infer peak mem ratio | dense train / infer ms |',
        '|---|---|---|---|---|---|---|---|---|---|',
    ]
    for case in CASES:
        if case.name not in args.cases:
            continue
        runs = [run_case(case, args.rounds, args.device, args.token_scale, args.compile, args.show_ops)
                for _ in range(args.repeats)]
        r = runs[-1]
        capacity = 'dropless' if case.capacity_factor == 0 else case.capacity_factor
        row = (f"| {case.name} | {case.num_experts} | {case.top_k} | {capacity} | {case.dim}, {case.hidden}, "
               f"{case.tokens * args.token_scale} | {r['train_ratio']:.2f} ({_range([x['train_ratio'] for x in runs])}) "
               f"| {r['infer_ratio']:.2f} ({_range([x['infer_ratio'] for x in runs])}) | {r['train_dropped']:.3f} "
               f"| {r['train_memory_ratio']:.2f} / {r['infer_memory_ratio']:.2f} "
               f"| {r['train_dense_ms']:.3g} / {r['infer_dense_ms']:.3g} |")
        print(row, flush=True)
        lines.append(row)
    write_section('moe_layer' + ('_cuda' if cuda else '') + ('_compiled' if args.compile else ''), '\n'.join(lines))


if __name__ == '__main__':
    main()
