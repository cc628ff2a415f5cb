"""ImageNet-style image folders (``root/train/<class>/<image>``, ``root/val/<class>/<image>``), checked up front.

Every layout mistake a user can make (no folder, no classes, an empty class, val classes missing from train, an
unreadable image) is reported as one :class:`~gcvimoe.errors.GcvimoeError` line naming the path and the fix.
"""
import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision.datasets.folder import IMG_EXTENSIONS
from tqdm import tqdm

from gcvimoe.data.images import (
    ImageStats, UnreadableImage, list_images, measure_images, read_image, too_many_unreadable)
from gcvimoe.errors import GcvimoeError

LAYOUT = "expected DIR/train/<class>/<image> and DIR/val/<class>/<image>"


def check_split_dir(root, split: str) -> Path:
    """Return ``root/split`` after checking that both exist."""
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise GcvimoeError(f"--data-dir {root} is a file, not a folder; pass the dataset folder ({LAYOUT})")
    if not root.is_dir():
        raise GcvimoeError(f"data folder {root} does not exist; pass --data-dir with a folder ({LAYOUT})")
    split_dir = root / split
    if not split_dir.is_dir():
        raise GcvimoeError(f"data folder {root} has no {split}/ folder; {LAYOUT}")
    return split_dir


def is_class_folder(root) -> bool:
    """Whether ``root`` is one folder of class folders (``root/<class>/<image>``) rather than a dataset folder with
    ``train/`` and ``val/``: it has no ``train/`` or ``val/`` but a subfolder with images."""
    root = Path(root)
    if not root.is_dir() or (root / "train").is_dir() or (root / "val").is_dir():
        return False
    return any(entry.is_dir() and not entry.name.startswith(".") and list_images(entry) for entry in root.iterdir())


def find_classes(split_dir) -> List[str]:
    """The sorted class folder names under ``split_dir``; at least one is required."""
    split_dir = Path(split_dir)
    classes = sorted(entry.name for entry in split_dir.iterdir() if entry.is_dir() and not entry.name.startswith("."))
    if not classes:
        raise GcvimoeError(f"{split_dir} holds no class folders; put each class's images in {split_dir}/<class>/")
    return classes


_logger = logging.getLogger("gcvimoe.data")
_MAX_WARNINGS = 10  # per process; the rest are counted in the epoch line and listed in bad_files.txt
_warned = 0


class ImageFolder(Dataset):
    """Images in one class folder per class.

    An unreadable image (see :func:`read_image`) is a one-line error, or with ``skip_unreadable`` it is recorded,
    warned about, and replaced by the next readable image of the folder (the index after it, wrapping around). The
    record is a tensor in shared memory, so images found unreadable in DataLoader worker processes are known to the
    training process too, and the replacement depends only on the index: the data order and the random streams are the
    same with any number of workers and after a resume.

    Args:
        root: The dataset folder holding ``train/`` and ``val/``; with ``split`` None, one folder of class folders.
        split: 'train', 'val', or None for ``root``'s own class folders.
        classes: The class list to index labels by (the training classes for ``val``); None = this split's own.
        mode: PIL mode the images are converted to, 'RGB' or 'L'.
        transform: Applied to each PIL image.
        skip_unreadable: Skip unreadable images instead of raising.
        max_unreadable_fraction: With ``skip_unreadable``, raise once more than this share of the images is known
            to be unreadable (None = never).
    """

    def __init__(
            self,
            root,
            split: Optional[str] = "train",
            classes: Optional[Sequence[str]] = None,
            mode: str = "RGB",
            transform: Optional[Callable] = None,
            skip_unreadable: bool = False,
            max_unreadable_fraction: Optional[float] = None,
    ):
        split_dir = check_split_dir(root, split) if split else Path(root)
        split = split or split_dir.name
        found = find_classes(split_dir)
        self.classes = list(classes) if classes is not None else found
        unknown = [name for name in found if name not in self.classes]
        if unknown:
            shown = ", ".join(unknown[:5]) + (", ..." if len(unknown) > 5 else "")
            raise GcvimoeError(
                f"{split_dir} has classes not in the training classes: {shown}; "
                f"add them to train/ or remove them from {split}/")
        class_to_idx = {name: i for i, name in enumerate(self.classes)}
        self.samples = []
        for name in found:
            files = list_images(split_dir / name)
            if not files:
                raise GcvimoeError(
                    f"class folder {split_dir / name} holds no images ({', '.join(IMG_EXTENSIONS[:4])}, ...); "
                    "add images or remove the folder")
            self.samples.extend((str(p), class_to_idx[name]) for p in files)
        self.targets = [target for _, target in self.samples]
        self.split_dir, self.split, self.mode, self.transform = split_dir, split, mode, transform
        self.skip_unreadable, self.max_unreadable_fraction = skip_unreadable, max_unreadable_fraction
        # one byte per image, 0 = readable or not yet read, else a key of UNREADABLE_REASONS
        self.unreadable = torch.zeros(len(self.samples), dtype=torch.uint8).share_memory_()

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        for offset in range(len(self.samples)):
            candidate = (index + offset) % len(self.samples)
            if self.unreadable[candidate]:
                continue
            path, target = self.samples[candidate]
            try:
                image = read_image(path, self.mode)
            except UnreadableImage as e:
                if not self.skip_unreadable:
                    raise GcvimoeError(f"cannot read image {path} ({e}); replace or delete the file") from None
                self._record(candidate, e)
                continue
            if self.transform is not None:
                image = self.transform(image)
            return image, target
        raise GcvimoeError(f"no image under {self.split_dir} is readable; check the files")

    def _record(self, index: int, error: UnreadableImage) -> None:
        global _warned
        self.unreadable[index] = error.code
        if _warned < _MAX_WARNINGS:
            _warned += 1
            more = "; further ones are listed in bad_files.txt only" if _warned == _MAX_WARNINGS else ""
            _logger.warning("skipping unreadable image %s (%s)%s", self.samples[index][0], error, more)
        if self.max_unreadable_fraction is not None:
            count = int(self.unreadable.count_nonzero())
            if count > self.max_unreadable_fraction * len(self.samples):
                raise too_many_unreadable(self.split, count, len(self.samples), self.max_unreadable_fraction,
                                          "bad_files.txt in the output folder")

    def unreadable_files(self) -> List[Tuple[int, int]]:
        """``(index, reason code)`` of every image known to be unreadable."""
        indices = self.unreadable.nonzero().flatten().tolist()
        return [(index, int(self.unreadable[index])) for index in indices]

    def check(self, indices: Optional[Iterable[int]] = None, threads: int = 1, progress: bool = False) -> None:
        """Decode the images at ``indices`` (default: all) and record the unreadable ones, without warnings."""
        indices = list(range(len(self.samples)) if indices is None else indices)

        def code(index: int) -> int:
            try:
                read_image(self.samples[index][0], self.mode)
            except UnreadableImage as e:
                return e.code
            return 0

        with ThreadPoolExecutor(max(1, threads)) as pool:  # PIL's decoders release the GIL
            codes = tqdm(pool.map(code, indices), total=len(indices), desc=f"checking {self.split} images",
                         disable=not progress, leave=False, dynamic_ncols=True)
            for index, found in zip(indices, codes, strict=True):
                if found:
                    self.unreadable[index] = found


def count_images(root, split: str = "train") -> int:
    """Image files under ``root/split`` (by suffix, as :class:`ImageFolder` finds them; unreadable ones included)."""
    return len(list_images(check_split_dir(root, split)))


def measure_folder(root, sample: int = 256, seed: int = 0, split: Optional[str] = "train") -> ImageStats:
    """Measure channels, size and pixel statistics on ``sample`` images of ``split`` (None: ``root``'s own class
    folders) picked evenly at random.

    A few hundred images pin the mean and std to about a hundredth of the pixel range, which is what normalisation
    needs; reading them all would cost a pass over the data before the first step.
    """
    split_dir = check_split_dir(root, split) if split else Path(root)
    files = list_images(split_dir)
    if not files:
        raise GcvimoeError(f"{split_dir} holds no images; {LAYOUT}")
    rng = np.random.default_rng(seed)
    picked = [files[i] for i in sorted(rng.choice(len(files), min(sample, len(files)), replace=False))]
    return measure_images(_readable(picked), f"{len(picked)} of {split_dir}")


def _readable(paths: Sequence[Path]):
    for path in paths:
        try:
            yield read_image(path, "RGB")
        except UnreadableImage:
            continue
