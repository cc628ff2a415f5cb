"""From a training config to datasets and timm transforms, through the dataset-source registry.

The data config (dataset, image size, channels, mean/std, class names) travels in every checkpoint, so evaluation and
prediction rebuild exactly the preprocessing the model was trained with.
"""
from typing import List, Optional, Sequence

from timm.data import create_transform
from torch.utils.data import Dataset
from torchvision import transforms

from gcvimoe.data.config import DataConfig, absolute_data_dir
from gcvimoe.data.sources import get_source


def resolve_data_config(
        dataset: str,
        data_dir: str = "",
        img_size: Optional[int] = None,
        in_chans: Optional[int] = None,
        interpolation: str = "bicubic",
        crop_pct: float = 0.875,
        notes: Optional[List[str]] = None,
) -> DataConfig:
    """Fill in the size, channels, normalisation and class names of a dataset, checking its layout.

    What is not given comes from the source (:meth:`~gcvimoe.data.sources.DataSource.resolve`): fixed for the
    built-in digits and Fashion-MNIST; for a folder, shards or a Hugging Face dataset, measured on a sample of the
    training images: one channel when every sampled image is grey, the input size from the median image side, and
    the mean and std.

    Args:
        dataset: A registered source (:func:`~gcvimoe.data.sources.source_names`), e.g. 'digits', 'folder', 'wds'
            or 'hfds:NAME'.
        data_dir: Where the source reads from (a folder, a shard pattern; optional for 'fashion-mnist').
        img_size: Model input size; None = from the data (32 for the built-in datasets).
        in_chans: Model input channels; None = from the data (1 for the built-in grey datasets).
        interpolation: Resize interpolation.
        crop_pct: Evaluation centre-crop fraction.
        notes: When given, a line per value taken from the data, saying why, is appended.
    """
    notes = notes if notes is not None else []
    native = get_source(dataset).resolve(dataset, data_dir, img_size, in_chans, notes)
    mean, std = native.mean, native.std
    in_chans = in_chans or native.in_chans
    if in_chans != len(mean):
        # grey statistics for RGB input and vice versa: average or repeat the dataset's own
        grey_mean, grey_std = sum(mean) / len(mean), sum(std) / len(std)
        mean, std = (grey_mean,) * in_chans, (grey_std,) * in_chans
    return DataConfig(
        dataset=dataset, data_dir=absolute_data_dir(str(native.data_dir or data_dir)),
        img_size=img_size or native.img_size, in_chans=in_chans, mean=tuple(mean), std=tuple(std),
        interpolation=interpolation, crop_pct=crop_pct, class_names=list(native.classes),
        data_dir_as_typed=str(data_dir or ""))


def train_image_count(data_cfg: DataConfig) -> int:
    """How many training images ``data_cfg`` has, decoding none where the source can."""
    return get_source(data_cfg.dataset).count(data_cfg, "train")


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
    if get_source(data_cfg.dataset).grey_images and data_cfg.in_chans == 3:
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
            :class:`~gcvimoe.data.folder.ImageFolder`); the other sources have none.
        max_unreadable_fraction: With ``skip_unreadable``, raise once more than this share of a folder's images is
            unreadable.
    """
    return get_source(data_cfg.dataset).build(data_cfg, split, transform, class_names, skip_unreadable,
                                              max_unreadable_fraction)
