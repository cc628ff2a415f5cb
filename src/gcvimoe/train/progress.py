"""What a run shows while it runs: the console and ``train.log`` (:func:`log_to`), step lines, progress bars, and
the scalars its sinks receive (:mod:`gcvimoe.train.sinks`: TensorBoard, Weights & Biases).

Reading a value the GPU computed makes the host wait for the GPU, so the training loop sums its losses, image counts
and expert token counts on the device (:class:`StepMeter`) and reads them only at log steps: the first and the last
micro-batch of every epoch and every ``log_interval``-th one. Each read is one all-reduce, so a step line shows the
whole job's numbers over the micro-batches since the previous line.

A progress bar is drawn by the primary process only, and only when stderr is a terminal: a redirected log (a file,
torchrun's) gets lines and never a carriage return.

The scalars of the MoE layers' expert load (:func:`expert_load_scalars`) are described in :mod:`gcvimoe.train.sinks`.
"""
import datetime
import logging
import math
import sys
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Mapping, Optional, Tuple

import torch
from torch import nn
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from gcvimoe.moe import MoEReport, moe_layers
from gcvimoe.train.distributed import DistInfo, all_reduce_sum

_logger = logging.getLogger("gcvimoe.train")

LINES_PER_EPOCH = 5


def resolve_log_interval(log_interval: int, num_batches: int) -> int:
    """Micro-batches between log steps: ``log_interval``, or for 0 about :data:`LINES_PER_EPOCH` per epoch."""
    return log_interval if log_interval > 0 else max(1, math.ceil(num_batches / LINES_PER_EPOCH))


def shows_bar(info: DistInfo) -> bool:
    """Whether this process draws progress bars: the primary one, when stderr is a terminal."""
    return info.is_primary and sys.stderr.isatty()


def duration(seconds: float) -> str:
    """``0:01:23``."""
    return str(datetime.timedelta(seconds=round(seconds)))


def track(iterable: Iterable, total: int, desc: str, info: DistInfo) -> Iterator:
    """``iterable``, its progress shown as a bar on the primary process when stderr is a terminal; a log (a file,
    torchrun's) gets nothing, as the line that follows the pass already says what it found."""
    if shows_bar(info):
        yield from tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True, file=sys.stderr)
        return
    yield from iterable


def expert_load(tokens: List[float], kept: List[float]) -> Dict[str, Any]:
    """One MoE layer's counts in the form of :meth:`gcvimoe.train.evaluate.ExpertUsage.summary`."""
    total = sum(tokens)
    return {"tokens_per_expert": [t / total if total else 0.0 for t in tokens],
            "dropped_fraction": 1.0 - sum(kept) / total if total else 0.0,
            "token_counts": [int(t) for t in tokens]}


def expert_load_scalars(experts: Mapping[str, Mapping[str, Any]], prefix: str = "experts") -> Dict[str, float]:
    """``<prefix>/<layer>/load_cv``, ``max_load`` and ``dropped_fraction`` of every layer of an
    :meth:`~gcvimoe.train.evaluate.ExpertUsage.summary`."""
    scalars = {}
    for name, layer in experts.items():
        counts = torch.tensor(layer["token_counts"], dtype=torch.float64)
        mean = float(counts.mean()) if counts.numel() else 0.0
        scalars[f"{prefix}/{name}/load_cv"] = float(counts.std(correction=0)) / mean if mean else 0.0
        scalars[f"{prefix}/{name}/max_load"] = float(counts.max()) / mean if mean else 0.0
        scalars[f"{prefix}/{name}/dropped_fraction"] = float(layer["dropped_fraction"])
    return scalars


class StepMeter:
    """One epoch's training sums, kept on the device and read (summed over the processes) only at log steps.

    Use it as a context manager: inside, the primary process draws its bar (on a terminal) and prints step lines.

    Args:
        model: The bare model; the token counts of its MoE layers are summed.
        info: The process group; every process must read at the same steps.
        num_batches: Micro-batches in the epoch (the same on every process).
        interval: Micro-batches between log steps (:func:`resolve_log_interval`).
        epoch: The epoch (0-based), for the lines.
        total_epochs: Epochs in the run, for the lines and the run's ETA.
    """

    def __init__(self, model: nn.Module, info: DistInfo, num_batches: int, interval: int, epoch: int,
                 total_epochs: int):
        self.info, self.num_batches, self.interval = info, num_batches, interval
        self.epoch, self.total_epochs = epoch, total_epochs
        self.layers = [(name, layer.num_experts) for name, layer in moe_layers(model)]
        # cross-entropy and aux loss (each times the batch size), images, then every layer's requested and kept tokens
        self.sums = torch.zeros(3 + 2 * sum(e for _, e in self.layers), dtype=torch.float64, device=info.device)
        self.totals = [0.0] * self.sums.numel()  # the sums over the processes at the last read
        self.step_losses = torch.zeros(num_batches, 2, device=info.device)  # this process's, per micro-batch
        self.step_lrs: List[float] = []
        self.batches_read = 0
        self.start = self.last_read = time.perf_counter()
        self.first_read: Optional[Tuple[float, int]] = None  # time and batches at the first read, for the ETA
        self.images_before = 0.0  # images a resumed epoch had trained on before this process started it
        self.bar = None

    def __enter__(self) -> 'StepMeter':
        if shows_bar(self.info):
            self.bar = tqdm(total=self.num_batches, desc=f"epoch {self.epoch + 1}/{self.total_epochs}", leave=False,
                            dynamic_ncols=True, file=sys.stderr)
            self._redirect = logging_redirect_tqdm([logging.getLogger("gcvimoe")])
        else:
            self._redirect = nullcontext()
        self._redirect.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._redirect.__exit__(*exc)
        if self.bar is not None:
            self.bar.close()

    def resume(self, start_batch: int, sums: List[List[float]], rank: int) -> None:
        """Continue an epoch saved after ``start_batch`` micro-batches: ``sums`` holds every process's sums then
        (:meth:`own_sums`, gathered), so the epoch's totals come out as if it had not stopped."""
        self.sums += torch.tensor(sums[rank], dtype=self.sums.dtype, device=self.sums.device)
        self.totals = [sum(values) for values in zip(*sums, strict=True)]
        self.images_before = self.totals[2]  # they took their time before the restart: no part of this throughput
        self.step_lrs = [math.nan] * start_batch
        self.batches_read = start_batch
        if self.bar is not None:
            self.bar.update(start_batch)

    def own_sums(self) -> List[float]:
        """This process's sums so far, for a checkpoint in the middle of the epoch (a copy from the device)."""
        return self.sums.tolist()

    def is_log_step(self, batch_idx: int) -> bool:
        return batch_idx in (0, self.num_batches - 1) or (batch_idx + 1) % self.interval == 0

    @property
    def loss_sum(self) -> torch.Tensor:
        """The epoch's summed losses so far, on the device (not finite once any step's loss was not)."""
        return self.sums[0] + self.sums[1]

    def update(self, ce_loss: torch.Tensor, aux_loss: torch.Tensor, batch_size: int, report: MoEReport, lr: float
               ) -> None:
        """Add one micro-batch and the LR after it; reads nothing from the device."""
        losses = torch.stack([ce_loss.detach().double(), aux_loss.detach().double()])
        self.step_losses[len(self.step_lrs)] = losses
        self.step_lrs.append(lr)
        losses = losses * batch_size
        parts = [losses, losses.new_full((1,), batch_size)]
        for name, num_experts in self.layers:
            stats = report.stats.get(name)
            if stats is None:
                parts.append(losses.new_zeros(2 * num_experts))
            else:
                parts += [stats.tokens_per_expert.detach().double(), stats.kept_tokens_per_expert.detach().double()]
        self.sums += torch.cat(parts)
        if self.bar is not None:
            self.bar.update()

    def _experts(self, values: List[float]) -> Dict[str, Dict[str, Any]]:
        out, offset = {}, 3
        for name, num_experts in self.layers:
            tokens, kept = values[offset:offset + num_experts], values[offset + num_experts:offset + 2 * num_experts]
            out[name] = expert_load(tokens, kept)
            offset += 2 * num_experts
        return out

    def _dropped(self, values: List[float]) -> float:
        requested = kept = 0.0
        offset = 3
        for _, num_experts in self.layers:
            requested += sum(values[offset:offset + num_experts])
            kept += sum(values[offset + num_experts:offset + 2 * num_experts])
            offset += 2 * num_experts
        return 1.0 - kept / requested if requested else 0.0

    def read(self, batch_idx: int) -> Tuple[Dict[str, float], Dict[str, Dict[str, Any]]]:
        """The micro-batches since the last read, over all processes (a collective), and print their line.

        Returns:
            ``loss``, ``aux_loss``, ``images_per_s``, ``dropped_fraction``; and each MoE layer's counts (in the form
            of :meth:`gcvimoe.train.evaluate.ExpertUsage.summary`).
        """
        lr = self.step_lrs[-1]
        totals = all_reduce_sum(self.sums.clone(), self.info).tolist()
        now = time.perf_counter()
        window = [total - previous for total, previous in zip(totals, self.totals, strict=True)]
        experts = self._experts(window)
        images = max(window[2], 1.0)
        record = {"loss": window[0] / images, "aux_loss": window[1] / images,
                  "images_per_s": window[2] / max(now - self.last_read, 1e-9),
                  "dropped_fraction": self._dropped(window)}
        self.totals, self.last_read, self.batches_read = totals, now, batch_idx + 1
        if self.info.is_primary:
            self._show(record, lr)
        if self.first_read is None:
            self.first_read = now, self.batches_read
        return record, experts

    def steps(self, first: int, last: int) -> List[Tuple[int, Dict[str, float]]]:
        """This process's micro-batches ``first`` to ``last`` (0-based, read already): their index and ``loss``,
        ``aux_loss`` and ``lr``. A copy from the device, after the sync of :meth:`read`."""
        losses = self.step_losses[first:last + 1].tolist()
        return [(first + i, {"loss": ce, "aux_loss": aux, "lr": self.step_lrs[first + i]})
                for i, (ce, aux) in enumerate(losses)]

    def _seconds_per_batch(self) -> float:
        # from the first read on, so that the first step's one-off costs (allocation, compilation) are left out
        start, batches = self.first_read if self.first_read is not None else (self.start, 0)
        return (self.last_read - start) / max(self.batches_read - batches, 1)

    def _show(self, record: Dict[str, float], lr: float) -> None:
        per_batch = self._seconds_per_batch()
        epoch_left = (self.num_batches - self.batches_read) * per_batch
        run_left = epoch_left + (self.total_epochs - self.epoch - 1) * self.num_batches * per_batch
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{record['loss']:.3f}", aux=f"{record['aux_loss']:.4f}",
                                 img_s=f"{record['images_per_s']:.0f}", lr=f"{lr:.2e}", refresh=False)
        _logger.info("step %*d/%d epoch %d/%d | loss %.4f aux %.4f | lr %.2e | dropped %.2f%% | %.0f img/s | "
                     "eta %s (run %s)", len(str(self.num_batches)), self.batches_read, self.num_batches,
                     self.epoch + 1, self.total_epochs, record["loss"], record["aux_loss"], lr,
                     100 * record["dropped_fraction"], record["images_per_s"], duration(epoch_left),
                     duration(run_left))

    def epoch_stats(self) -> Tuple[Dict[str, float], Dict[str, Dict[str, Any]]]:
        """The epoch over all processes, as of the last read (the epoch's last micro-batch is a log step)."""
        experts = self._experts(self.totals)
        images = max(self.totals[2], 1.0)
        stats = {"train_loss": self.totals[0] / images, "train_aux_loss": self.totals[1] / images,
                 "dropped_fraction": self._dropped(self.totals),
                 "images_per_s": (self.totals[2] - self.images_before) / max(self.last_read - self.start, 1e-9)}
        return stats, experts


@contextmanager
def log_to(output_dir: Path, info: DistInfo, append: bool):
    """Log to the console (primary process) and to ``output_dir/train.log`` inside the ``with`` block."""
    logger = logging.getLogger("gcvimoe")
    saved = logger.level, logger.propagate
    logger.setLevel(logging.INFO)
    logger.propagate = False
    handlers: List[logging.Handler] = []
    if info.is_primary:
        console = logging.StreamHandler(sys.stdout)
        console.setFormatter(logging.Formatter("%(message)s"))
        log_file = logging.FileHandler(output_dir / "train.log", mode="a" if append else "w")
        log_file.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S"))
        handlers = [console, log_file]
    for handler in handlers:
        logger.addHandler(handler)
    try:
        yield
    finally:
        for handler in handlers:
            logger.removeHandler(handler)
            handler.close()
        logger.setLevel(saved[0])
        logger.propagate = saved[1]
