"""scikit-learn's built-in handwritten digits (8x8, 16 grey levels) with a fixed stratified train/val split."""
from typing import Callable, Optional

import numpy as np

from gcvimoe.data.arrays import ArrayImageDataset

DIGITS_CLASSES = tuple(str(d) for d in range(10))
DIGITS_MEAN = (0.3054,)  # measured on the train split, pixels scaled to [0, 1]
DIGITS_STD = (0.3761,)
VAL_FRACTION = 0.2
SPLIT_SEED = 0


def digits_split(split: str):
    """Return ``(images, labels)`` of the fixed split: 1437 train and 360 val images, uint8 ``[n, 8, 8]``."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    indices = np.arange(len(digits.target))
    train_idx, val_idx = train_test_split(
        indices, test_size=VAL_FRACTION, stratify=digits.target, random_state=SPLIT_SEED)
    chosen = train_idx if split == "train" else val_idx
    return images[chosen], digits.target[chosen].astype(np.int64)


class DigitsDataset(ArrayImageDataset):
    """The digits as grayscale PIL images, so that timm's transforms apply unchanged.

    Args:
        split: 'train' or 'val'.
        transform: Applied to each PIL image.
    """

    def __init__(self, split: str = "train", transform: Optional[Callable] = None):
        self.images, self.targets = digits_split(split)
        self.classes = list(DIGITS_CLASSES)
        self.transform = transform
