"""Shared helpers for the benchmarks: interleaved timing (this machine is shared and noisy) and peak memory.

Run a benchmark as ``python benchmarks/NAME.py``: Python puts the script's folder first on ``sys.path``, so
``from _common import ...`` (and one benchmark importing another) needs no path setup of its own."""
import datetime
import multiprocessing as mp
import os
import platform
import statistics
import time
from typing import Callable, Dict, List

import torch

from gcvimoe.train.benchmark import peak_memory_mib


def interleaved_times(fns: Dict[str, Callable[[], None]], rounds: int, warmup: int = 1) -> Dict[str, List[float]]:
    """Runs every function once per round, in alternating order, and returns each one's wall times.

    Alternating A, B, B, A, ... spreads the machine's background load evenly over the contenders.
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    names = list(fns)
    times = {name: [] for name in names}
    for r in range(rounds):
        for name in (names if r % 2 == 0 else reversed(names)):
            start = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - start)
    return times


def median(values: List[float]) -> float:
    return statistics.median(values)


def _peak_rss_child(queue, build: Callable, step: Callable) -> None:
    state = build()
    for _ in range(3):
        step(state)
    # VmHWM belongs to this process image alone (ru_maxrss would carry the parent's peak over the fork)
    queue.put(peak_memory_mib(torch.device('cpu')))


def peak_rss_mib(build: Callable, step: Callable) -> float:
    """Peak resident memory (MiB) of a fresh process that builds a workload and runs its step three times.

    ``build`` and ``step`` must be picklable (module-level functions or partials of them).
    """
    ctx = mp.get_context('spawn')
    queue = ctx.Queue()
    proc = ctx.Process(target=_peak_rss_child, args=(queue, build, step))
    proc.start()
    peak_mib = queue.get(timeout=1800)
    proc.join()
    return peak_mib


RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'RESULTS.md')


def machine() -> str:
    """CPU model, cores, torch version: the line every results table starts with."""
    model = platform.processor() or platform.machine()
    try:
        with open('/proc/cpuinfo') as f:
            model = next(line.split(':', 1)[1].strip() for line in f if line.startswith('model name'))
    except (OSError, StopIteration):
        pass
    device = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ''
    return (f"{model}, {os.cpu_count()} cores{device}; torch {torch.__version__}, {torch.get_num_threads()} threads; "
            f"{datetime.date.today().isoformat()}")


def write_section(name: str, body: str) -> None:
    """Replace this script's section of RESULTS.md (between its markers) with ``body``; add it when missing."""
    begin, end = f'<!-- {name}: begin -->', f'<!-- {name}: end -->'
    text = open(RESULTS).read() if os.path.exists(RESULTS) else '# Benchmark results\n'
    block = f"{begin}\n{body.strip()}\n{end}"
    if begin in text and end in text:
        text = text[:text.index(begin)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip() + '\n\n' + block + '\n'
    tmp = RESULTS + '.tmp'
    with open(tmp, 'w') as f:
        f.write(text)
    os.replace(tmp, RESULTS)
