"""Tar shards in the webdataset layout: ``train-000000.tar``, ..., ``val-000000.tar``, ... and ``_info.json``.

Each sample is an image file, unchanged (``00000042.png``: the same bytes as in the folder, so it decodes to the
same pixels), and its label (``00000042.cls``: the class index as text). The key is the image's index in its split,
in the folder's order; it seeds the sample's augmentation. ``_info.json`` (timm's name for it) holds the class names
and every shard's sample count, so counting, planning an epoch and resuming read no tar file.

    gcvimoe convert shards data/flowers shards/flowers --images-per-shard 1000
    gcvimoe train --data-dir 'shards/flowers/train-{000000..000007}.tar'      # or --data-dir shards/flowers
"""
import json
from pathlib import Path
from typing import Dict, List, Tuple

from braceexpand import braceexpand

from gcvimoe.data.folder import ImageFolder
from gcvimoe.data.images import UnreadableImage, measure_images, read_image
from gcvimoe.data.shard_stream import Shard, ShardStream, shard_samples
from gcvimoe.data.sources import DataSource, Native, from_stats, image_mode, register_source
from gcvimoe.errors import GcvimoeError
from gcvimoe.files import atomic_dir

INFO = "_info.json"
SPLITS = ("train", "val")
MEASURED_SAMPLES = 256


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


def write_shards(folder, output, images_per_shard: int = 1000) -> Dict[str, int]:
    """Write an image folder's ``train/`` and ``val/`` as tar shards and ``_info.json`` into ``output`` (replaced as
    a whole, atomically). Unreadable images are left out. Returns the images written per split and ``'unreadable'``.
    """
    if images_per_shard < 1:
        raise GcvimoeError(f"--images-per-shard {images_per_shard} must be at least 1")
    classes = ImageFolder(folder, "train").classes
    info: dict = {"format": "webdataset", "writer": "gcvimoe convert shards", "classes": classes, "splits": {}}
    written = {"unreadable": 0}
    with atomic_dir(output) as out:
        for split in SPLITS:
            lengths, unreadable = _write_split(out, split, ImageFolder(folder, split, classes=classes).samples,
                                               images_per_shard)
            info["splits"][split] = {"num_samples": sum(lengths), "shard_lengths": lengths,
                                     "filenames": [shard_name(split, i) for i in range(len(lengths))]}
            written[split], written["unreadable"] = sum(lengths), written["unreadable"] + unreadable
        (out / INFO).write_text(json.dumps(info, indent=1) + "\n")
    return written


def _write_split(out: Path, split: str, samples: List[Tuple[str, int]], images_per_shard: int):
    """Stream a split's readable images into shards of ``images_per_shard``; their lengths and the unreadable count.
    A sample's key is its index in the split."""
    import webdataset

    lengths: List[int] = []
    unreadable, writer = 0, None
    try:
        for index, (path, label) in enumerate(samples):
            data = Path(path).read_bytes()
            try:
                read_image(data, "RGB")
            except UnreadableImage:
                unreadable += 1
                continue
            if writer is None or lengths[-1] == images_per_shard:
                if writer is not None:
                    writer.close()
                writer = webdataset.TarWriter(str(out / shard_name(split, len(lengths))), encoder=False, mtime=0)
                lengths.append(0)
            writer.write({"__key__": f"{index:08d}", Path(path).suffix.lower().lstrip("."): data,
                          "cls": str(label).encode()})
            lengths[-1] += 1
    finally:
        if writer is not None:
            writer.close()
    return lengths, unreadable


def _is_pattern(data_dir: str) -> bool:
    return "{" in data_dir or data_dir.endswith(".tar")


def read_layout(data_dir: str) -> Tuple[dict, Dict[str, List[Shard]]]:
    """``_info.json`` and the shards of each split that ``data_dir`` names: a folder of shards (all of them), or a
    brace pattern of training shards (``DIR/train-{000000..000127}.tar``: those, and every val shard beside them)."""
    root = Path(data_dir).parent if _is_pattern(data_dir) else Path(data_dir)
    info_path = root / INFO
    if not info_path.is_file():
        where = "beside the shards" if _is_pattern(data_dir) else "in the folder"
        raise GcvimoeError(f"no {INFO} {where} ({info_path}); write the shards with `gcvimoe convert shards FOLDER "
                           f"OUT`, which records the classes and shard sizes there")
    try:
        info = json.loads(info_path.read_text())
        recorded = {split: dict(zip(entry["filenames"], entry["shard_lengths"], strict=True))
                    for split, entry in info["splits"].items()}
        info["classes"] = list(info["classes"])
    except (ValueError, KeyError, TypeError) as e:
        raise GcvimoeError(f"{info_path} is not a shard index ({e}); write the shards again with `gcvimoe convert "
                           "shards`") from None
    names = {split: list(recorded.get(split, {})) for split in SPLITS}
    if _is_pattern(data_dir):
        names["train"] = [Path(path).name for path in braceexpand(Path(data_dir).name)]
    shards = {}
    for split, split_names in names.items():
        missing = [name for name in split_names if name not in recorded.get(split, {})]
        if missing or not split_names:
            what = f"{missing[0]} is not listed in" if missing else f"no {split} shard is listed in"
            raise GcvimoeError(f"{what} {info_path}; name shards that `gcvimoe convert shards` wrote")
        shards[split] = [Shard(str(root / name), recorded[split][name]) for name in split_names]
        absent = [shard.path for shard in shards[split] if not Path(shard.path).is_file()]
        if absent:
            raise GcvimoeError(f"shard {absent[0]} not found ({len(absent)} missing); check --data-dir")
    return info, shards


@register_source
class ShardSource(DataSource):
    """Tar shards (``--dataset wds``, or a ``--data-dir`` that is a shard pattern or a folder with ``_info.json``):
    streamed, split over processes and loader workers by shard (:mod:`gcvimoe.data.shard_stream`)."""
    name = "wds"

    def claims(self, data_dir):
        """A brace pattern, or a shard or a folder with ``_info.json`` (a lone ``.tar`` is a folder mistaken)."""
        root = Path(data_dir).parent if data_dir.endswith(".tar") else Path(data_dir)
        return "{" in data_dir or (root / INFO).is_file()

    def resolve(self, dataset, data_dir, img_size, in_chans, notes):
        if not data_dir:
            raise GcvimoeError("dataset 'wds' needs --data-dir: a folder of shards or a pattern such as "
                               "'shards/train-{000000..000127}.tar'")
        info, shards = read_layout(data_dir)
        first = (read_image(sample.image, "RGB") for sample in shard_samples(shards["train"], MEASURED_SAMPLES))
        chans, size, mean, std = from_stats(measure_images(first, data_dir), img_size, in_chans, notes)
        return Native(info["classes"], chans, size, mean, std, data_dir)

    def count(self, data_cfg, split="train"):
        return sum(shard.length for shard in read_layout(data_cfg.data_dir)[1][split])

    def build(self, data_cfg, split, transform=None, class_names=None, skip_unreadable=False,
              max_unreadable_fraction=None):
        return ShardStream(read_layout(data_cfg.data_dir)[1][split], image_mode(data_cfg), transform)

