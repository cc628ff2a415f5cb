"""`gcvimoe benchmark`: images per second and peak memory of a model, for inference or a train step.

    gcvimoe benchmark --model gcvimoe_tiny --batch-size 8
    gcvimoe benchmark --model gcvimoe_tiny --num-experts 0 --train --amp bf16 --device cuda --compile

For side-by-side comparisons against other implementations use the scripts in ``benchmarks/``.
"""
import argparse
import json
import statistics
import time
from contextlib import nullcontext

import torch
import torch.nn.functional as F

from gcvimoe.errors import GcvimoeError


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('--model', required=True, help='a gcvimoe model name')
    parser.add_argument('--batch-size', type=int, default=8, metavar='N')
    parser.add_argument('--img-size', type=int, default=None, metavar='PX', help="default: the model's")
    parser.add_argument('--num-experts', type=int, default=None, metavar='E', help='0 for the dense twin')
    parser.add_argument('--top-k', type=int, default=None, metavar='K')
    parser.add_argument('--train', action='store_true', help='time forward + backward instead of inference')
    parser.add_argument('--steps', type=int, default=10, metavar='N', help='timed steps (after 2 warm-up steps)')
    parser.add_argument('--device', default='auto', help='auto, cpu, cuda or cuda:N')
    parser.add_argument('--amp', default='none', choices=('none', 'bf16', 'fp16'), help='autocast dtype')
    parser.add_argument('--compile', action='store_true', help='torch.compile the model')
    parser.add_argument('--channels-last', action='store_true')
    parser.add_argument('--json', action='store_true', help='print one JSON object')


def _peak_memory_mib(device: torch.device) -> float:
    if device.type == 'cuda':
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    with open('/proc/self/status') as f:  # the process's resident high-water mark
        return next(int(line.split()[1]) for line in f if line.startswith('VmHWM:')) / 1024


def run(args: argparse.Namespace) -> int:
    from gcvimoe.engine.distributed import resolve_device
    from gcvimoe.models import create_model
    from gcvimoe.moe import collect_aux_loss

    if args.batch_size < 1 or args.steps < 1:
        raise GcvimoeError("--batch-size and --steps must be at least 1")
    device = torch.device(resolve_device(args.device))
    kwargs = {k: v for k, v in dict(img_size=args.img_size, num_experts=args.num_experts, top_k=args.top_k).items()
              if v is not None}
    model = create_model(args.model, **kwargs).to(device).train(args.train)
    in_chans, height, width = model.pretrained_cfg['input_size']
    if args.img_size:
        height = width = args.img_size
    x = torch.randn(args.batch_size, in_chans, height, width, device=device)
    y = torch.randint(0, model.num_classes or 1, (args.batch_size,), device=device)
    if args.channels_last:
        model, x = model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    step_model = torch.compile(model) if args.compile else model
    dtype = {'bf16': torch.bfloat16, 'fp16': torch.float16}.get(args.amp)
    autocast = torch.autocast(device.type, dtype=dtype) if dtype else nullcontext()

    def step():
        if args.train:
            with autocast:
                loss = F.cross_entropy(step_model(x).float(), y) + collect_aux_loss(model)
            loss.backward()
            model.zero_grad(set_to_none=True)
        else:
            with torch.inference_mode(), autocast:
                step_model(x)
        if device.type == 'cuda':
            torch.cuda.synchronize(device)

    for _ in range(2):
        step()
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    result = dict(model=args.model, mode='train' if args.train else 'inference', device=str(device), amp=args.amp,
                  compiled=args.compile, batch_size=args.batch_size, img_size=[height, width],
                  step_ms=seconds * 1e3, images_per_s=args.batch_size / seconds,
                  peak_memory_mib=_peak_memory_mib(device))
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{args.model} {result['mode']} on {device} ({args.amp}, batch {args.batch_size}, {height}x{width}"
              f"{', compiled' if args.compile else ''}): {result['images_per_s']:.1f} img/s, "
              f"{result['step_ms']:.1f} ms/step (median of {args.steps}), "
              f"peak memory {result['peak_memory_mib']:.0f} MiB")
    return 0
