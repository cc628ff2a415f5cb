"""`gcvimoe benchmark`: images per second and peak memory of a model, for inference or a train step.

    gcvimoe benchmark --model gcvimoe_tiny --batch-size 8
    gcvimoe benchmark --model gcvimoe_tiny --num-experts 0 --train --amp --amp-dtype bfloat16 --device cuda --compile

For side-by-side comparisons against other implementations use the scripts in ``benchmarks/``.
"""
import argparse
import json
import os
import sys
import warnings

import torch

from gcvimoe.cli._common import add_device, add_json, add_moe_options
from gcvimoe.errors import GcvimoeError
from gcvimoe.moe.config import FIELDS as MOE_FIELDS
from gcvimoe.train.benchmark import measure_throughput

# the 0.1 spelling --amp bf16 / fp16, kept for one release
_OLD_AMP = {'bf16': 'bfloat16', 'fp16': 'float16', 'none': None}


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('--model', required=True, help='a gcvimoe model name')
    parser.add_argument('--batch-size', type=int, default=8, metavar='N')
    parser.add_argument('--img-size', type=int, default=None, metavar='PX', help="default: the model's")
    parser.add_argument('--train', action='store_true', help='time forward + backward instead of inference')
    parser.add_argument('--steps', type=int, default=10, metavar='N', help='timed steps (after 2 warm-up steps)')
    add_device(parser)
    parser.add_argument('--amp', nargs='?', const='true', default='false', metavar='BOOL',
                        help='mixed precision (autocast) in --amp-dtype')
    parser.add_argument('--amp-dtype', default='bfloat16', choices=('bfloat16', 'float16'))
    parser.add_argument('--compile', action='store_true', help='torch.compile the model')
    parser.add_argument('--channels-last', action='store_true')
    parser.add_argument('--threads', type=int, default=None, metavar='N',
                        help="CPU threads (default: torch's, one per core); the result says how many were used")
    add_json(parser)
    add_moe_options(parser)


def _amp_dtype(args: argparse.Namespace):
    amp = args.amp.lower()
    if amp in _OLD_AMP:
        if amp != 'none':
            warnings.warn(f"--amp {amp} is deprecated; write --amp --amp-dtype {_OLD_AMP[amp]}", FutureWarning,
                          stacklevel=2)
        name = _OLD_AMP[amp]
    else:
        name = args.amp_dtype if amp in ('true', 'yes', 'on', '1') else None
    return getattr(torch, name) if name else None


def _threads(requested) -> int:
    """Set and return the CPU threads; warn when other work already keeps the cores they need busy, since the
    timing then measures the machine's load more than the model."""
    if requested is not None:
        if requested < 1:
            raise GcvimoeError(f"--threads must be at least 1, got {requested}")
        torch.set_num_threads(requested)
    threads = torch.get_num_threads()
    cores = os.cpu_count() or threads
    load = os.getloadavg()[0] if hasattr(os, 'getloadavg') else 0.0
    if load > cores - threads + 0.5:
        print(f"warning: the machine's load ({load:.1f} over the last minute, {cores} cores) leaves fewer than the "
              f"{threads} cores this benchmark uses free; expect slower, noisier numbers (--threads N, or an idle "
              f"machine)", file=sys.stderr)
    return threads


def run(args: argparse.Namespace) -> int:
    threads = _threads(args.threads)
    result = measure_throughput(
        args.model, batch_size=args.batch_size, img_size=args.img_size, train=args.train, steps=args.steps,
        device=args.device, amp_dtype=_amp_dtype(args), compile=args.compile, channels_last=args.channels_last,
        **MOE_FIELDS.from_args(args))
    result['threads'] = threads
    if args.json:
        print(json.dumps(result))
    else:
        height, width = result['img_size']
        print(f"{args.model} {result['mode']} on {result['device']} ({result['amp']}, batch {args.batch_size}, "
              f"{height}x{width}{', compiled' if args.compile else ''}): {result['images_per_s']:.1f} img/s, "
              f"{result['step_ms']:.1f} ms/step (median of {args.steps}), "
              f"peak memory {result['peak_memory_mib']:.0f} MiB, {threads} CPU thread(s)")
    return 0
