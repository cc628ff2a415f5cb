"""Our dense GC ViT vs timm's gcvit_* (same weights), one process, fp32 CPU: throughput and peak memory ratios.

    python benchmarks/backbone.py                      # tiny and xxtiny, eager
    python benchmarks/backbone.py --compile --sizes xxtiny

Inference = forward under ``torch.inference_mode``; train step = forward + cross-entropy + backward.
Timings are interleaved (ours, timm, timm, ours, ...) and reduced by the median.
"""
import argparse
import functools
import os

import timm
import torch
import torch.nn.functional as F

from _common import interleaved_times, median, peak_rss_mib

import gcvimoe  # noqa: F401  (registers gcvimoe_* in timm)


def build(impl: str, size: str, batch: int, train: bool, compile_model: bool = False, seed: int = 0):
    torch.manual_seed(seed)
    name = f'gcvit_{size}' if impl == 'timm' else f'gcvimoe_{size}'
    kwargs = {} if impl == 'timm' else dict(num_experts=0)
    model = timm.create_model(name, **kwargs).train(train)
    if compile_model:
        model = torch.compile(model)
    x = torch.randn(batch, 3, 224, 224)
    y = torch.randint(0, 1000, (batch,))
    return model, x, y


def infer_step(state) -> None:
    model, x, _ = state
    with torch.inference_mode():
        model(x)


def train_step(state) -> None:
    model, x, y = state
    F.cross_entropy(model(x), y).backward()
    model.zero_grad(set_to_none=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--sizes', nargs='+', default=['tiny', 'xxtiny'])
    parser.add_argument('--batch', type=int, default=8)
    parser.add_argument('--rounds', type=int, default=7)
    parser.add_argument('--compile', action='store_true', help='torch.compile both models')
    parser.add_argument('--no-memory', action='store_true', help='skip the peak-memory subprocesses')
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    mode = 'compiled' if args.compile else 'eager'
    print(f"# backbone: ours vs timm, {mode}, fp32 CPU ({torch.get_num_threads()} threads), batch {args.batch}, "
          f"224 px, median of {args.rounds} interleaved rounds ({2 * args.rounds} for inference)")
    print('| model | mode | ours img/s | timm img/s | ours / timm | peak mem ours / timm |')
    print('|---|---|---|---|---|---|')
    for size in args.sizes:
        for train in (False, True):
            step = train_step if train else infer_step
            states = {impl: build(impl, size, args.batch, train, args.compile) for impl in ('ours', 'timm')}
            states['ours'][0].load_state_dict(states['timm'][0].state_dict())
            # inference steps cost a third of a train step: twice the rounds for the same noise
            times = interleaved_times({impl: functools.partial(step, s) for impl, s in states.items()},
                                      rounds=args.rounds if train else 2 * args.rounds, warmup=2)
            ips = {impl: args.batch / median(t) for impl, t in times.items()}
            memory = ''
            if not args.no_memory:
                rss = {impl: peak_rss_mib(functools.partial(build, impl, size, args.batch, train, args.compile), step)
                       for impl in ('ours', 'timm')}
                memory = f"{rss['ours']:.0f} / {rss['timm']:.0f} MiB = {rss['ours'] / rss['timm']:.2f}"
            print(f"| {size} | {'train step' if train else 'inference'} | {ips['ours']:.1f} | {ips['timm']:.1f} | "
                  f"**{ips['ours'] / ips['timm']:.3f}x** | {memory} |", flush=True)


if __name__ == '__main__':
    main()
