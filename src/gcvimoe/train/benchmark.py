"""Measuring one model alone: images per second and peak memory, for inference or a train step.

For side-by-side comparisons against other implementations use the scripts in ``benchmarks/``.
"""
import statistics
import time
from contextlib import nullcontext
from typing import Any, Dict, Optional

import torch
import torch.nn.functional as F

from gcvimoe.errors import GcvimoeError
from gcvimoe.models import create_model
from gcvimoe.moe import collect_aux_loss
from gcvimoe.train.device import resolve_device


def peak_memory_mib(device: torch.device) -> float:
    """The GPU's allocated high-water mark, or on the CPU this process's resident one (MiB)."""
    if device.type == 'cuda':
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    with open('/proc/self/status') as f:  # the process's resident high-water mark
        return next(int(line.split()[1]) for line in f if line.startswith('VmHWM:')) / 1024


def measure_throughput(  # noqa: PLR0913  (one flag each, as the command line has them)
        model_name: str,
        batch_size: int = 8,
        img_size: Optional[int] = None,
        train: bool = False,
        steps: int = 10,
        device: str = 'auto',
        amp_dtype: Optional[torch.dtype] = None,
        compile: bool = False,
        channels_last: bool = False,
        **model_args,
) -> Dict[str, Any]:
    """Median step time over ``steps`` timed steps (after 2 warm-up steps), images per second and peak memory."""
    if batch_size < 1 or steps < 1:
        raise GcvimoeError("--batch-size and --steps must be at least 1")
    device = resolve_device(device)
    if img_size:
        model_args['img_size'] = img_size
    model = create_model(model_name, **model_args).to(device).train(train)
    in_chans, height, width = model.pretrained_cfg['input_size']
    if img_size:
        height = width = img_size
    x = torch.randn(batch_size, in_chans, height, width, device=device)
    y = torch.randint(0, model.num_classes or 1, (batch_size,), device=device)
    if channels_last:
        model, x = model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    step_model = torch.compile(model) if compile else model

    def autocast():
        return torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else nullcontext()

    def step():
        if train:
            with autocast():
                loss = F.cross_entropy(step_model(x).float(), y) + collect_aux_loss(model)
            loss.backward()
            model.zero_grad(set_to_none=True)
        else:
            with torch.inference_mode(), autocast():
                step_model(x)
        if device.type == 'cuda':
            torch.cuda.synchronize(device)

    for _ in range(2):
        step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    return dict(model=model_name, mode='train' if train else 'inference', device=str(device),
                amp=str(amp_dtype).removeprefix('torch.') if amp_dtype else 'none', compiled=compile,
                batch_size=batch_size, img_size=[height, width], step_ms=seconds * 1e3,
                images_per_s=batch_size / seconds, peak_memory_mib=peak_memory_mib(device))
