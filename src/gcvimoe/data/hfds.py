"""Hugging Face datasets on this machine (``--dataset hfds:NAME``, timm's spelling): a folder written by
``datasets.save_to_disk``, or a dataset name already in the local cache. Nothing is ever downloaded.

The image column is the one with the ``Image`` feature, the label column the one with ``ClassLabel`` (whose names are
the classes); the splits are ``train`` and the first of ``validation``, ``val``, ``test``. Images are decoded by
:func:`gcvimoe.data.images.read_image` from their stored bytes, as a folder's files are.
"""
from pathlib import Path
from typing import Callable, Optional

import numpy as np
from torch.utils.data import Dataset

from gcvimoe.data.images import UnreadableImage, measure_images, read_image
from gcvimoe.data.sources import DataSource, Native, from_stats, image_mode, register_source
from gcvimoe.errors import GcvimoeError, first_line

VAL_SPLITS = ("validation", "val", "test")
MEASURED_SAMPLES = 256
INSTALL = "pip install 'gcvimoe[hf]'"


def _datasets():
    """The ``datasets`` package, offline. Set on its own config, not in the environment: the Hugging Face Hub stays
    online for the rest of the process (an ``hf-hub:`` initial checkpoint)."""
    try:
        import datasets
    except ImportError:
        raise GcvimoeError(f"--dataset hfds: needs the Hugging Face datasets package; {INSTALL}") from None
    datasets.config.HF_HUB_OFFLINE = datasets.config.HF_DATASETS_OFFLINE = True
    return datasets


def load_splits(name: str) -> dict:
    """``{'train': ..., 'val': ...}`` of a dataset saved to disk at ``name``, or cached under that name."""
    datasets = _datasets()
    missing = GcvimoeError(
        f"hfds:{name}: no dataset saved at {name} nor cached under that name (nothing was downloaded); save it once "
        f"with datasets.load_dataset(...).save_to_disk(DIR) and pass --dataset hfds:DIR")
    try:
        if Path(name).exists():
            loaded = datasets.load_from_disk(name)
        else:
            loaded = datasets.load_dataset(name, download_mode="reuse_cache_if_exists",
                                           download_config=datasets.DownloadConfig(local_files_only=True))
    except (FileNotFoundError, ConnectionError, ValueError, OSError) as e:
        if Path(name).exists():
            raise GcvimoeError(f"hfds:{name}: cannot read it ({first_line(e, 120)}); write it with "
                               "datasets' save_to_disk") from None
        raise missing from None
    if not isinstance(loaded, datasets.DatasetDict) or "train" not in loaded:
        raise GcvimoeError(f"hfds:{name} has no 'train' split; save a DatasetDict with train and validation splits")
    val = next((split for split in VAL_SPLITS if split in loaded), None)
    if val is None:
        raise GcvimoeError(f"hfds:{name} has no validation split ({', '.join(VAL_SPLITS)}); add one, e.g. with "
                           "train_test_split")
    return {"train": loaded["train"], "val": loaded[val]}


def columns(table, name: str):
    """The image and the label column, found by feature type."""
    datasets = _datasets()
    image = next((key for key, feature in table.features.items() if isinstance(feature, datasets.Image)), None)
    label = next((key for key, feature in table.features.items() if isinstance(feature, datasets.ClassLabel)), None)
    if image is None or label is None:
        raise GcvimoeError(f"hfds:{name} needs an Image column and a ClassLabel column, it has "
                           f"{dict(table.features)}; cast them with datasets' cast_column")
    return image, label


class HFImages(Dataset):
    """One split of a Hugging Face dataset as (image, label) pairs, images from their stored bytes."""

    def __init__(self, table, name: str, mode: str = "RGB", transform: Optional[Callable] = None):
        datasets = _datasets()
        image_column, label_column = columns(table, name)
        self.table = table.cast_column(image_column, datasets.Image(decode=False))
        self.image_column, self.name, self.mode, self.transform = image_column, name, mode, transform
        self.targets = list(table[label_column])
        self.classes = table.features[label_column].names

    def __len__(self) -> int:
        return len(self.targets)

    def image(self, index: int):
        stored = self.table[index][self.image_column]
        try:
            return read_image(stored["bytes"] if stored.get("bytes") else stored["path"], self.mode)
        except UnreadableImage as e:
            raise GcvimoeError(f"cannot read image {index} of hfds:{self.name} ({e}); fix or drop that row") from None

    def __getitem__(self, index: int):
        image = self.image(index)
        return (self.transform(image) if self.transform is not None else image), self.targets[index]


@register_source
class HFSource(DataSource):
    """``hfds:NAME``: a saved or cached Hugging Face dataset, map-style (the seeded sampler resumes it)."""
    name = "hfds"

    @staticmethod
    def _name(dataset: str) -> str:
        name = dataset.partition(":")[2]
        if not name:
            raise GcvimoeError("--dataset hfds:NAME needs NAME: a folder written by save_to_disk or a cached dataset")
        return name

    def resolve(self, dataset, data_dir, img_size, in_chans, notes):
        name = self._name(dataset)
        train = HFImages(load_splits(name)["train"], name)
        picked = np.random.default_rng(0).choice(len(train), min(MEASURED_SAMPLES, len(train)), replace=False)
        images = (train.image(int(index)) for index in sorted(picked))
        chans, size, mean, std = from_stats(measure_images(images, dataset), img_size, in_chans, notes)
        return Native(list(train.classes), chans, size, mean, std, "")

    def count(self, data_cfg, split="train"):
        return len(load_splits(self._name(data_cfg.dataset))[split])

    def build(self, data_cfg, split, transform=None, class_names=None, skip_unreadable=False,
              max_unreadable_fraction=None):
        name = self._name(data_cfg.dataset)
        return HFImages(load_splits(name)[split], name, image_mode(data_cfg), transform)
