"""Datasets held as uint8 image arrays in memory, served as grayscale PIL images so timm's transforms apply."""
from typing import Callable, Optional

import numpy as np
from PIL import Image
from torch.utils.data import Dataset


class ArrayImageDataset(Dataset):
    """``images [n, h, w]`` uint8 and ``targets [n]``; subclasses fill them, ``classes`` and ``transform``."""

    images: np.ndarray
    targets: np.ndarray
    transform: Optional[Callable] = None

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int):
        image = Image.fromarray(self.images[index])
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.targets[index])
