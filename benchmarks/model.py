"""gcvimoe_tiny (8 experts, top-1) vs our dense tiny vs timm's gcvit_tiny: one process, 224 px, fp32 CPU.

    python benchmarks/model.py [--batch 8 [16 32 ...]] [--rounds 7] [--repeats 5] [--compiled]
    python benchmarks/model.py --device cuda --batch 128      # bf16 on a GPU: MoE vs dense twin, eager and compiled

Inference gets twice the rounds of the train step (a third of its cost per step), as in benchmarks/backbone.py.

Targets: the MoE model costs at most 1.10x our dense model, and is at least as fast as timm's dense gcvit_tiny,
for a train step (forward + cross-entropy + aux loss + backward) and for inference. Timings are interleaved; a ratio
is given as the ratio of the models' median times and, in brackets, as the median of the per-round ratios (each
round times the three models back to back, so that one cancels the machine's slower spells). The dropped fraction of
the MoE model's last train step is printed beside the ratios.
"""
import argparse
import functools
import statistics

import timm
import torch
import torch.nn.functional as F

from _common import interleaved_times, machine, median, write_section

import gcvimoe  # noqa: F401
from gcvimoe.moe import collect_aux_loss, collect_moe_report, set_expert_path

MODELS = {
    'gcvimoe_tiny E=8 k=1': ('gcvimoe_tiny', dict(num_experts=8, top_k=1)),
    'ours dense tiny': ('gcvimoe_tiny', dict(num_experts=0)),
    'timm gcvit_tiny': ('gcvit_tiny', {}),
}


def infer_step(model, x, y) -> None:
    with torch.inference_mode():
        model(x)


def train_step(model, x, y) -> None:
    loss = F.cross_entropy(model(x), y) + collect_aux_loss(model)
    loss.backward()
    model.zero_grad(set_to_none=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--batch', type=int, nargs='+', default=[8],
                        help="batch sizes, one table each (the MoE overhead shrinks as tokens per expert grow)")
    parser.add_argument('--rounds', type=int, default=7)
    parser.add_argument('--repeats', type=int, default=1, help="repeat every measurement; tables give ranges")
    parser.add_argument('--compiled', action='store_true',
                        help="also compare torch.compile'd MoE with the compiled dense twin and with eager MoE")
    parser.add_argument('--device', default='cpu', help="cpu (fp32, three models) or cuda (bf16, MoE vs dense twin)")
    parser.add_argument('--compiled-only', action='store_true', help="cuda: time only the compiled train step")
    parser.add_argument('--expert-path', help="cuda: also time the MoE model with this expert path pinned (e.g. "
                        "triton), interleaved with the default path in one process: the A/B a kernel must win by 5 %%")
    args = parser.parse_args()
    if args.device.startswith('cuda'):
        main_cuda(args)
        return
    lines = [
        '## GCViMoE-tiny vs our dense tiny vs timm gcvit_tiny (`benchmarks/model.py`)',
        '',
        f"Latest run: {machine()}; 224 px, fp32; {args.repeats} repeat(s) of {args.rounds} interleaved rounds "
        f"({2 * args.rounds} for inference). Time ratios: ratio of median times and, in brackets, the median of "
        "per-round ratios, each the median over repeats; then the range over repeats. Targets: MoE at most 1.10x "
        "our dense and at most 1.0x timm.",
        '',
        '| batch | mode | MoE img/s | MoE / our dense | range | MoE / timm | range | MoE dropped fraction |',
        '|---|---|---|---|---|---|---|---|',
    ]
    for batch in args.batch:
        lines += run(batch, args.rounds, args.repeats)
    if args.compiled:
        lines += ['', 'Compiled (`torch.compile`, inductor, fullgraph): time ratios as above. Targets: compiled MoE at '
                  'most 1.10x the compiled dense twin (train step), and no slower than eager MoE.', '',
                  '| batch | mode | compiled MoE img/s | compiled MoE / compiled dense | range | compiled MoE / eager MoE '
                  '| range |', '|---|---|---|---|---|---|---|']
        for batch in args.batch:
            lines += run_compiled(batch, args.rounds, args.repeats)
    write_section('model', '\n'.join(lines))


def _median_over_repeats(results):
    """Each measured quantity's median over the repeats (the tables' bold figures), in the results' order."""
    return tuple(statistics.median(column) for column in zip(*results))


def _range(values) -> str:
    return f"{min(values):.3f}-{max(values):.3f}" if len(values) > 1 else '-'


def _measure(models, step, x, y, rounds):
    times = interleaved_times({label: functools.partial(step, m, x, y) for label, m in models.items()}, rounds=rounds)
    seconds = {label: median(t) for label, t in times.items()}
    moe, dense, ref = (seconds[label] for label in MODELS)
    moe_times, dense_times, ref_times = (times[label] for label in MODELS)
    paired = [statistics.median(m / o for m, o in zip(moe_times, other)) for other in (dense_times, ref_times)]
    return moe, moe / dense, paired[0], moe / ref, paired[1]


def run(batch: int, rounds: int, repeats: int = 1) -> list:
    torch.manual_seed(0)
    x = torch.randn(batch, 3, 224, 224)
    y = torch.randint(0, 1000, (batch,))
    rows = []
    for train in (False, True):
        models = {}
        for label, (name, kwargs) in MODELS.items():
            torch.manual_seed(0)
            models[label] = timm.create_model(name, **kwargs).train(train)
        step = train_step if train else infer_step
        results = [_measure(models, step, x, y, rounds if train else 2 * rounds) for _ in range(repeats)]
        moe_seconds, vs_dense, vs_dense_paired, vs_timm, vs_timm_paired = _median_over_repeats(results)
        # the last timed step's routing (train: capacity 1.25; inference: dropless)
        dropped = collect_moe_report(models['gcvimoe_tiny E=8 k=1']).summary().get('dropped_fraction', 0.0)
        row = (f"| {batch} | {'train step' if train else 'inference'} | {batch / moe_seconds:.2f} "
               f"| **{vs_dense:.3f}** ({vs_dense_paired:.3f}) | {_range([r[1] for r in results])} "
               f"| **{vs_timm:.3f}** ({vs_timm_paired:.3f}) | {_range([r[3] for r in results])} | {dropped:.3f} |")
        print(row, flush=True)
        rows.append(row)
    return rows


def run_compiled(batch: int, rounds: int, repeats: int = 1) -> list:
    torch.manual_seed(0)
    x = torch.randn(batch, 3, 224, 224)
    y = torch.randint(0, 1000, (batch,))
    rows = []
    for train in (False, True):
        torch._dynamo.reset()
        models = {}
        for label, kwargs in (('compiled MoE', dict(num_experts=8, top_k=1)), ('compiled dense', dict(num_experts=0)),
                              ('eager MoE', dict(num_experts=8, top_k=1))):
            torch.manual_seed(0)
            model = timm.create_model('gcvimoe_tiny', **kwargs).train(train)
            models[label] = torch.compile(model, fullgraph=True) if label.startswith('compiled') else model
        step = train_step if train else infer_step
        results = []
        for _ in range(repeats):
            times = interleaved_times({label: functools.partial(step, m, x, y) for label, m in models.items()},
                                      rounds=rounds if train else 2 * rounds, warmup=2)
            moe, dense, eager = (median(times[label]) for label in models)
            results.append((moe, moe / dense, moe / eager))
        moe_seconds, vs_dense, vs_eager = _median_over_repeats(results)
        print(f"{'train' if train else 'inference'} compiled MoE / eager MoE per repeat: "
              + ", ".join(f"{r[2]:.3f}" for r in results), flush=True)
        row = (f"| {batch} | {'train step' if train else 'inference'} | {batch / moe_seconds:.2f} | **{vs_dense:.3f}** "
               f"| {_range([r[1] for r in results])} | **{vs_eager:.3f}** | {_range([r[2] for r in results])} |")
        print(row, flush=True)
        rows.append(row)
    return rows


def cuda_step(model, x, y, train: bool, path=None) -> None:
    set_expert_path(path)  # each model of an interleaved A/B runs on its own expert path
    with torch.autocast('cuda', dtype=torch.bfloat16):
        if train:
            train_step(model, x, y)
        else:
            infer_step(model, x, y)
    torch.cuda.synchronize()


def main_cuda(args) -> None:
    """bf16 autocast on a GPU: gcvimoe_tiny (E=8, k=1) against its dense twin, eager and ``torch.compile``'d."""
    lines = [
        '## GCViMoE-tiny vs its dense twin on a GPU (`benchmarks/model.py --device cuda`)',
        '',
        f"Latest run: {machine()}; 224 px, bf16 autocast, fp32 weights; {args.repeats} repeat(s) of {args.rounds} "
        "interleaved rounds. Train step = forward + cross-entropy + aux loss + backward. Time ratio MoE / dense = "
        "ratio of median times, each the median over repeats; the range is over repeats. Target: the compiled train "
        "step at most 1.25x the compiled dense twin.",
        '',
        '| batch | mode | MoE img/s | dense img/s | MoE / dense | range |' + (
            f' {args.expert_path} / default | range |' if args.expert_path else ''),
        '|---|---|---|---|---|---|' + ('---|---|' if args.expert_path else ''),
    ]
    for batch in args.batch:
        torch.manual_seed(0)
        x = torch.randn(batch, 3, 224, 224, device='cuda')
        y = torch.randint(0, 1000, (batch,), device='cuda')
        modes = ((True, True),) if args.compiled_only else ((False, False), (False, True), (True, True))
        for compiled, train in modes:
            torch._dynamo.reset()
            models = {}
            labels = (('MoE', dict(num_experts=8, top_k=1)), ('dense', dict(num_experts=0)))
            labels += (('path', dict(num_experts=8, top_k=1)),) if args.expert_path else ()
            for label, kwargs in labels:
                torch.manual_seed(0)
                model = timm.create_model('gcvimoe_tiny', **kwargs).cuda().train(train)
                models[label] = torch.compile(model, fullgraph=True) if compiled else model
            results = []
            for _ in range(args.repeats):
                times = interleaved_times({label: functools.partial(cuda_step, m, x, y, train,
                                                                    args.expert_path if label == 'path' else None)
                                           for label, m in models.items()}, rounds=args.rounds, warmup=3)
                results.append(tuple(median(times[label]) for label in models))
            moe, dense, *path = _median_over_repeats(results)
            mode = ('compiled ' if compiled else 'eager ') + ('train step' if train else 'inference')
            row = (f"| {batch} | {mode} | {batch / moe:.0f} | {batch / dense:.0f} | **{moe / dense:.3f}** "
                   f"| {_range([r[0] / r[1] for r in results])} |")
            if path:
                row += f" **{path[0] / moe:.3f}** | {_range([r[2] / r[0] for r in results])} |"
            print(row, flush=True)
            lines.append(row)
            write_section('model_cuda', '\n'.join(lines))  # row by row: a run stopped while compiling keeps the rest


if __name__ == '__main__':
    main()
