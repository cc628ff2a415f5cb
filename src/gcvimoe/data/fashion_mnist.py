"""Fashion-MNIST from its IDX files (gzipped or not), as shipped by the Debian package ``dataset-fashion-mnist``."""
import gzip
import os
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from gcvimoe.data.arrays import ArrayImageDataset
from gcvimoe.errors import GcvimoeError

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"  # where Debian's dataset-fashion-mnist installs the files
FASHION_MNIST_ENV = "GCVIMOE_FASHION_MNIST_DIR"
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
FASHION_MNIST_MEAN = (0.2860,)
FASHION_MNIST_STD = (0.3530,)
_PREFIX = {"train": "train", "val": "t10k"}
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.int16, 0x0C: np.int32, 0x0D: np.float32, 0x0E: np.float64}


def read_idx(path) -> np.ndarray:
    """Read an IDX file (the MNIST format: zero bytes, a type code, the rank, big-endian sizes, then the data)."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise GcvimoeError(f"cannot read {path} ({e}); reinstall the file or pass another --data-dir") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise GcvimoeError(f"{path} is not an IDX file; pass --data-dir with the Fashion-MNIST IDX files")
    rank = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(rank))
    dtype = np.dtype(_IDX_DTYPES[data[2]]).newbyteorder(">")
    array = np.frombuffer(data, dtype=dtype, offset=4 + 4 * rank)
    if array.size != int(np.prod(shape)):
        raise GcvimoeError(f"{path} is truncated ({array.size} values for shape {shape}); download it again")
    return array.reshape(shape).astype(dtype.newbyteorder("="))


def fashion_mnist_dir(data_dir: str = "") -> Path:
    """Where the Fashion-MNIST files are: ``data_dir`` when given, else ``$GCVIMOE_FASHION_MNIST_DIR``, else the Debian
    package's folder; a one-line error saying how to get them when that folder does not exist."""
    root = Path(data_dir or os.environ.get(FASHION_MNIST_ENV) or FASHION_MNIST_DIR)
    if root.exists() and not root.is_dir():
        raise GcvimoeError(f"Fashion-MNIST folder {root} is a file, not a folder; pass --data-dir DIR with the four "
                           "IDX files")
    if not root.is_dir():
        raise GcvimoeError(
            f"Fashion-MNIST folder {root} not found; pass --data-dir DIR with the four IDX files, set "
            f"{FASHION_MNIST_ENV}, or install them with `apt-get install dataset-fashion-mnist`")
    return root


def _find(root: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz"):
        if (root / name).is_file():
            return root / name
    raise GcvimoeError(
        f"no {stem}[.gz] in {root}; install the Debian package dataset-fashion-mnist "
        f"(files in {FASHION_MNIST_DIR}) or pass --data-dir with the four Fashion-MNIST IDX files")


class FashionMNIST(ArrayImageDataset):
    """Fashion-MNIST as grayscale PIL images: 60000 train and 10000 val (the official test set) images.

    Args:
        root: Folder with ``train-images-idx3-ubyte.gz`` and the three other IDX files ('' = :func:`fashion_mnist_dir`).
        split: 'train' or 'val'.
        transform: Applied to each PIL image.
    """

    def __init__(self, root: str = "", split: str = "train", transform: Optional[Callable] = None):
        root = fashion_mnist_dir(root)
        prefix = _PREFIX[split]
        self.images = read_idx(_find(root, f"{prefix}-images-idx3-ubyte"))
        self.targets = read_idx(_find(root, f"{prefix}-labels-idx1-ubyte")).astype(np.int64)
        if self.images.ndim != 3 or len(self.images) != len(self.targets):
            raise GcvimoeError(f"the Fashion-MNIST {split} images and labels in {root} do not match; reinstall them")
        self.classes = list(FASHION_MNIST_CLASSES)
        self.transform = transform
