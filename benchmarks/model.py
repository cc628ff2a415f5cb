"""gcvimoe_tiny (8 experts, top-1) vs our dense tiny vs timm's gcvit_tiny: one process, 224 px, fp32 CPU.

    python benchmarks/model.py [--batch 8 [16 32 ...]] [--rounds 7]

Inference gets twice the rounds of the train step (a third of its cost per step), as in benchmarks/backbone.py.

Targets: the MoE model costs at most 1.10x our dense model, and is at least as fast as timm's dense gcvit_tiny,
for a train step (forward + cross-entropy + aux loss + backward) and for inference. Timings are interleaved; a ratio
is given as the ratio of the models' median times and, in brackets, as the median of the per-round ratios (each
round times the three models back to back, so that one cancels the machine's slower spells). The dropped fraction of
the MoE model's last train step is printed beside the ratios.
"""
import argparse
import functools
import os
import statistics
import sys

import timm
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
from _common import interleaved_times, median  # noqa: E402

import gcvimoe  # noqa: E402,F401
from gcvimoe.moe import collect_aux_loss, collect_moe_report  # noqa: E402

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
    args = parser.parse_args()
    for batch in args.batch:
        run(batch, args.rounds)


def run(batch: int, rounds: int) -> None:
    torch.manual_seed(0)
    x = torch.randn(batch, 3, 224, 224)
    y = torch.randint(0, 1000, (batch,))
    print(f"# model: fp32 CPU ({torch.get_num_threads()} threads), batch {batch}, 224 px, "
          f"median of {rounds} interleaved rounds ({2 * rounds} for inference)")
    print('| mode | ' + ' | '.join(f'{name} img/s' for name in MODELS) +
          ' | MoE / our dense (time) | MoE / timm dense (time) | MoE dropped fraction |')
    print('|---|' + '---|' * (len(MODELS) + 3))
    for train in (False, True):
        models = {}
        for label, (name, kwargs) in MODELS.items():
            torch.manual_seed(0)
            models[label] = timm.create_model(name, **kwargs).train(train)
        step = train_step if train else infer_step
        times = interleaved_times({label: functools.partial(step, m, x, y) for label, m in models.items()},
                                  rounds=rounds if train else 2 * rounds)
        seconds = {label: median(t) for label, t in times.items()}
        moe, dense, ref = (seconds[label] for label in MODELS)
        moe_times, dense_times, ref_times = (times[label] for label in MODELS)
        paired = [statistics.median(m / o for m, o in zip(moe_times, other)) for other in (dense_times, ref_times)]
        # the last timed step's routing (train: capacity 1.25; inference: dropless)
        dropped = collect_moe_report(models['gcvimoe_tiny E=8 k=1']).summary().get('dropped_fraction', 0.0)
        print(f"| {'train step' if train else 'inference'} | "
              + ' | '.join(f'{batch / s:.2f}' for s in seconds.values())
              + f" | **{moe / dense:.3f}** ({paired[0]:.3f}) | **{moe / ref:.3f}** ({paired[1]:.3f}) | {dropped:.3f} |",
              flush=True)


if __name__ == '__main__':
    main()
