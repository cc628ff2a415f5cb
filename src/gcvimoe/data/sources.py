"""The dataset-source registry: one small object per kind of data, registered by name.

A source resolves its part of the :class:`~gcvimoe.data.config.DataConfig` (classes, native size and channels,
normalisation), counts images, builds a split and its loader, and tells the run's defaults what they need. Adding a
dataset is a class with ``@register_source`` and nothing else: no code outside this registry compares dataset names.

    @register_source
    class Squares(DataSource):
        name = "squares"
        def resolve(self, dataset, data_dir, img_size, in_chans, notes):
            return Native(["a", "b"], 1, 32, (0.5,), (0.25,))
        def build(self, data_cfg, split, transform, **options):
            return SquaresDataset(split, transform)

A name with an argument (``hfds:NAME``) is looked up by the part before the colon.
"""
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from torch.utils.data import Dataset

from gcvimoe.data.config import MAX_DERIVED_SIZE, SMALL_DATASETS_SIZE, DataConfig, derived_img_size
from gcvimoe.data.digits import DIGITS_CLASSES, DIGITS_MEAN, DIGITS_STD, DigitsDataset
from gcvimoe.data.fashion_mnist import (
    FASHION_MNIST_CLASSES, FASHION_MNIST_MEAN, FASHION_MNIST_STD, FashionMNIST, fashion_mnist_dir)
from gcvimoe.data.folder import (
    ImageFolder, check_split_dir, count_images, find_classes, is_class_folder, measure_folder)
from gcvimoe.data.images import ImageStats, list_images
from gcvimoe.errors import GcvimoeError


@dataclass
class Native:
    """What a source says about its data before the user's choices: the classes, the native channels and size, the
    per-channel mean and std, and the ``data_dir`` it settled on."""
    classes: List[str]
    in_chans: int
    img_size: int
    mean: Tuple[float, ...]
    std: Tuple[float, ...]
    data_dir: str = ""


class DataSource:
    """One kind of dataset. Subclasses set ``name`` and implement :meth:`resolve` and :meth:`build`.

    Attributes:
        name: The ``--dataset`` name it is registered under.
        in_memory: The images are arrays in memory: loader processes cost more than they save (workers default 0).
        mirror_symmetric: A mirrored image is the same class (the hflip default: 0.5, else 0); None: the images
            decide (:mod:`gcvimoe.data.flip_probe`).
        grey_images: Its images are always 'L', so an RGB model gets the grey channel three times.
        fixed_classes: Labels are indices into its own classes: evaluating a model on it needs the same class list
            (a folder instead labels by class folder name, so any subset of the training classes will do).
    """
    name = ""
    in_memory = False
    mirror_symmetric: Optional[bool] = None
    grey_images = False
    fixed_classes = True

    def claims(self, data_dir: str) -> bool:
        """Whether a ``--data-dir`` given without ``--dataset`` is this source's data."""
        return False

    def resolve(self, dataset: str, data_dir: str, img_size: Optional[int], in_chans: Optional[int],
                notes: List[str]) -> Native:
        """Check the data and say what it is; append a line to ``notes`` per value taken from the data."""
        raise NotImplementedError

    def count(self, data_cfg: DataConfig, split: str = "train") -> int:
        """Images of a split, decoding none where the source can."""
        return len(self.build(data_cfg, split))

    def build(self, data_cfg: DataConfig, split: str, transform: Optional[Callable] = None,
              class_names: Optional[Sequence[str]] = None, skip_unreadable: bool = False,
              max_unreadable_fraction: Optional[float] = None) -> Dataset:
        """The 'train' or 'val' split. A map-style dataset resumes mid-epoch through the seeded sampler of
        :func:`gcvimoe.data.loaders.create_loader`; a stream brings its own loader (``create_loader`` method) whose
        ``set_epoch(epoch, seed, rank, start_batch)`` continues an epoch at a batch, the same contract."""
        raise NotImplementedError


_SOURCES: Dict[str, DataSource] = {}


def register_source(cls):
    """Class decorator: register an instance of a :class:`DataSource` subclass under its ``name``."""
    if not cls.name or ":" in cls.name:
        raise ValueError(f"a data source needs a name without ':', not {cls.name!r}")
    _SOURCES[cls.name] = cls()
    return cls


def source_names() -> List[str]:
    """The registered names, in registration order."""
    return list(_SOURCES)


def get_source(dataset: str) -> DataSource:
    """The source of a ``--dataset`` value (``hfds:NAME`` by ``hfds``); an unknown name is a one-line error."""
    source = _SOURCES.get(dataset.split(":", 1)[0])
    if source is None:
        raise GcvimoeError(f"unknown dataset '{dataset}'; use one of {', '.join(source_names())} or --data-dir DIR")
    return source


def default_dataset(data_dir: str) -> str:
    """The dataset when only ``data_dir`` is given: the source that claims it, else a folder; digits when neither is
    given."""
    if not data_dir:
        return DigitsSource.name
    return next((name for name, source in _SOURCES.items() if source.claims(data_dir)), FolderSource.name)


def dataset_for_dir(trained: str, data_dir: str) -> str:
    """The dataset to evaluate a model trained on ``trained`` with another ``data_dir``: the same source when it
    claims that folder, else :func:`default_dataset`."""
    source = _SOURCES.get(trained.split(":", 1)[0])
    return trained if source is not None and source.claims(data_dir) else default_dataset(data_dir)


def from_stats(stats: ImageStats, img_size: Optional[int], in_chans: Optional[int], notes: List[str]):
    """Channels, size, mean and std of sampled images; ``notes`` says what was chosen and why."""
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
    return chans, size, tuple(mean), tuple(std)


def image_mode(data_cfg: DataConfig) -> str:
    """The PIL mode a source decodes into for ``data_cfg``'s channels."""
    return "L" if data_cfg.in_chans == 1 else "RGB"


@register_source
class DigitsSource(DataSource):
    """scikit-learn's embedded digits (:mod:`gcvimoe.data.digits`)."""
    name, in_memory, mirror_symmetric, grey_images = "digits", True, False, True

    def resolve(self, dataset, data_dir, img_size, in_chans, notes):
        return Native(list(DIGITS_CLASSES), 1, SMALL_DATASETS_SIZE, DIGITS_MEAN, DIGITS_STD)

    def count(self, data_cfg, split="train"):
        return 1437 if split == "train" else 360

    def build(self, data_cfg, split, transform=None, class_names=None, skip_unreadable=False,
              max_unreadable_fraction=None):
        return DigitsDataset(split, transform=transform)


@register_source
class FashionMNISTSource(DataSource):
    """Fashion-MNIST's IDX files (:mod:`gcvimoe.data.fashion_mnist`)."""
    name, in_memory, grey_images = "fashion-mnist", True, True

    def claims(self, data_dir):
        return any((Path(data_dir) / f"{prefix}-images-idx3-ubyte{gz}").is_file()
                   for prefix in ("train", "t10k") for gz in ("", ".gz"))

    def resolve(self, dataset, data_dir, img_size, in_chans, notes):
        return Native(list(FASHION_MNIST_CLASSES), 1, SMALL_DATASETS_SIZE, FASHION_MNIST_MEAN, FASHION_MNIST_STD,
                      str(fashion_mnist_dir(data_dir)))

    def count(self, data_cfg, split="train"):
        return 60000 if split == "train" else 10000

    def build(self, data_cfg, split, transform=None, class_names=None, skip_unreadable=False,
              max_unreadable_fraction=None):
        return FashionMNIST(data_cfg.data_dir, split, transform=transform)


@register_source
class FolderSource(DataSource):
    """ImageNet-style class folders (:mod:`gcvimoe.data.folder`): statistics measured on a sample, unreadable images
    skipped and listed. It claims no ``--data-dir``: it is what one is when no other source claims it."""
    name, fixed_classes = "folder", False

    def resolve(self, dataset, data_dir, img_size, in_chans, notes):
        if not data_dir:
            raise GcvimoeError("dataset 'folder' needs --data-dir DIR with train/ and val/ class folders")
        classes = find_classes(check_split_dir(data_dir, "train"))
        check_split_dir(data_dir, "val")
        chans, size, mean, std = from_stats(measure_folder(data_dir), img_size, in_chans, notes)
        return Native(classes, chans, size, mean, std, data_dir)

    def count(self, data_cfg, split="train"):
        return count_images(data_cfg.data_dir, split)

    def build(self, data_cfg, split, transform=None, class_names=None, skip_unreadable=False,
              max_unreadable_fraction=None):
        classes = class_names if class_names is not None else data_cfg.class_names
        return ImageFolder(data_cfg.data_dir, split, classes=classes, mode=image_mode(data_cfg), transform=transform,
                           skip_unreadable=skip_unreadable, max_unreadable_fraction=max_unreadable_fraction)


@register_source
class ClassFoldersSource(DataSource):
    """One folder of class folders (``DIR/<class>/<image>``, as ``DIR/val`` of a dataset folder): data to evaluate
    or predict on, as timm's validate.py reads one. Training needs a folder with ``train/`` and ``val/``."""
    name, fixed_classes = "classes", False

    def claims(self, data_dir):
        return is_class_folder(data_dir)

    def resolve(self, dataset, data_dir, img_size, in_chans, notes):
        if not data_dir or not is_class_folder(data_dir):
            raise GcvimoeError(f"dataset 'classes' needs --data-dir DIR with DIR/<class>/<image>, got "
                               f"{data_dir or 'none'}")
        chans, size, mean, std = from_stats(measure_folder(data_dir, split=None), img_size, in_chans, notes)
        return Native(find_classes(data_dir), chans, size, mean, std, data_dir)

    def count(self, data_cfg, split="train"):
        return len(list_images(data_cfg.data_dir))

    def build(self, data_cfg, split, transform=None, class_names=None, skip_unreadable=False,
              max_unreadable_fraction=None):
        if split == "train":
            raise GcvimoeError(f"{data_cfg.data_dir} is one folder of class folders, which validate and predict read "
                               f"as it is; to train, give a folder with train/ and val/ class folders")
        classes = class_names if class_names is not None else data_cfg.class_names
        return ImageFolder(data_cfg.data_dir, None, classes=classes, mode=image_mode(data_cfg), transform=transform,
                           skip_unreadable=skip_unreadable, max_unreadable_fraction=max_unreadable_fraction)
