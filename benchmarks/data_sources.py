"""Sample throughput of tar shards against the image folder they were written from, with 0, 1 and 2 loader workers.

A folder of synthetic PNG images (noise over a per-class shape, ``--size`` px) is written once, then converted with
``gcvimoe convert shards``; both are read through the training path (:func:`gcvimoe.data.create_dataset` with the
training transform, :func:`gcvimoe.data.create_loader`, one process), one epoch per timing, the sources and worker
counts interleaved so the machine's background load falls on all of them alike. No model runs: this is the loader's
ceiling, in training samples per second.

    .venv/bin/python benchmarks/data_sources.py                          # 4000 images of 64 px, 3 rounds
    .venv/bin/python benchmarks/data_sources.py --write                  # and the section of RESULTS.md
    .venv/bin/python benchmarks/data_sources.py --images 200 --rounds 1  # a quick check that it runs
"""
import argparse
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from _common import interleaved_times, machine, median, write_section

from gcvimoe.data import build_transform, create_dataset, create_loader, resolve_data_config, set_epoch
from gcvimoe.data.shards import write_shards

ROOT = Path(__file__).resolve().parents[1]
CLASSES = 10
WORKERS = (0, 1, 2)


def write_folder(root: Path, images: int, size: int) -> None:
    """``images`` training and ``images // 5`` val PNGs, a shape per class under per-image noise."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:size, :size] / size
    for split, count in (("train", images), ("val", max(CLASSES, images // 5))):
        for index in range(count):
            label = index % CLASSES
            shape = np.sin((label + 1) * np.pi * (xx + yy * (label % 3)))[..., None] * np.array([90, 60, 30])
            pixels = 128 + shape + rng.integers(-40, 40, (size, size, 3))
            folder = root / split / f"class{label}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(folder / f"{index:06d}.png")


def prepare(work: Path, images: int, size: int, images_per_shard: int):
    """The folder and its shards under ``work``, written again when their size or count differs."""
    stamp = work / f"images{images}-size{size}-shard{images_per_shard}"
    if not stamp.exists():
        shutil.rmtree(work, ignore_errors=True)
        write_folder(work / "folder", images, size)
        write_shards(work / "folder", work / "shards", images_per_shard)
        stamp.touch()
    return work / "folder", work / "shards"


def epoch_reader(dataset, batch_size: int, workers: int):
    """A function that reads one training epoch of ``dataset`` with ``workers`` loader processes."""
    loader = create_loader(dataset, batch_size, is_training=True, workers=workers, seed=0)
    epochs = iter(range(1_000_000))

    def read() -> None:
        set_epoch(loader, next(epochs), seed=0)
        for _ in loader:
            pass
    return read, len(loader) * batch_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=4000, help="training images (default: 4000)")
    parser.add_argument("--size", type=int, default=64, help="image side in pixels (default: 64)")
    parser.add_argument("--images-per-shard", type=int, default=250)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--work", default=str(ROOT / "runs" / "data_sources"), help="where the data is written")
    parser.add_argument("--write", action="store_true", help="write the table into RESULTS.md")
    args = parser.parse_args()

    folder, shards = prepare(Path(args.work), args.images, args.size, args.images_per_shard)
    readers, samples = {}, {}
    for name, dataset, data_dir in (("folder", "folder", folder), ("shards", "wds", shards)):
        data_cfg = resolve_data_config(dataset, str(data_dir), img_size=args.size, in_chans=3)
        train_set = create_dataset(data_cfg, "train", build_transform(data_cfg, is_training=True, hflip=0.5))
        for workers in WORKERS:
            readers[(name, workers)], samples[(name, workers)] = epoch_reader(train_set, args.batch_size, workers)
    times = interleaved_times({f"{name} {workers}": read for (name, workers), read in readers.items()},
                              rounds=args.rounds)
    lines = [
        "## Data sources: tar shards vs the image folder",
        "",
        f"`benchmarks/data_sources.py --images {args.images} --size {args.size} --images-per-shard "
        f"{args.images_per_shard} --batch-size {args.batch_size} --rounds {args.rounds}`: training samples per "
        "second read through `create_dataset` + `create_loader` (PNG decoding, timm's training transform, one "
        f"process, no model), median of {args.rounds} epochs. {machine()}.",
        "",
        "| source | " + " | ".join(f"{workers} workers" for workers in WORKERS) + " |",
        "|---|" + "---:|" * len(WORKERS),
    ]
    for name in ("folder", "shards"):
        rates = [samples[(name, workers)] / median(times[f"{name} {workers}"]) for workers in WORKERS]
        lines.append(f"| {name} | " + " | ".join(f"{rate:,.0f}" for rate in rates) + " |")
    print("\n".join(lines))
    if args.write:
        write_section("data_sources", "\n".join(lines))


if __name__ == "__main__":
    main()
