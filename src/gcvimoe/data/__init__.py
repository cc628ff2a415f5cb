"""Datasets and loaders behind one registry of sources: the embedded digits, Fashion-MNIST IDX files, ImageNet-style
image folders, tar shards (webdataset layout) and Hugging Face datasets on disk."""
from gcvimoe.data import hfds, shards  # noqa: F401  (they register their sources)
from gcvimoe.data.config import DataConfig
from gcvimoe.data.digits import DigitsDataset
from gcvimoe.data.factory import build_transform, create_dataset, resolve_data_config, train_image_count
from gcvimoe.data.fashion_mnist import FashionMNIST
from gcvimoe.data.folder import ImageFolder
from gcvimoe.data.images import UnreadableImage, find_images, load_image
from gcvimoe.data.loaders import batches_per_epoch, create_loader, set_epoch
from gcvimoe.data.sources import (
    DataSource, Native, dataset_for_dir, default_dataset, get_source, register_source, source_names)

__all__ = [
    'DataConfig', 'resolve_data_config', 'train_image_count', 'build_transform', 'create_dataset', 'create_loader',
    'set_epoch', 'batches_per_epoch',
    'DataSource', 'Native', 'register_source', 'get_source', 'source_names', 'default_dataset', 'dataset_for_dir',
    'DigitsDataset', 'FashionMNIST', 'ImageFolder', 'find_images', 'load_image', 'UnreadableImage',
]
