"""ImageNet-style image folders (``root/train/<class>/<image>``, ``root/val/<class>/<image>``), checked up front.

Every layout mistake a user can make (no folder, no classes, an empty class, val classes missing from train, an
unreadable image) is reported as one :class:`~gcvimoe.errors.GcvimoeError` line naming the path and the fix.
"""
import glob
import logging
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset
from torchvision.datasets.folder import IMG_EXTENSIONS
from tqdm import tqdm

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


def find_classes(split_dir) -> List[str]:
    """The sorted class folder names under ``split_dir``; at least one is required."""
    split_dir = Path(split_dir)
    classes = sorted(entry.name for entry in split_dir.iterdir() if entry.is_dir() and not entry.name.startswith("."))
    if not classes:
        raise GcvimoeError(f"{split_dir} holds no class folders; put each class's images in {split_dir}/<class>/")
    return classes


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in tuple(ext.lower() for ext in IMG_EXTENSIONS) and path.is_file()


def find_images(patterns: Sequence[str]) -> List[Path]:
    """The image files that ``patterns`` name: files as given, folders searched recursively, globs expanded.

    Files named explicitly are kept whatever their suffix (reading them decides); files found in folders or by a
    glob are kept when their suffix is an image type. Order is as given, sorted within a folder or glob; a file
    named twice appears once. A pattern that matches nothing, or no image at all, is a one-line error.
    """
    found: List[Path] = []
    for pattern in patterns:
        path = Path(pattern)
        if path.is_file():
            found.append(path)
        elif path.is_dir():
            images = sorted(p for p in path.rglob("*") if _is_image(p))
            if not images:
                raise GcvimoeError(f"folder {path} holds no image files ({', '.join(IMG_EXTENSIONS[:4])}, ...)")
            found.extend(images)
        elif glob.has_magic(pattern):
            images = sorted(p for p in map(Path, glob.glob(pattern, recursive=True)) if _is_image(p))
            if not images:
                raise GcvimoeError(f"no image file matches {pattern!r}; check the pattern (quote it for the shell)")
            found.extend(images)
        else:
            raise GcvimoeError(f"image {path} not found; pass existing image files, folders or glob patterns")
    if not found:
        raise GcvimoeError("no images given; pass image files, folders or glob patterns")
    return list(dict.fromkeys(found))


MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485
"""Images with more pixels than this (PIL's own warning threshold, about 89 megapixels, 9459x9459) are refused as
unreadable before they are decoded: a small file can declare a huge image (a decompression bomb)."""

# the size check above refuses every image PIL would warn about, so its warning would only repeat the refusal
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)

UNREADABLE_REASONS = {
    1: "empty file",
    2: "not an image",
    3: f"more than {MAX_IMAGE_PIXELS / 1e6:.0f} megapixels",
    4: "truncated",
    5: "corrupt",
    6: "cannot be opened",
}
"""Why an image is unreadable, by the code :class:`ImageFolder` records for it (0 = readable)."""

_GREY_16BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


class UnreadableImage(Exception):
    """An image file that cannot be decoded; ``code`` is a key of :data:`UNREADABLE_REASONS`."""

    def __init__(self, code: int, detail: str = ""):
        super().__init__(UNREADABLE_REASONS[code] + (f": {detail}" if detail else ""))
        self.code = code


def _to_8bit(image: Image.Image) -> Image.Image:
    """16-bit (and 32-bit integer) grey images scaled from 0..65535 to 0..255, float images from 0..1, clipped."""
    if image.mode in _GREY_16BIT_MODES:
        pixels = np.asarray(image, dtype=np.float64) / 257.0
    elif image.mode == "F":
        pixels = np.asarray(image, dtype=np.float64) * 255.0
    else:
        return image
    return Image.fromarray(np.rint(np.clip(pixels, 0, 255)).astype(np.uint8), mode="L")


def _decode(path, mode: str) -> Image.Image:
    with Image.open(path) as image:
        width, height = image.size
        if width * height > MAX_IMAGE_PIXELS:
            raise UnreadableImage(3, f"{width}x{height}")
        image.load()
        return _to_8bit(image).convert(mode)


def read_image(path, mode: str) -> Image.Image:
    """Decode an image into ``mode`` ('L' or 'RGB'), raising :class:`UnreadableImage` when it cannot be.

    16-bit images are scaled into the 8-bit range (``round(v / 257)``), not clipped; float images are taken as
    [0, 1], clipped, and scaled to 0..255. Images above :data:`MAX_IMAGE_PIXELS` are refused before decoding.
    """
    try:
        return _decode(path, mode)
    except UnreadableImage:
        raise
    except Image.DecompressionBombError:
        raise UnreadableImage(3) from None
    except UnidentifiedImageError:
        raise UnreadableImage(1 if _is_empty(path) else 2) from None
    except OSError as e:
        if "truncated" in str(e).lower():
            raise UnreadableImage(4) from None
        if e.errno is not None:
            raise UnreadableImage(6, e.strerror or "") from None
        raise UnreadableImage(5, _first_line(e)) from None
    except Exception as e:  # a damaged file makes PIL's decoders raise many types (SyntaxError, struct.error, ...)
        raise UnreadableImage(5, _first_line(e)) from None


def _is_empty(path) -> bool:
    try:
        return os.path.getsize(path) == 0
    except OSError:
        return False


def _first_line(e: BaseException) -> str:
    return str(e).strip().splitlines()[0][:120] if str(e).strip() else type(e).__name__


def load_image(path, mode: str) -> Image.Image:
    """Open an image and convert it to ``mode`` ('L' or 'RGB') as :func:`read_image` does; an unreadable file is a
    one-line error."""
    try:
        return read_image(path, mode)
    except UnreadableImage as e:
        raise GcvimoeError(f"cannot read image {path} ({e}); replace or delete the file") from None


def too_many_unreadable(what: str, count: int, total: int, max_fraction: float, listed_in: str) -> GcvimoeError:
    """The error that stops a run when more than ``max_fraction`` of ``total`` images are unreadable."""
    return GcvimoeError(
        f"{count} of {total} {what} images ({100 * count / total:.1f} %) are unreadable, more than --max-bad-fraction "
        f"{max_fraction:g}; fix or delete them (listed in {listed_in}) or raise --max-bad-fraction")


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
        root: The dataset folder holding ``train/`` and ``val/``.
        split: 'train' or 'val'.
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
            split: str = "train",
            classes: Optional[Sequence[str]] = None,
            mode: str = "RGB",
            transform: Optional[Callable] = None,
            skip_unreadable: bool = False,
            max_unreadable_fraction: Optional[float] = None,
    ):
        split_dir = check_split_dir(root, split)
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
            files = sorted(p for p in (split_dir / name).rglob("*") if _is_image(p))
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
            for index, found in zip(indices, codes):
                if found:
                    self.unreadable[index] = found


def count_images(root, split: str = "train") -> int:
    """Image files under ``root/split`` (by suffix, as :class:`ImageFolder` finds them; unreadable ones included)."""
    suffixes = tuple(ext.lower() for ext in IMG_EXTENSIONS)
    split_dir = check_split_dir(root, split)
    return sum(name.lower().endswith(suffixes) for _, _, names in os.walk(split_dir) for name in names)


@dataclass
class FolderStats:
    """What a sample of a folder's training images says about the data (see :func:`measure_folder`).

    Attributes:
        sampled: Images read (unreadable ones are left out).
        grey: Every sampled image has one channel, or three equal ones.
        median_side: The median of the sampled images' shorter sides, in pixels.
        mean, std: Per-channel pixel statistics in [0, 1] (RGB; equal channels for grey data).
    """
    sampled: int
    grey: bool
    median_side: int
    mean: Tuple[float, ...]
    std: Tuple[float, ...]


def measure_folder(root, sample: int = 256, seed: int = 0) -> FolderStats:
    """Measure channels, size and pixel statistics on ``sample`` training images picked evenly at random.

    A few hundred images pin the mean and std to about a hundredth of the pixel range, which is what normalisation
    needs; reading them all would cost a pass over the data before the first step.
    """
    split_dir = check_split_dir(root, "train")
    files = sorted(p for p in split_dir.rglob("*") if _is_image(p))
    if not files:
        raise GcvimoeError(f"{split_dir} holds no images; {LAYOUT}")
    rng = np.random.default_rng(seed)
    picked = [files[i] for i in sorted(rng.choice(len(files), min(sample, len(files)), replace=False))]
    sums, squares, pixels, sides, grey = np.zeros(3), np.zeros(3), 0, [], True
    for path in picked:
        try:
            image = read_image(path, "RGB")
        except UnreadableImage:
            continue
        values = np.asarray(image, dtype=np.float64).reshape(-1, 3) / 255.0
        grey = grey and bool(np.all(values[:, 0] == values[:, 1]) and np.all(values[:, 1] == values[:, 2]))
        sums, squares, pixels = sums + values.sum(0), squares + (values ** 2).sum(0), pixels + len(values)
        sides.append(min(image.size))
    if not sides:
        raise GcvimoeError(f"none of {len(picked)} sampled images of {split_dir} is readable; check the files")
    mean = sums / pixels
    std = np.sqrt(np.maximum(squares / pixels - mean ** 2, 1e-12))
    return FolderStats(len(sides), grey, int(np.median(sides)), tuple(float(m) for m in mean),
                       tuple(float(s) for s in std))
