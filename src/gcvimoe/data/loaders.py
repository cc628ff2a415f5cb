"""Loaders whose order and augmentation depend only on (seed, epoch): a run resumed mid-epoch sees the same images.

A map-style dataset gets a seeded sampler (:class:`ResumableSampler`) and per-sample seeds (:class:`SeededSamples`);
a stream dataset that brings its own loader (a ``create_loader`` method, as the tar shards do) keeps the same
contract: ``set_epoch(epoch, seed, rank, start_batch)`` then iterate, ``batches_per_epoch()`` for the whole epoch.
"""
import itertools
import random
from contextlib import contextmanager
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The random seed of one training sample: a function of (seed, epoch, its index in the split) alone."""
    return (seed * 1_000_003 + epoch * 1_000_033 + index) % (2 ** 63)


def seed_sample(value: int) -> None:
    """Seed Python's, NumPy's and torch's CPU generator (the CUDA streams stay untouched) for one sample."""
    random.seed(value)
    np.random.seed(value % (2 ** 32))
    torch.default_generator.manual_seed(value)


@contextmanager
def caller_rng_kept():
    """Restore the caller's random streams afterwards (per batch: per sample costs more than a small image)."""
    saved = random.getstate(), np.random.get_state(), torch.get_rng_state()
    try:
        yield
    finally:
        random.setstate(saved[0])
        np.random.set_state(saved[1])
        torch.set_rng_state(saved[2])


class SeededSamples(Dataset):
    """Each training sample augmented from its own random seed, a function of (seed, epoch, index) alone.

    So an image gets the same crop and flip whichever process or worker loads it and whatever was loaded before it:
    a run resumed in the middle of an epoch (see :func:`set_epoch`'s ``start_batch``) sees the same images as an
    uninterrupted one, also with worker processes. The caller's random streams are restored after each sample.
    """

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset, self.seed, self.epoch = dataset, seed, 0

    def __len__(self) -> int:
        return len(self.dataset)

    def __getattr__(self, name):  # the wrapped dataset's attributes (classes, targets, bad-file records, ...)
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __getitem__(self, index: int):
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: Sequence[int]) -> list:
        """A batch of samples (the DataLoader asks for whole batches): the caller's random streams are saved and
        restored once per batch, which costs more than decoding and augmenting a small image when done per
        sample; every sample is still drawn from its own seed alone."""
        samples = []
        with caller_rng_kept():
            for index in indices:
                seed_sample(sample_seed(self.seed, self.epoch, index))
                samples.append(self.dataset[index])
        return samples


class ResumableSampler(DistributedSampler):
    """A ``DistributedSampler`` that can start an epoch at a given batch, without loading the skipped images."""

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int, seed: int, batch_size: int):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.batch_size, self.start_batch = batch_size, 0

    def __iter__(self):
        return itertools.islice(super().__iter__(), self.start_batch * self.batch_size, None)

    def __len__(self) -> int:
        return max(super().__len__() - self.start_batch * self.batch_size, 0)


def create_loader(
        dataset: Dataset,
        batch_size: int,
        is_training: bool,
        workers: int = 0,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        pin_memory: bool = False,
) -> DataLoader:
    """A loader whose order and augmentation depend only on (seed, epoch): call :func:`set_epoch` each epoch.

    Training shards the shuffled data over ``world_size`` processes (a ``DistributedSampler``, also for one process),
    augments every sample from its own seed (:class:`SeededSamples`) and drops the last partial batch. Evaluation gives
    each process every ``world_size``-th image, in order and without padding, so summed metrics count every image
    exactly once. A dataset with a ``create_loader`` method (a stream of tar shards) builds its own, with the same
    arguments and contract.
    """
    own_loader = getattr(dataset, "create_loader", None)
    if own_loader is not None:
        return own_loader(batch_size, is_training, workers, rank, world_size, seed, pin_memory)
    generator = torch.Generator()
    if is_training:
        dataset = SeededSamples(dataset, seed)
        sampler = ResumableSampler(dataset, num_replicas=world_size, rank=rank, seed=seed, batch_size=batch_size)
    else:
        sampler = list(range(rank, len(dataset), world_size))
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        pin_memory=pin_memory,
        drop_last=is_training and len(sampler) >= batch_size,
        generator=generator,
        persistent_workers=False,
    )


def batches_per_epoch(loader: DataLoader) -> int:
    """Training batches of a whole epoch, wherever :func:`set_epoch` made this one start."""
    if hasattr(loader, "batches_per_epoch"):
        return loader.batches_per_epoch()
    sampler = loader.sampler
    if not isinstance(sampler, ResumableSampler):
        return len(loader)
    whole = DistributedSampler.__len__(sampler)
    return whole // loader.batch_size if loader.drop_last else -(-whole // loader.batch_size)


def set_epoch(loader: DataLoader, epoch: int, seed: int, rank: int = 0, start_batch: int = 0) -> None:
    """Fix this epoch's shuffling and augmentation from (seed, epoch, rank); with ``start_batch``, the epoch starts
    at that batch (a run resumed in the middle of an epoch)."""
    if hasattr(loader, "set_epoch"):
        return loader.set_epoch(epoch, seed, rank, start_batch)
    if isinstance(loader.sampler, DistributedSampler):
        loader.sampler.set_epoch(epoch)
    if isinstance(loader.sampler, ResumableSampler):
        loader.sampler.start_batch = start_batch
    if isinstance(loader.dataset, SeededSamples):
        loader.dataset.epoch = epoch
    loader.generator.manual_seed(seed * 1_000_003 + epoch * 1009 + rank)
