"""What each hand-written kernel buys end to end: A/B in one process, interleaved rounds, fp32 CPU.

    python benchmarks/kernels.py [--rounds 10] [--workloads tiny_train tiny_infer demo_train]

Workloads (the redesign's rule: a kernel stays on by default only if it buys at least 5 % of one of them):
- ``tiny_train``: ``gcvimoe_tiny`` (8 experts, top-1), batch 32, 224 px: forward, cross-entropy + aux loss, backward.
- ``tiny_infer``: the same model, batch 32, inference.
- ``demo_train``: the ``make demo`` training step: ``gcvimoe_nano`` on 32 px, batch 128, one thread, AdamW.
- ``tiny_train_compiled``: the ``tiny_train`` step under ``torch.compile`` (inductor, fullgraph), batch 8; only the
  kernels a compiled graph can use (``dropout_bits``) are switched, one compiled model per arm.

Arms: every kernel on, none (plain PyTorch), and every kernel but one. A kernel's gain is the time without it over the
time with all on, minus one, as the median of per-round ratios (each round runs every arm back to back).
"""
import argparse
import statistics
from functools import partial

import torch
import torch.nn.functional as F

from _common import interleaved_times, machine, write_section

import gcvimoe
from gcvimoe import kernels
from gcvimoe.moe import collect_aux_loss

TRAIN_KERNELS = ('attention', 'expert_mlp', 'dropout_bits')
INFER_KERNELS = ('inplace_residual', 'expert_mlp')
COMPILED_KERNELS = ('dropout_bits',)


def _train_step(model, x, y, optimizer=None) -> None:
    loss = F.cross_entropy(model(x), y) + collect_aux_loss(model)
    loss.backward()
    if optimizer is not None:
        optimizer.step()
    model.zero_grad(set_to_none=True)


def _infer_step(model, x, y) -> None:
    with torch.inference_mode():
        model(x)


def _workload(name: str):
    torch.manual_seed(0)
    if name == 'demo_train':
        model = gcvimoe.create_model('gcvimoe_nano', num_classes=10, drop_path_rate=0.05).train()
        x, y = torch.randn(128, 1, 32, 32), torch.randint(0, 10, (128,))
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        return partial(_train_step, model, x, y, optimizer), TRAIN_KERNELS, 1
    model = gcvimoe.create_model('gcvimoe_tiny', num_experts=8, top_k=1)
    x, y = torch.randn(32, 3, 224, 224), torch.randint(0, 1000, (32,))
    if name == 'tiny_train':
        return partial(_train_step, model.train(), x, y), TRAIN_KERNELS, None
    return partial(_infer_step, model.eval(), x, y), INFER_KERNELS, None


def _compiled_arms(rounds: int) -> dict:
    """One compiled tiny per arm (the switch is read while tracing), timed with its switch set."""
    x, y = torch.randn(8, 3, 224, 224), torch.randint(0, 1000, (8,))
    arms = {'all on': kernels.DEFAULT_ENABLED}
    arms.update({f'without {k}': kernels.DEFAULT_ENABLED - {k} for k in COMPILED_KERNELS})
    steps = {}
    for arm, chosen in arms.items():
        torch.manual_seed(0)
        model = torch.compile(gcvimoe.create_model('gcvimoe_tiny', num_experts=8, top_k=1).train(), fullgraph=True)
        steps[arm] = partial(_with_kernels, partial(_train_step, model, x, y), chosen)
    return interleaved_times(steps, rounds=rounds, warmup=2), arms


def _with_kernels(step, chosen) -> None:
    with kernels.enabled_only(chosen):
        step()


def _eager_arms(name: str, rounds: int):
    step, names, threads = _workload(name)
    saved_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    arms = {'all on': kernels.DEFAULT_ENABLED, 'none': ()}
    arms.update({f'without {k}': kernels.DEFAULT_ENABLED - {k} for k in names})
    times = interleaved_times({arm: partial(_with_kernels, step, chosen) for arm, chosen in arms.items()},
                              rounds=rounds)
    torch.set_num_threads(saved_threads)
    return times, arms


def run(name: str, rounds: int) -> list:
    times, arms = _compiled_arms(rounds) if name == 'tiny_train_compiled' else _eager_arms(name, rounds)
    rows = []
    base = times['all on']
    for arm in arms:
        if arm == 'all on':
            continue
        ratios = [t / b for t, b in zip(times[arm], base)]
        kernel = arm.removeprefix('without ') if arm.startswith('without ') else 'all kernels'
        rows.append((name, kernel, statistics.median(base), statistics.median(ratios) - 1, min(ratios) - 1,
                     max(ratios) - 1))
        print(f"{name}: {kernel}: gain {100 * (statistics.median(ratios) - 1):+.1f} % "
              f"(range {100 * (min(ratios) - 1):+.1f} to {100 * (max(ratios) - 1):+.1f})", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--rounds', type=int, default=10)
    parser.add_argument('--workloads', nargs='+', default=['demo_train', 'tiny_infer', 'tiny_train'],
                        choices=('demo_train', 'tiny_infer', 'tiny_train', 'tiny_train_compiled'))
    args = parser.parse_args()
    rows = [row for name in args.workloads for row in run(name, args.rounds)]
    lines = [
        '## Kernels: what each buys end to end (`benchmarks/kernels.py`)',
        '',
        f"Latest run: {machine()}; {args.rounds} interleaved rounds per workload. Gain = time with the kernel off / "
        "time with every kernel on - 1 (median of per-round ratios, range over rounds in brackets). A kernel stays on "
        "by default only with a gain of at least 5 % in one workload.",
        '',
        '| workload | kernel turned off | step with all on (s) | gain | range |',
        '|---|---|---|---|---|',
    ]
    lines += [f"| {w} | {k} | {base:.3f} | {100 * g:+.1f} % | {100 * lo:+.1f} to {100 * hi:+.1f} % |"
              for w, k, base, g, lo, hi in rows]
    compiled_only = args.workloads == ['tiny_train_compiled']
    if compiled_only:
        lines[0] = '## Kernels under torch.compile (`benchmarks/kernels.py --workloads tiny_train_compiled`)'
    write_section('kernels_compiled' if compiled_only else 'kernels', '\n'.join(lines))


if __name__ == '__main__':
    main()
