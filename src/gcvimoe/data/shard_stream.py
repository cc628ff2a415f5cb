"""Streaming tar shards: an epoch's order as a pure function of (seed, epoch, rank, processes, loader workers).

Each epoch the shards are shuffled from (seed, epoch) and dealt to ``processes x workers`` slots without overlap: slot
``rank * workers + worker`` takes every ``processes * workers``-th shard. A worker reads its shards in turn through a
seeded shuffle buffer and batches them itself; the ``DataLoader`` takes one batch from each worker in turn, skipping
a worker that has finished. Every shard's sample count is known (``_info.json``), so each worker's batch count, and
so the loader's whole sequence of batches, is known before a file is read.

Resuming mid-epoch uses a state of our own, not torchdata's ``StatefulDataLoader``: the checkpoint already records
(epoch, batch) for the folder sources, and from it :func:`worker_progress` tells how many batches each worker had
given and which worker was next. The resumed loader's workers take those roles, rotated so the next one comes first,
skip their given batches undecoded (reading bytes only) and continue: the same batches, bitwise, with no loader state
in the checkpoint and no special case in the trainer. The order depends on the number of loader workers, so a
resumed run keeps the run's ``--workers``.

Training gives every worker of every process the same number of batches in every epoch (DDP needs equal counts
over processes, the trainer one count per epoch): the full batches of the fewest samples a worker can be dealt, the
smallest shards; a worker's samples beyond them are left out of this epoch (others in another: the deal and the
shuffle change). Evaluation keeps every sample exactly once.
"""
import itertools
import random
import zlib
from dataclasses import dataclass
from typing import Callable, Iterator, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from torch.utils.data._utils.collate import default_collate

from gcvimoe.data.images import UnreadableImage, is_image_name, read_image
from gcvimoe.data.loaders import caller_rng_kept, sample_seed, seed_sample
from gcvimoe.errors import GcvimoeError

SHUFFLE_BUFFER = 1000  # samples held per worker (undecoded bytes) to shuffle within its shards


@dataclass(frozen=True)
class Shard:
    path: str
    length: int


class Sample(NamedTuple):
    """One undecoded sample: its key, image bytes and label, and the shard it came from."""
    key: str
    image: bytes
    label: int
    shard: str


def _sample(raw: dict) -> Sample:
    image = next((value for name, value in raw.items() if is_image_name("x." + name)), None)
    if image is None or "cls" not in raw:
        raise GcvimoeError(f"sample {raw['__key__']} of {raw.get('__url__')} has no image or no .cls label; write "
                           "the shards with `gcvimoe convert shards`")
    return Sample(raw["__key__"], image, int(raw["cls"]), raw.get("__url__", ""))


def shard_samples(shards: Sequence[Shard], limit: Optional[int] = None) -> Iterator[Sample]:
    """The samples of ``shards`` in file order, undecoded (read with ``webdataset``)."""
    from webdataset.tariterators import tarfile_samples

    samples = (_sample(raw) for raw in tarfile_samples({"url": shard.path} for shard in shards))
    return itertools.islice(samples, limit)


def buffer_shuffle(samples: Iterator, size: int, rng: random.Random) -> Iterator:
    """webdataset's shuffle buffer with a generator of our own: fill ``size`` samples, then give a random one and
    put the next in its place."""
    buffer: List = []
    for sample in samples:
        if len(buffer) < size:
            buffer.append(sample)
            continue
        index = rng.randrange(size)
        yield buffer[index]
        buffer[index] = sample
    rng.shuffle(buffer)
    yield from buffer


def deal_shards(shards: Sequence[Shard], seed: int, epoch: int, shuffle: bool, world_size: int, workers: int
                ) -> List[List[List[Shard]]]:
    """``[rank][worker]`` the shards of each slot this epoch: shuffled from (seed, epoch) when ``shuffle``, then
    every ``world_size * workers``-th one, so no two slots share a shard."""
    order = list(shards)
    if shuffle:
        order = [order[i] for i in np.random.default_rng((seed, epoch)).permutation(len(order))]
    slots = world_size * workers
    return [[order[rank * workers + worker::slots] for worker in range(workers)] for rank in range(world_size)]


def worker_progress(counts: Sequence[int], start_batch: int) -> Tuple[List[int], int]:
    """After ``start_batch`` batches taken from the workers in turn (a finished worker is skipped), how many each
    worker gave, and which worker gives the next."""
    given, worker = [0] * len(counts), 0
    for taken in range(min(start_batch, sum(counts)) + 1):
        while given[worker] >= counts[worker] and taken < sum(counts):
            worker = (worker + 1) % len(counts)
        if taken == start_batch:
            return given, worker
        given[worker] += 1
        worker = (worker + 1) % len(counts)
    return given, worker


@dataclass
class WorkerTask:
    """What one loader worker reads: its shards, the batches to skip and to give, and its seeds."""
    shards: List[Shard]
    skip: int
    batches: int
    batch_size: int
    shuffle_seed: Optional[int]  # None: in order, without augmentation seeds (evaluation)
    seed: int = 0
    epoch: int = 0


class ShardStream(IterableDataset):
    """A split's shards as an iterable dataset of batches; :meth:`create_loader` makes the loader that plans them.

    Args:
        shards: The split's shards, with their sample counts.
        mode: PIL mode the images are decoded into, 'RGB' or 'L'.
        transform: Applied to each PIL image.
    """

    def __init__(self, shards: Sequence[Shard], mode: str = "RGB", transform: Optional[Callable] = None):
        self.shards, self.mode, self.transform = list(shards), mode, transform
        self.tasks: List[WorkerTask] = []

    def __len__(self) -> int:
        return sum(shard.length for shard in self.shards)

    @property
    def targets(self) -> List[int]:
        """Every sample's label, in file order (one pass over the shards, reading no image)."""
        return [sample.label for sample in shard_samples(self.shards)]

    def __getitem__(self, index: int):
        """One sample by position, read through the shards up to it: for a few example images (``visualize``, an
        evaluation's stand-in batch), not for training."""
        sample = next(itertools.islice(shard_samples(self.shards), index, None))
        return self._decode(sample), sample.label

    def __iter__(self):
        info = get_worker_info()
        return self.batches(self.tasks[info.id if info is not None else 0])

    def batches(self, task: WorkerTask) -> Iterator:
        samples = shard_samples(task.shards)
        if task.shuffle_seed is not None:
            samples = buffer_shuffle(samples, SHUFFLE_BUFFER, random.Random(task.shuffle_seed))
        samples = itertools.islice(samples, task.skip * task.batch_size, task.batches * task.batch_size)
        given = task.skip
        while chunk := list(itertools.islice(samples, task.batch_size)):
            with caller_rng_kept():  # restored before the batch is handed over (without workers: to the trainer)
                batch = default_collate([self._item(sample, task) for sample in chunk])
            yield batch
            given += 1
        if given < task.batches:
            raise GcvimoeError(f"the shards {task.shards[0].path}, ... hold fewer samples than _info.json records; "
                               "write them again with `gcvimoe convert shards`")

    def _item(self, sample: Sample, task: WorkerTask):
        if task.shuffle_seed is not None:
            index = int(sample.key) if sample.key.isdigit() else zlib.crc32(sample.key.encode())
            seed_sample(sample_seed(task.seed, task.epoch, index))
        return self._decode(sample), sample.label

    def _decode(self, sample: Sample):
        try:
            image = read_image(sample.image, self.mode)
        except UnreadableImage as e:
            raise GcvimoeError(f"cannot read sample {sample.key} of {sample.shard} ({e}); write the shards again "
                               "from readable images") from None
        return self.transform(image) if self.transform is not None else image

    def create_loader(self, batch_size: int, is_training: bool, workers: int = 0, rank: int = 0,
                      world_size: int = 1, seed: int = 0, pin_memory: bool = False) -> "ShardLoader":
        return ShardLoader(self, batch_size, is_training, workers, rank, world_size, seed, pin_memory)


class ShardLoader:
    """Batches of a :class:`ShardStream` for one process; call :meth:`set_epoch` each epoch (see the module)."""

    def __init__(self, stream: ShardStream, batch_size: int, is_training: bool, workers: int, rank: int,
                 world_size: int, seed: int, pin_memory: bool):
        slots = world_size * max(workers, 1)
        if is_training and len(stream.shards) < slots:
            raise GcvimoeError(f"{len(stream.shards)} training shards cannot feed {world_size} process(es) x "
                               f"{max(workers, 1)} loader worker(s); lower --workers or write at least {slots} shards "
                               "(`gcvimoe convert shards --images-per-shard N`)")
        self.dataset, self.batch_size, self.drop_last = stream, batch_size, is_training
        self.workers, self.rank, self.world_size, self.seed = workers, rank, world_size, seed
        self.pin_memory, self.epoch, self.start_batch = pin_memory, 0, 0

    def set_epoch(self, epoch: int, seed: int, rank: int = 0, start_batch: int = 0) -> None:
        self.epoch, self.seed, self.start_batch = epoch, seed, start_batch

    def _slots(self) -> List[List[Shard]]:
        """This process's shards per worker this epoch."""
        return deal_shards(self.dataset.shards, self.seed, self.epoch, self.drop_last, self.world_size,
                           max(self.workers, 1))[self.rank]

    def _counts(self) -> List[int]:
        """Batches of each of this process's workers this epoch. Training: the same for every worker of every
        process and every epoch, the full batches of the fewest samples any slot can be dealt (the smallest shards);
        evaluation: all of the slot's samples."""
        if not self.drop_last:
            return [-(-sum(shard.length for shard in slot) // self.batch_size) for slot in self._slots()]
        workers = max(self.workers, 1)
        fewest = sorted(shard.length for shard in self.dataset.shards)[:len(self.dataset.shards) // (self.world_size
                                                                                                       * workers)]
        return [sum(fewest) // self.batch_size] * workers

    def batches_per_epoch(self) -> int:
        return sum(self._counts())

    def __len__(self) -> int:
        return max(self.batches_per_epoch() - self.start_batch, 0)

    def plan(self) -> List[WorkerTask]:
        """This process's worker tasks for the epoch from ``start_batch`` on, rotated so the next worker is first."""
        workers, slots, counts = max(self.workers, 1), self._slots(), self._counts()
        given, first = worker_progress(counts, self.start_batch)
        tasks = []
        for position in range(workers):
            role = (first + position) % workers
            shuffle_seed = (self.seed * 1_000_003 + self.epoch * 1009 + self.rank * workers + role
                            if self.drop_last else None)
            tasks.append(WorkerTask(slots[role], given[role], counts[role], self.batch_size, shuffle_seed,
                                    self.seed, self.epoch))
        return tasks

    def __iter__(self):
        self.dataset.tasks = self.plan()
        # a generator of its own: the loader's base seed would otherwise be drawn from the caller's stream
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch * 1009 + self.rank)
        loader = DataLoader(self.dataset, batch_size=None, num_workers=self.workers, pin_memory=self.pin_memory,
                            generator=generator)
        return itertools.islice(iter(loader), len(self))
