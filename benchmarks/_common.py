"""Shared helpers for the benchmarks: interleaved timing (this machine is shared and noisy) and peak memory."""
import multiprocessing as mp
import resource
import statistics
import time
from typing import Callable, Dict, List


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


def _high_water_kib() -> int:
    # VmHWM belongs to this process image alone (ru_maxrss would carry the parent's peak over the fork)
    with open('/proc/self/status') as f:
        for line in f:
            if line.startswith('VmHWM:'):
                return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _peak_rss_child(queue, build: Callable, step: Callable) -> None:
    state = build()
    for _ in range(3):
        step(state)
    queue.put(_high_water_kib())


def peak_rss_mib(build: Callable, step: Callable) -> float:
    """Peak resident memory (MiB) of a fresh process that builds a workload and runs its step three times.

    ``build`` and ``step`` must be picklable (module-level functions or partials of them).
    """
    ctx = mp.get_context('spawn')
    queue = ctx.Queue()
    proc = ctx.Process(target=_peak_rss_child, args=(queue, build, step))
    proc.start()
    peak_kib = queue.get(timeout=1800)
    proc.join()
    return peak_kib / 1024
