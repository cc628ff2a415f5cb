"""Decoding images: listing image files, reading one into 8-bit 'L' or 'RGB', the unreadable-file taxonomy, and the
statistics a sample of images gives (channels, size, mean and std).

Every data source decodes through :func:`read_image`, so a PNG gives the same pixels read from a folder, a tar shard or
a Hugging Face dataset.
"""
import glob
import io
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, List, Sequence, Tuple, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from torchvision.datasets.folder import IMG_EXTENSIONS

from gcvimoe.errors import GcvimoeError, first_line

IMAGE_SUFFIXES = tuple(ext.lower() for ext in IMG_EXTENSIONS)

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
"""Why an image is unreadable, by the code :class:`UnreadableImage` carries (0 = readable)."""

_GREY_16BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
ImageSource = Union[str, Path, bytes]


def is_image_name(name: str) -> bool:
    """Whether a file name has an image suffix (``.png``, ``.jpg``, ...: torchvision's list)."""
    return name.lower().endswith(IMAGE_SUFFIXES)


def list_images(folder) -> List[Path]:
    """The image files under ``folder``, searched recursively, by suffix, sorted: the one listing every source uses."""
    return sorted(Path(root) / name for root, _, names in os.walk(folder) for name in names if is_image_name(name))


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
            images = list_images(path)
            if not images:
                raise GcvimoeError(f"folder {path} holds no image files ({', '.join(IMG_EXTENSIONS[:4])}, ...)")
            found.extend(images)
        elif glob.has_magic(pattern):
            images = sorted(p for p in map(Path, glob.glob(pattern, recursive=True))
                            if is_image_name(p.name) and p.is_file())
            if not images:
                raise GcvimoeError(f"no image file matches {pattern!r}; check the pattern (quote it for the shell)")
            found.extend(images)
        else:
            raise GcvimoeError(f"image {path} not found; pass existing image files, folders or glob patterns")
    if not found:
        raise GcvimoeError("no images given; pass image files, folders or glob patterns")
    return list(dict.fromkeys(found))


class UnreadableImage(Exception):
    """An image file that cannot be decoded; ``code`` is a key of :data:`UNREADABLE_REASONS`."""

    def __init__(self, code: int, detail: str = ""):
        super().__init__(UNREADABLE_REASONS[code] + (f": {detail}" if detail else ""))
        self.code = code


def to_mode(image: Image.Image, mode: str) -> Image.Image:
    """``image`` in ``mode`` ('L' or 'RGB'): 16-bit (and 32-bit integer) grey images scaled from 0..65535 to 0..255,
    float images from 0..1, clipped."""
    if image.mode in _GREY_16BIT_MODES:
        pixels = np.asarray(image, dtype=np.float64) / 257.0
    elif image.mode == "F":
        pixels = np.asarray(image, dtype=np.float64) * 255.0
    else:
        return image.convert(mode)
    return Image.fromarray(np.rint(np.clip(pixels, 0, 255)).astype(np.uint8), mode="L").convert(mode)


def _decode(source: ImageSource, mode: str) -> Image.Image:
    with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
        width, height = image.size
        if width * height > MAX_IMAGE_PIXELS:
            raise UnreadableImage(3, f"{width}x{height}")
        image.load()
        # the orientation every viewer applies (a phone's portrait JPEG is stored sideways with EXIF Orientation 6)
        return to_mode(ImageOps.exif_transpose(image), mode)


def read_image(source: ImageSource, mode: str) -> Image.Image:
    """Decode an image file (a path, or its bytes) into ``mode`` ('L' or 'RGB'), raising :class:`UnreadableImage`
    when it cannot be.

    16-bit images are scaled into the 8-bit range (``round(v / 257)``), not clipped; float images are taken as
    [0, 1], clipped, and scaled to 0..255. Images above :data:`MAX_IMAGE_PIXELS` are refused before decoding.
    """
    try:
        return _decode(source, mode)
    except UnreadableImage:
        raise
    except Image.DecompressionBombError:
        raise UnreadableImage(3) from None
    except UnidentifiedImageError:
        raise UnreadableImage(1 if _is_empty(source) else 2) from None
    except OSError as e:
        if "truncated" in str(e).lower():
            raise UnreadableImage(4) from None
        if e.errno is not None:
            raise UnreadableImage(6, e.strerror or "") from None
        raise UnreadableImage(5, first_line(e, 120)) from None
    except Exception as e:  # a damaged file makes PIL's decoders raise many types (SyntaxError, struct.error, ...)
        raise UnreadableImage(5, first_line(e, 120)) from None


def _is_empty(source: ImageSource) -> bool:
    if isinstance(source, bytes):
        return not source
    try:
        return os.path.getsize(source) == 0
    except OSError:
        return False


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


@dataclass
class ImageStats:
    """What a sample of training images says about the data (see :func:`measure_images`).

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


def measure_images(images: Iterable[Image.Image], where: str) -> ImageStats:
    """Channels, size and pixel statistics of RGB ``images`` (a sample of a source's training images); ``where``
    names them in the error when there are none."""
    sums, squares, pixels, sides, grey = np.zeros(3), np.zeros(3), 0, [], True
    for image in images:
        values = np.asarray(image, dtype=np.float64).reshape(-1, 3) / 255.0
        grey = grey and bool(np.all(values[:, 0] == values[:, 1]) and np.all(values[:, 1] == values[:, 2]))
        sums, squares, pixels = sums + values.sum(0), squares + (values ** 2).sum(0), pixels + len(values)
        sides.append(min(image.size))
    if not sides:
        raise GcvimoeError(f"no sampled image of {where} is readable; check the files")
    mean = sums / pixels
    std = np.sqrt(np.maximum(squares / pixels - mean ** 2, 1e-12))
    return ImageStats(len(sides), grey, int(np.median(sides)), tuple(float(m) for m in mean),
                      tuple(float(s) for s in std))
