"""ImageNet-style image folders (``root/train/<class>/<image>``, ``root/val/<class>/<image>``), checked up front.

Every layout mistake a user can make (no folder, no classes, an empty class, val classes missing from train, an
unreadable image) is reported as one :class:`~gcvimoe.errors.GcvimoeError` line naming the path and the fix.
"""
import glob
from pathlib import Path
from typing import Callable, List, Optional, Sequence

from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset
from torchvision.datasets.folder import IMG_EXTENSIONS

from gcvimoe.errors import GcvimoeError

LAYOUT = "expected DIR/train/<class>/<image> and DIR/val/<class>/<image>"


def check_split_dir(root, split: str) -> Path:
    """Return ``root/split`` after checking that both exist."""
    root = Path(root)
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


def load_image(path, mode: str) -> Image.Image:
    """Open an image and convert it to ``mode`` ('L' or 'RGB'); an unreadable file is a one-line error."""
    try:
        with Image.open(path) as image:
            return image.convert(mode)
    except (UnidentifiedImageError, OSError, ValueError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise GcvimoeError(f"cannot read image {path} ({reason}); replace or delete the file") from None


class ImageFolder(Dataset):
    """Images in one class folder per class.

    Args:
        root: The dataset folder holding ``train/`` and ``val/``.
        split: 'train' or 'val'.
        classes: The class list to index labels by (the training classes for ``val``); None = this split's own.
        mode: PIL mode the images are converted to, 'RGB' or 'L'.
        transform: Applied to each PIL image.
    """

    def __init__(
            self,
            root,
            split: str = "train",
            classes: Optional[Sequence[str]] = None,
            mode: str = "RGB",
            transform: Optional[Callable] = None,
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
        extensions = tuple(ext.lower() for ext in IMG_EXTENSIONS)
        self.samples = []
        for name in found:
            files = sorted(p for p in (split_dir / name).rglob("*") if p.suffix.lower() in extensions and p.is_file())
            if not files:
                raise GcvimoeError(
                    f"class folder {split_dir / name} holds no images ({', '.join(extensions[:4])}, ...); "
                    "add images or remove the folder")
            self.samples.extend((str(p), class_to_idx[name]) for p in files)
        self.targets = [target for _, target in self.samples]
        self.mode = mode
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, target = self.samples[index]
        image = load_image(path, self.mode)
        if self.transform is not None:
            image = self.transform(image)
        return image, target
