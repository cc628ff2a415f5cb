"""What a run checks around its data and its output folder, so that neither fails hours in.

- Unreadable images of a folder dataset are skipped (:class:`gcvimoe.data.ImageFolder` replaces each by the next
  readable one), counted in the epoch line and listed in ``<output>/bad_files.txt``, one ``path<TAB>reason`` line
  each. The run stops with one line when more than ``max_bad_fraction`` of a split is unreadable, and at the first
  one with ``strict_data``. ``check_data`` decodes every image before the first step; a resumed run re-reads the
  images its ``bad_files.txt`` lists, so its counts and its list carry on.
- The output folder must be a writable folder with room for the checkpoints before the first step.
- A run still at chance after its warmup (top-1 near one over the classes, eval loss near ln(classes) or above) is
  told so once, with the likely fixes; it goes on, since some runs do leave chance late.
"""
import logging
import math
import os
import shutil
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Dict, Iterator, List, Tuple

from torch import nn
from torch.utils.data import Dataset

from gcvimoe.data import ImageFolder
from gcvimoe.data.images import UNREADABLE_REASONS, too_many_unreadable
from gcvimoe.errors import GcvimoeError
from gcvimoe.files import write_text
from gcvimoe.train.distributed import DistInfo, all_gather_objects

if TYPE_CHECKING:
    from gcvimoe.train.run import Run

_logger = logging.getLogger("gcvimoe.train")

BAD_FILES = "bad_files.txt"
_CODES = {reason: code for code, reason in UNREADABLE_REASONS.items()}
_LISTED = 20  # unreadable images named on the console by check_data; bad_files.txt has them all


def folder_datasets(run: "Run") -> List[Tuple[str, ImageFolder]]:
    """The run's image-folder datasets, named by split."""
    pairs = (("train", _unwrap(run.train_loader.dataset)), ("val", _unwrap(run.eval_loader.dataset)))
    return [(name, dataset) for name, dataset in pairs if isinstance(dataset, ImageFolder)]


def _unwrap(dataset):
    """The dataset inside wrappers that keep it as ``.dataset`` (the training loader's per-sample seeding)."""
    while not isinstance(dataset, ImageFolder) and isinstance(getattr(dataset, "dataset", None), Dataset):
        dataset = dataset.dataset
    return dataset


def _entries(dataset: ImageFolder, codes: Dict[int, int]) -> List[Tuple[str, str]]:
    return [(dataset.samples[index][0], UNREADABLE_REASONS[code]) for index, code in sorted(codes.items())]


def write_bad_files(run: "Run", entries: List[Tuple[str, str]]) -> None:
    """``bad_files.txt``: one ``path<TAB>reason`` line per unreadable image (written when there is any, or was)."""
    path = run.output_dir / BAD_FILES
    if run.info.is_primary and (entries or path.exists()):
        write_text(path, "".join(f"{file}\t{reason}\n" for file, reason in entries))


def collect_unreadable(run: "Run") -> int:
    """Gather every process's unreadable images, list them, and stop when a split has too many; returns the count.

    A collective: every process calls it at the same point and decides the same.
    """
    entries, counts = [], []
    for name, dataset in folder_datasets(run):
        merged = {index: code for part in all_gather_objects(dataset.unreadable_files(), run.info)
                  for index, code in part}
        for index, code in merged.items():
            dataset.unreadable[index] = code  # another process's finding spares this one the decoding
        entries += _entries(dataset, merged)
        counts.append((name, len(merged), len(dataset)))
    write_bad_files(run, entries)
    fraction = run.cfg.max_bad_fraction
    for name, count, total in counts:
        if count > fraction * total:
            raise too_many_unreadable(name, count, total, fraction, str(run.output_dir / BAD_FILES))
    return len(entries)


@contextmanager
def listing_unreadable_on_error(run: "Run") -> Iterator[None]:
    """When the block stops with an error (too many unreadable images, mid-epoch), list what this process found."""
    try:
        yield
    except GcvimoeError:
        write_bad_files(run, [entry for _, dataset in folder_datasets(run)
                              for entry in _entries(dataset, dict(dataset.unreadable_files()))])
        raise


def prepare_data(run: "Run", resumed: bool) -> None:
    """Before the first step: re-read the images a resumed run listed, and decode every image with ``check_data``."""
    datasets = folder_datasets(run)
    if not datasets or not (run.cfg.check_data or resumed):
        return
    if resumed:
        _recheck_listed(run, datasets)
    if run.cfg.check_data:
        progress = run.info.is_primary and sys.stderr.isatty()
        for _, dataset in datasets:
            dataset.check(range(run.info.rank, len(dataset), run.info.world_size), threads=max(1, run.cfg.workers),
                          progress=progress)
    found = {name: _entries(dataset, dict(dataset.unreadable_files())) for name, dataset in datasets}
    if run.cfg.strict_data and any(found.values()):
        file, reason = next(entry for entries in found.values() for entry in entries)
        raise GcvimoeError(f"cannot read image {file} ({reason}); replace or delete the file, or train without "
                           "--strict-data to skip unreadable images")
    count = collect_unreadable(run)
    if run.cfg.check_data:
        _log_check(run, datasets, count)


def _recheck_listed(run: "Run", datasets: List[Tuple[str, ImageFolder]]) -> None:
    path = run.output_dir / BAD_FILES
    if not path.is_file():
        return
    listed = {line.partition("\t")[0] for line in path.read_text().splitlines() if line.strip()}
    for _, dataset in datasets:
        indices = [index for index, (file, _) in enumerate(dataset.samples) if file in listed]
        dataset.check(indices[run.info.rank::run.info.world_size])


def _log_check(run: "Run", datasets: List[Tuple[str, ImageFolder]], count: int) -> None:
    totals = ", ".join(f"{int(dataset.unreadable.count_nonzero())} of {len(dataset)} {name}"
                       for name, dataset in datasets)
    if not count:
        _logger.info("check-data: every image is readable (%s unreadable)", totals)
        return
    _logger.info("check-data: unreadable images: %s; skipped in training, listed in %s", totals,
                 run.output_dir / BAD_FILES)
    entries = [entry for _, dataset in datasets for entry in _entries(dataset, dict(dataset.unreadable_files()))]
    for file, reason in entries[:_LISTED]:
        _logger.info("  %s (%s)", file, reason)
    if len(entries) > _LISTED:
        _logger.info("  ... and %d more", len(entries) - _LISTED)


def checkpoint_bytes(model: nn.Module, ema: bool, expert_copies: int = 1) -> int:
    """About the size of a training checkpoint of ``model``: the weights, two optimiser moments per parameter (Adam's;
    an upper bound for SGD's one), and the EMA weights. ``expert_copies``: processes the experts are sharded over
    (the checkpoint holds them all)."""
    total = sum(buffer.numel() * buffer.element_size() for buffer in model.buffers()) * (1 + ema)
    for param in model.parameters():
        copies = expert_copies if getattr(param, "is_expert", False) else 1
        total += param.numel() * param.element_size() * copies * (3 + ema)
    return total


def check_output_folder(output_dir: Path, needed_bytes: int, info: DistInfo) -> None:
    """The output folder is a writable folder with ``needed_bytes`` free (checked by the primary process, raised by
    every process so that none waits for the others in a collective)."""
    problem = _output_problem(Path(output_dir), needed_bytes) if info.is_primary else None
    problem = all_gather_objects(problem, info)[0]
    if problem:
        raise GcvimoeError(problem)


def _output_problem(output_dir: Path, needed_bytes: int):
    blocker = next((p for p in (output_dir, *output_dir.parents) if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        return f"--output {output_dir}: {blocker} is a file, not a folder; choose another --output"
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=output_dir, prefix=".write-test-"):
            pass
    except OSError as e:
        return f"cannot write to the output folder {output_dir} ({os.strerror(e.errno) if e.errno else e}); " \
               "choose a writable --output"
    free = shutil.disk_usage(output_dir).free
    if free < needed_bytes:
        return (f"the output folder {output_dir} has {free / 2**20:.0f} MiB free, the run needs about "
                f"{needed_bytes / 2**20:.0f} MiB for its checkpoints; free disk space or choose another --output")
    return None


CHANCE_TOP1_FACTOR = 1.5
"""Top-1 under this many times chance counts as chance (a model that learnt anything clears it)."""
CHANCE_LOSS_FRACTION = 0.9
"""Eval loss at or above this share of ln(classes) counts as chance (a uniform guess scores ln(classes))."""


def at_chance(eval_top1: float, eval_loss: float, num_classes: int) -> bool:
    """Whether an evaluation (top-1 in %) is what guessing would give."""
    return (num_classes > 1 and eval_top1 < CHANCE_TOP1_FACTOR * 100 / num_classes
            and eval_loss >= CHANCE_LOSS_FRACTION * math.log(num_classes))


def check_learning(row: Dict[str, float], warmup_epochs: float, num_classes: int, lr: float) -> None:
    """At the first epoch that ends after the warmup, one warning line when the run is still at chance."""
    epoch = int(row["epoch"])
    if epoch != max(1, math.ceil(warmup_epochs)) or not at_chance(row["eval_top1"], row["eval_loss"], num_classes):
        return
    _logger.warning("the model is not learning: after epoch %d (warmup %g epochs) it is still at chance (top-1 %.2f "
                    "%%, eval loss %.3f; guessing gives %.2f %% and %.3f); likely fixes: a lower --lr (now %g) or a "
                    "longer --warmup-epochs", epoch, warmup_epochs, row["eval_top1"], row["eval_loss"],
                    100 / num_classes, math.log(num_classes), lr)
