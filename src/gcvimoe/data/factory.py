"""From a training config to datasets, timm transforms and data loaders.

The data config (dataset, image size, channels, mean/std, class names) travels in every checkpoint, so evaluation and
prediction rebuild exactly the preprocessing the model was trained with.
"""
import itertools
import random
from dataclasses import asdict, dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from timm.data import create_transform
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from torchvision import transforms

from gcvimoe.data.digits import DIGITS_CLASSES, DIGITS_MEAN, DIGITS_STD, DigitsDataset
from gcvimoe.data.fashion_mnist import (
    FASHION_MNIST_CLASSES, FASHION_MNIST_MEAN, FASHION_MNIST_STD, FashionMNIST, fashion_mnist_dir)
from gcvimoe.data.folder import ImageFolder, check_split_dir, count_images, find_classes, measure_folder
from gcvimoe.errors import GcvimoeError


@dataclass
class DataConfig:
    """What a model needs to know about its input: saved in checkpoints, used by validate and predict."""
    dataset: str
    data_dir: str
    img_size: int
    in_chans: int
    mean: Tuple[float, ...]
    std: Tuple[float, ...]
    interpolation: str
    crop_pct: float
    class_names: List[str]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def to_dict(self) -> Dict[str, Any]:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "DataConfig":
        d = dict(d)
        d["mean"], d["std"] = tuple(d["mean"]), tuple(d["std"])
        return cls(**d)


DIGITS_TRAIN_IMAGES, FASHION_MNIST_TRAIN_IMAGES = 1437, 60000
SMALL_DATASETS_SIZE = 32  # the embedded digits and Fashion-MNIST are read at 32 px (a multiple of GC ViT's 32)
MAX_DERIVED_SIZE = 224


def derived_img_size(median_side: int) -> int:
    """The input size a folder's images suggest: their median shorter side rounded up to GC ViT's multiple of 32,
    at most 224 (ImageNet's; larger images are downscaled as timm's recipes do)."""
    return min(max(32, -(-median_side // 32) * 32), MAX_DERIVED_SIZE)


def resolve_data_config(  # noqa: PLR0913  (the data keys of the training config)
        dataset: str,
        data_dir: str = "",
        img_size: Optional[int] = None,
        in_chans: Optional[int] = None,
        interpolation: str = "bicubic",
        crop_pct: float = 0.875,
        notes: Optional[List[str]] = None,
) -> DataConfig:
    """Fill in the size, channels, normalisation and class names of a dataset, checking a folder's layout.

    For a folder, what is not given comes from the data (:func:`~gcvimoe.data.folder.measure_folder` on a sample of
    the training images): one channel when every sampled image is grey, the input size from the median image side,
    and the mean and std measured on the sample.

    Args:
        dataset: 'digits', 'fashion-mnist' or 'folder'.
        data_dir: The folder (required for 'folder', optional for 'fashion-mnist').
        img_size: Model input size; None = from the data (32 for the built-in datasets).
        in_chans: Model input channels; None = from the data (1 for the built-in grey datasets).
        interpolation: Resize interpolation.
        crop_pct: Evaluation centre-crop fraction.
        notes: When given, a line per value taken from the data, saying why, is appended.
    """
    notes = notes if notes is not None else []
    if dataset == "digits":
        classes, native_chans, mean, std = list(DIGITS_CLASSES), 1, DIGITS_MEAN, DIGITS_STD
        native_size = SMALL_DATASETS_SIZE
    elif dataset == "fashion-mnist":
        classes, native_chans, mean, std = list(FASHION_MNIST_CLASSES), 1, FASHION_MNIST_MEAN, FASHION_MNIST_STD
        data_dir, native_size = str(fashion_mnist_dir(data_dir)), SMALL_DATASETS_SIZE
    elif dataset == "folder":
        if not data_dir:
            raise GcvimoeError("dataset 'folder' needs --data-dir DIR with train/ and val/ class folders")
        classes = find_classes(check_split_dir(data_dir, "train"))
        check_split_dir(data_dir, "val")
        native_chans, native_size, mean, std = _from_folder(data_dir, img_size, in_chans, notes)
    else:
        raise GcvimoeError(f"unknown dataset '{dataset}'; use digits, fashion-mnist or --data-dir DIR")
    in_chans = in_chans or native_chans
    if in_chans != len(mean):
        # grey statistics for RGB input and vice versa: average or repeat the dataset's own
        grey_mean, grey_std = sum(mean) / len(mean), sum(std) / len(std)
        mean, std = (grey_mean,) * in_chans, (grey_std,) * in_chans
    return DataConfig(
        dataset=dataset, data_dir=str(data_dir), img_size=img_size or native_size, in_chans=in_chans,
        mean=tuple(mean), std=tuple(std), interpolation=interpolation, crop_pct=crop_pct, class_names=classes)


def _from_folder(data_dir, img_size: Optional[int], in_chans: Optional[int], notes: List[str]):
    """Channels, size, mean and std of a folder dataset, measured on a sample; ``notes`` says what was chosen."""
    stats = measure_folder(data_dir)
    chans = 1 if stats.grey else 3
    mean, std = (stats.mean[:1], stats.std[:1]) if stats.grey else (stats.mean, stats.std)
    if in_chans is None:
        notes.append(f"in_chans {chans} (from the data: {'every' if stats.grey else 'not every'} one of "
                     f"{stats.sampled} sampled images is grey)")
    size = derived_img_size(stats.median_side)
    if img_size is None:
        notes.append(f"img_size {size} (from the data: median image side {stats.median_side} px, rounded up to a "
                     f"multiple of 32, at most {MAX_DERIVED_SIZE})")
    notes.append("mean " + ", ".join(f"{m:.4f}" for m in mean) + ", std " + ", ".join(f"{s:.4f}" for s in std)
                 + f" (from the data: measured on {stats.sampled} sampled training images)")
    return chans, size, mean, std


def train_image_count(data_cfg: DataConfig) -> int:
    """How many training images ``data_cfg`` has, without decoding any."""
    if data_cfg.dataset == "digits":
        return DIGITS_TRAIN_IMAGES
    if data_cfg.dataset == "fashion-mnist":
        return FASHION_MNIST_TRAIN_IMAGES
    return count_images(data_cfg.data_dir, "train")


def build_transform(data_cfg: DataConfig, is_training: bool = False, **aug):
    """timm's train or eval transform for ``data_cfg``, with a channel conversion in front when needed.

    Args:
        data_cfg: The data config.
        is_training: Random-resized crop, flips, jitter, auto-augment and random erasing when True.
        **aug: Keyword arguments of :func:`timm.data.create_transform` (``scale``, ``hflip``, ``re_prob``, ...).
    """
    timm_transform = create_transform(
        input_size=(data_cfg.in_chans, data_cfg.img_size, data_cfg.img_size),
        is_training=is_training,
        interpolation=data_cfg.interpolation,
        mean=data_cfg.mean,
        std=data_cfg.std,
        crop_pct=data_cfg.crop_pct,
        **(aug if is_training else {}),
    )
    if data_cfg.dataset != "folder" and data_cfg.in_chans == 3:
        # the grey datasets yield 'L' images; an RGB model gets the grey channel three times
        return transforms.Compose([transforms.Grayscale(num_output_channels=3), timm_transform])
    return timm_transform


def create_dataset(
        data_cfg: DataConfig,
        split: str,
        transform=None,
        class_names: Optional[Sequence[str]] = None,
        skip_unreadable: bool = False,
        max_unreadable_fraction: Optional[float] = None,
) -> Dataset:
    """The 'train' or 'val' split of ``data_cfg.dataset``.

    Args:
        data_cfg: The data config.
        split: 'train' or 'val'.
        transform: Applied to each PIL image.
        class_names: Label order for a folder (default: ``data_cfg.class_names``, the training classes).
        skip_unreadable: A folder's unreadable images are recorded and skipped instead of raising (see
            :class:`~gcvimoe.data.folder.ImageFolder`); the built-in datasets have none.
        max_unreadable_fraction: With ``skip_unreadable``, raise once more than this share of a folder's images is
            unreadable.
    """
    if data_cfg.dataset == "digits":
        return DigitsDataset(split, transform=transform)
    if data_cfg.dataset == "fashion-mnist":
        return FashionMNIST(data_cfg.data_dir, split, transform=transform)
    mode = "L" if data_cfg.in_chans == 1 else "RGB"
    classes = class_names if class_names is not None else data_cfg.class_names
    return ImageFolder(data_cfg.data_dir, split, classes=classes, mode=mode, transform=transform,
                       skip_unreadable=skip_unreadable, max_unreadable_fraction=max_unreadable_fraction)


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
        saved = random.getstate(), np.random.get_state(), torch.get_rng_state()
        try:
            samples = []
            for index in indices:
                sample_seed = (self.seed * 1_000_003 + self.epoch * 1_000_033 + index) % (2 ** 63)
                random.seed(sample_seed)
                np.random.seed(sample_seed % (2 ** 32))
                torch.default_generator.manual_seed(sample_seed)  # the CPU generator only: CUDA streams stay untouched
                samples.append(self.dataset[index])
            return samples
        finally:
            random.setstate(saved[0])
            np.random.set_state(saved[1])
            torch.set_rng_state(saved[2])


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
    exactly once.
    """
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
    sampler = loader.sampler
    if not isinstance(sampler, ResumableSampler):
        return len(loader)
    whole = DistributedSampler.__len__(sampler)
    return whole // loader.batch_size if loader.drop_last else -(-whole // loader.batch_size)


def set_epoch(loader: DataLoader, epoch: int, seed: int, rank: int = 0, start_batch: int = 0) -> None:
    """Fix this epoch's shuffling and augmentation from (seed, epoch, rank); with ``start_batch``, the epoch starts
    at that batch (a run resumed in the middle of an epoch)."""
    if isinstance(loader.sampler, DistributedSampler):
        loader.sampler.set_epoch(epoch)
    if isinstance(loader.sampler, ResumableSampler):
        loader.sampler.start_batch = start_batch
    if isinstance(loader.dataset, SeededSamples):
        loader.dataset.epoch = epoch
    loader.generator.manual_seed(seed * 1_000_003 + epoch * 1009 + rank)
