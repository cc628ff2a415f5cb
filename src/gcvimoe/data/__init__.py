"""Datasets and loaders: the embedded digits, Fashion-MNIST IDX files, and ImageNet-style image folders."""
from gcvimoe.data.digits import DigitsDataset
from gcvimoe.data.factory import (
    DataConfig, batches_per_epoch, build_transform, create_dataset, create_loader, resolve_data_config, set_epoch,
    train_image_count)
from gcvimoe.data.fashion_mnist import FashionMNIST, read_idx
from gcvimoe.data.folder import (
    MAX_IMAGE_PIXELS, UNREADABLE_REASONS, ImageFolder, UnreadableImage, find_images, load_image, read_image,
    too_many_unreadable)

__all__ = [
    'DataConfig', 'resolve_data_config', 'train_image_count', 'build_transform', 'create_dataset', 'create_loader', 'set_epoch', 'batches_per_epoch',
    'DigitsDataset', 'FashionMNIST', 'read_idx', 'ImageFolder', 'find_images', 'load_image', 'read_image',
    'UnreadableImage', 'UNREADABLE_REASONS', 'MAX_IMAGE_PIXELS', 'too_many_unreadable',
]
