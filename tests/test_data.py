"""Datasets, folder checks, transforms and loaders."""
import gzip
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from gcvimoe.data import (
    DigitsDataset, FashionMNIST, ImageFolder, build_transform, create_dataset, create_loader, resolve_data_config,
    set_epoch)
from gcvimoe.data.digits import digits_split
from gcvimoe.data.fashion_mnist import read_idx
from gcvimoe.errors import GcvimoeError


def make_folder(root, classes=("cat", "dog"), val_classes=None, per_class=2, size=12, mode="RGB"):
    """root/train/<class>/*.png and root/val/<class>/*.png with a distinct flat colour per class."""
    for split, names in (("train", classes), ("val", classes if val_classes is None else val_classes)):
        for i, name in enumerate(names):
            folder = root / split / name
            folder.mkdir(parents=True)
            for j in range(per_class):
                value = 40 * (i + 1) + j
                color = value if mode == "L" else (value, 255 - value, j)
                Image.new(mode, (size, size), color).save(folder / f"{j}.png")
    return root


def write_idx(path, array, compress=True):
    codes = {np.uint8: 0x08, np.int32: 0x0C}
    header = bytes([0, 0, codes[array.dtype.type], array.ndim]) + b"".join(struct.pack(">I", n) for n in array.shape)
    data = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
    (gzip.open if compress else open)(path, "wb").write(data)


def test_digits_split_is_fixed_and_stratified():
    train_images, train_labels = digits_split("train")
    val_images, val_labels = digits_split("val")
    assert len(train_labels) == 1437 and len(val_labels) == 360
    assert train_images.dtype == np.uint8 and train_images.shape[1:] == (8, 8) and train_images.max() == 255
    assert np.bincount(val_labels).min() >= 35  # every digit is in val, about 36 each
    again, _ = digits_split("val")
    assert np.array_equal(again, val_images)
    image, label = DigitsDataset("val")[0]
    assert image.mode == "L" and image.size == (8, 8) and label == val_labels[0]


def test_read_idx_round_trip(tmp_path):
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    labels = np.array([7, -1, 123456], dtype=np.int32)
    write_idx(tmp_path / "images.gz", images)
    write_idx(tmp_path / "labels", labels, compress=False)
    assert np.array_equal(read_idx(tmp_path / "images.gz"), images)
    assert np.array_equal(read_idx(tmp_path / "labels"), labels)


def test_read_idx_rejects_bad_files(tmp_path):
    (tmp_path / "text").write_bytes(b"hello world")
    with pytest.raises(GcvimoeError, match="is not an IDX file"):
        read_idx(tmp_path / "text")
    images = np.zeros((4, 2, 2), dtype=np.uint8)
    write_idx(tmp_path / "short", images, compress=False)
    (tmp_path / "short").write_bytes((tmp_path / "short").read_bytes()[:-3])
    with pytest.raises(GcvimoeError, match="is truncated"):
        read_idx(tmp_path / "short")


def test_fashion_mnist_reader(tmp_path):
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 5), ("t10k", 3)):
        write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
        write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n, dtype=np.uint8))
    val = FashionMNIST(tmp_path, "val")
    assert len(val) == 3 and len(FashionMNIST(tmp_path, "train")) == 5
    image, label = val[2]
    assert image.size == (28, 28) and label == 2 and val.classes[9] == "Ankle boot"


def test_fashion_mnist_missing_files_name_the_package(tmp_path):
    with pytest.raises(GcvimoeError, match="dataset-fashion-mnist"):
        FashionMNIST(tmp_path, "train")
    with pytest.raises(GcvimoeError, match="not found"):
        FashionMNIST(tmp_path / "nowhere", "train")


def test_image_folder_labels_val_by_training_classes(tmp_path):
    root = make_folder(tmp_path, classes=("a", "b", "c"), val_classes=("c",))
    data_cfg = resolve_data_config("folder", root, img_size=8)
    assert data_cfg.class_names == ["a", "b", "c"] and data_cfg.in_chans == 3
    val = create_dataset(data_cfg, "val")
    assert len(val) == 2 and set(val.targets) == {2}  # 'c' keeps its training index


@pytest.mark.parametrize("setup, expected", [
    (lambda root: None, "data folder .* does not exist"),
    (lambda root: (root / "val").mkdir(parents=True), "has no train/ folder"),
    (lambda root: [(root / s).mkdir(parents=True) for s in ("train", "val")], "holds no class folders"),
    (lambda root: [(root / s / "a").mkdir(parents=True) for s in ("train", "val")], "holds no images"),
    (lambda root: make_folder(root, classes=("a",), val_classes=("a", "zebra")), "classes not in the training"),
])
def test_image_folder_layout_errors(tmp_path, setup, expected):
    root = tmp_path / "data"
    setup(root)
    with pytest.raises(GcvimoeError, match=expected) as info:
        data_cfg = resolve_data_config("folder", root, img_size=8)
        create_dataset(data_cfg, "train")
        create_dataset(data_cfg, "val")
    assert "\n" not in str(info.value)


def test_corrupt_image_is_a_one_line_error(tmp_path):
    root = make_folder(tmp_path)
    (root / "train" / "cat" / "0.png").write_bytes(b"not a png at all")
    dataset = ImageFolder(root, "train")
    with pytest.raises(GcvimoeError, match=r"cannot read image .*0\.png .*replace or delete the file"):
        dataset[0]


def test_transforms_shape_channels_and_normalisation(tmp_path):
    digits = resolve_data_config("digits", img_size=32, crop_pct=1.0)
    x, _ = create_dataset(digits, "val", build_transform(digits))[0]
    assert x.shape == (1, 32, 32)
    raw = np.asarray(DigitsDataset("val")[0][0].resize((32, 32), Image.BICUBIC), dtype=np.float32) / 255
    expected = (torch.from_numpy(raw).clamp(0, 1) - digits.mean[0]) / digits.std[0]
    assert torch.allclose(x[0], expected, atol=0.02)
    rgb = resolve_data_config("digits", img_size=32, in_chans=3)
    x3, _ = create_dataset(rgb, "val", build_transform(rgb, is_training=True, scale=(0.5, 1.0), hflip=0.0))[0]
    assert x3.shape == (3, 32, 32) and torch.equal(x3[0], x3[1])
    grey_folder = resolve_data_config("folder", make_folder(tmp_path / "f"), img_size=8, in_chans=1)
    assert create_dataset(grey_folder, "train", build_transform(grey_folder))[0][0].shape == (1, 8, 8)


def test_eval_loader_shards_cover_every_image_once():
    dataset = list(range(11))
    seen = []
    for rank in range(3):
        loader = create_loader(dataset, batch_size=2, is_training=False, rank=rank, world_size=3)
        seen += [int(v) for batch in loader for v in batch]
    assert sorted(seen) == dataset


def test_train_loader_order_depends_on_seed_and_epoch_only():
    dataset = list(range(20))

    def order(epoch, seed=0):
        loader = create_loader(dataset, batch_size=4, is_training=True, seed=seed)
        set_epoch(loader, epoch, seed)
        return [int(v) for batch in loader for v in batch]

    assert order(1) == order(1)
    assert order(1) != order(2)
    assert order(1) != order(1, seed=1)
    assert sorted(order(3)) == dataset
