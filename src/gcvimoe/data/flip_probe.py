"""Whether a mirrored training image is still its class, measured on the training images themselves.

A nearest-class-mean classifier on raw, downsized, per-image standardised grey pixels is fitted to a sample of the
training set, then asked about the same images mirrored. Mirroring a photo of a shirt, a shoe or a texture leaves it
close to its class's mean; mirroring a digit or a letter moves it towards another class or none. The share of the
probe's above-chance accuracy that mirroring costs (:attr:`MirrorProbe.loss`) decides the flip default
(:func:`decide_hflip`): above :data:`MAX_MIRROR_LOSS`, no flips.

The probe is cheap by design (a few thousand small images, one matrix product), and it uses the training split only.
"""
from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset

from gcvimoe.data.config import DataConfig
from gcvimoe.data.factory import create_dataset
from gcvimoe.data.sources import get_source

PROBE_SIZE = 16
"""Side (px) the probe's images are resized to: enough for a character's shape, small enough to be cheap."""
PROBE_IMAGES = 3000
"""Training images the probe samples at most."""
MAX_MIRROR_LOSS = 0.4
"""Mirroring that costs more than this share of the probe's above-chance accuracy turns flips off (chosen on the
folders of ``benchmarks/flip_probe.py``: characters and digits lose 0.55-0.65, Fashion-MNIST about 0.2 (a mirrored
shoe points the other way, yet is a shoe), symmetric shapes and textures nothing)."""
MIN_PROBE_MARGIN = 0.05
"""The probe's accuracy must beat chance by this much for its verdict to count; below it flips stay on."""
FLIP = 0.5
"""The flip probability when mirroring keeps the class (timm's default)."""


@dataclass(frozen=True)
class MirrorProbe:
    """What the probe measured.

    Attributes:
        accuracy: Nearest-class-mean top-1 on the sampled training images (each left out of its own class's mean).
        mirrored_accuracy: The same with each query mirrored.
        chance: One over the number of classes.
        images: Images sampled.
    """
    accuracy: float
    mirrored_accuracy: float
    chance: float
    images: int

    @property
    def margin(self) -> float:
        """How far the probe's accuracy is above chance."""
        return self.accuracy - self.chance

    @property
    def loss(self) -> float:
        """The share of the above-chance accuracy that mirroring the queries costs: 0 when it costs nothing, 1 when
        mirrored images score at chance or below (each class the mirror image of another)."""
        if self.margin <= 0:
            return 0.0
        return min(1.0, max(0.0, self.accuracy - self.mirrored_accuracy) / self.margin)


def probe_arrays(images: torch.Tensor, labels: torch.Tensor, num_classes: int) -> MirrorProbe:
    """Nearest-class-mean accuracy of ``images [n, h, w]`` and of their mirror images, each query left out of its own
    class's mean (a class of one image has no mean to compare against and is never predicted for itself).

    Args:
        images: Grey images, any scale.
        labels: ``[n]`` class indices.
        num_classes: Classes (chance is one over it).
    """
    n = images.shape[0]
    images = _centre(images.double())
    x = _standardise(images.reshape(n, -1))
    mirrored = _standardise(images.flip(-1).reshape(n, -1))
    one_hot = torch.nn.functional.one_hot(labels, num_classes).double()  # [n, c]
    sums = one_hot.t() @ x  # [c, d]
    counts = one_hot.sum(0)  # [c]
    own = torch.arange(n)
    accuracies = []
    for queries in (x, mirrored):
        means = sums / counts.clamp(min=1)[:, None]
        distances = torch.cdist(queries, means).pow(2)  # [n, c]
        # the own class's mean without the query itself: (sum - x_i) / (count - 1)
        own_count = counts[labels] - 1
        own_mean = (sums[labels] - x) / own_count.clamp(min=1)[:, None]
        own_distance = (queries - own_mean).pow(2).sum(1)
        distances[own, labels] = torch.where(own_count > 0, own_distance, torch.full_like(own_distance, float("inf")))
        distances[:, counts == 0] = float("inf")
        accuracies.append((distances.argmin(1) == labels).double().mean().item())
    return MirrorProbe(accuracies[0], accuracies[1], 1.0 / num_classes, n)


def _centre(images: torch.Tensor) -> torch.Tensor:
    """Each image ``[h, w]`` shifted (with wrap-around) so that its content's centre of mass, weighted by the distance
    from its border's mean grey, is the image's centre: raw pixels then compare shapes, not where they were drawn."""
    n, h, w = images.shape
    border = torch.cat([images[:, 0], images[:, -1], images[:, :, 0], images[:, :, -1]], 1).mean(1)
    weight = (images - border[:, None, None]).abs()
    total = weight.sum((1, 2)).clamp(min=1e-9)
    rows = (weight.sum(2) * torch.arange(h, dtype=images.dtype)).sum(1) / total
    cols = (weight.sum(1) * torch.arange(w, dtype=images.dtype)).sum(1) / total
    shifts = zip((h - 1) / 2 - rows, (w - 1) / 2 - cols)
    return torch.stack([image.roll((round(dy.item()), round(dx.item())), (0, 1))
                        for image, (dy, dx) in zip(images, shifts)])


def _standardise(x: torch.Tensor) -> torch.Tensor:
    # per image: brightness and contrast say nothing about mirroring
    x = x - x.mean(1, keepdim=True)
    return x / x.std(1, keepdim=True).clamp(min=1e-6)


def probe_dataset(dataset: Dataset, num_classes: int, max_images: int = PROBE_IMAGES, seed: int = 0) -> MirrorProbe:
    """:func:`probe_arrays` on up to ``max_images`` images drawn at random from a map-style ``dataset`` whose
    ``transform`` gives ``[1, PROBE_SIZE, PROBE_SIZE]`` tensors (:func:`probe_transform`)."""
    count = len(dataset)
    indices = np.random.default_rng(seed).permutation(count)[:max_images]
    pairs = [dataset[int(i)] for i in indices]
    images = torch.stack([image[0] for image, _ in pairs])
    labels = torch.tensor([label for _, label in pairs])
    return probe_arrays(images, labels, num_classes)


def probe_transform():
    """The transform :func:`probe_dataset` expects: grey, :data:`PROBE_SIZE` px square, a tensor."""
    from torchvision import transforms
    return transforms.Compose([transforms.Grayscale(1), transforms.Resize((PROBE_SIZE, PROBE_SIZE)),
                               transforms.ToTensor()])


def measure_mirroring(data_cfg: DataConfig) -> Optional[MirrorProbe]:
    """The probe on ``data_cfg``'s training split, or None for a stream (reading a random sample from one means
    reading the shards up to each image)."""
    train = create_dataset(data_cfg, "train", probe_transform(), skip_unreadable=True)
    if isinstance(train, IterableDataset) or len(train) == 0:
        return None
    return probe_dataset(train, len(data_cfg.class_names))


def flip_default(dataset: str, data_cfg: Optional[DataConfig] = None) -> Tuple[float, str]:
    """The flip probability for a config that leaves ``hflip`` null, and the header's words for why: a source that
    knows its images (``mirror_symmetric`` True or False) says so; otherwise the probe measures ``data_cfg``'s
    training images."""
    known = get_source(dataset).mirror_symmetric
    if known is not None:
        return (FLIP, f"{dataset} data: mirror-symmetric") if known else (0.0, f"{dataset} are not mirror-symmetric")
    return decide_hflip(measure_mirroring(data_cfg) if data_cfg is not None else None)


def decide_hflip(probe: Optional[MirrorProbe]) -> Tuple[float, str]:
    """The flip probability the probe's measurement asks for, and the header's words for why."""
    if probe is None:
        return FLIP, "the data could not be probed: mirror-symmetric images assumed; set 0 for text and digits"
    measured = (f"from the data: mirrored images lose {100 * probe.loss:.0f} % of a nearest-mean probe's accuracy, "
                f"{100 * probe.accuracy:.1f} -> {100 * probe.mirrored_accuracy:.1f} % on {probe.images} training "
                f"images, chance {100 * probe.chance:.1f} %")
    if probe.margin < MIN_PROBE_MARGIN:
        return FLIP, f"{measured}; the probe barely beats chance, so mirror-symmetric images are assumed"
    if probe.loss > MAX_MIRROR_LOSS:
        return 0.0, f"{measured}; over {100 * MAX_MIRROR_LOSS:.0f} %, so no flips"
    return FLIP, f"{measured}; at most {100 * MAX_MIRROR_LOSS:.0f} %, so flips"
