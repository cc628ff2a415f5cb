"""The flip probe on kinds of folder: what it measures and decides, and what each flip setting reaches.

    python benchmarks/flip_probe.py make      # runs/flip_probe/<kind>/{train,val}: the folders below
    python benchmarks/flip_probe.py probe     # the probe's measurement and decision on each folder's training images
    python benchmarks/flip_probe.py run       # per folder: the plain command and its twin with the other flip setting,
                                              # then the digits without warmup and at twice the lr (RECIPE_RUNS)
    python benchmarks/flip_probe.py report    # RESULTS.md section from what has finished

The folders (val images are never the probe's; no folder uses a test split):

- ``digits``: scikit-learn's 1,797 digits (8x8, written at 32 px), a stratified 80/20 split;
- ``glyphs``: the 10 digits and 26 capital letters rendered with the DejaVu fonts at random sizes, shifts, rotations
  and stroke widths (28 px);
- ``letters``: the 26 capital letters alone, rendered the same way;
- ``fashion``: 2,000 Fashion-MNIST training images, and 1,000 other training images as val;
- ``shapes``: mirror-symmetric shapes (disc, ring, square, diamond, upward triangle, cross, ...) at random places,
  sizes and contrasts on a noisy background (32 px);
- ``textures``: mirror-symmetric textures (stripes, checks, dots, rings, noise of several grains) at random phases.

Each run is `gcvimoe train --data-dir DIR --epochs N --seed 0` (the plain command) and the same with the other flip
setting (`--hflip 0` where the probe keeps flips, `--hflip 0.5` where it turns them off). One seed; the last
epoch's top-1.
"""
import argparse
import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from _common import machine, write_section

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ROOT / "runs" / "flip_probe"
OUT = ROOT / "runs" / "flip_probe_runs"
FONTS = sorted(Path("/usr/share/fonts/truetype/dejavu").glob("DejaVu*.ttf"))
EPOCHS = 8
SEED = 0
GLYPHS = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def _save(root: Path, split: str, label: str, index: int, array: np.ndarray) -> None:
    folder = root / split / label
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.clip(array, 0, 255).astype(np.uint8), mode="L").save(folder / f"{index:05d}.png")


def _write_split(root: Path, make_image, classes, per_class: int, val_per_class: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    index = 0
    for label in classes:
        for i in range(per_class + val_per_class):
            _save(root, "train" if i < per_class else "val", str(label), index, make_image(label, rng))
            index += 1


def make_digits(root: Path) -> None:
    from sklearn.datasets import load_digits
    digits = load_digits()
    rng = np.random.default_rng(0)
    for index, (image, label) in enumerate(zip(digits.images, digits.target)):
        split = "val" if rng.random() < 0.2 else "train"
        big = Image.fromarray((image * 16).clip(0, 255).astype(np.uint8), mode="L").resize((32, 32), Image.BILINEAR)
        _save(root, split, str(label), index, np.asarray(big))


def render_glyph(text: str, rng, size: int = 28) -> np.ndarray:
    """One character in a random DejaVu font, size, stroke, rotation and place, white on black."""
    font = ImageFont.truetype(str(FONTS[rng.integers(len(FONTS))]), int(rng.integers(14, 23)))
    canvas = Image.new("L", (2 * size, 2 * size), 0)
    ImageDraw.Draw(canvas).text((size, size), text, fill=int(rng.integers(160, 256)), font=font, anchor="mm",
                                stroke_width=int(rng.integers(0, 2)), stroke_fill=255)
    canvas = canvas.rotate(float(rng.uniform(-12, 12)), resample=Image.BILINEAR)
    dx, dy = rng.integers(-4, 5, size=2)
    left, top = size // 2 - dx, size // 2 - dy
    return np.asarray(canvas.crop((left, top, left + size, top + size)), dtype=np.float32)


def _noisy_background(rng, size: int) -> np.ndarray:
    return rng.normal(rng.uniform(20, 90), rng.uniform(3, 15), (size, size))


def draw_shape(name: str, rng, size: int = 32) -> np.ndarray:
    """A mirror-symmetric shape (symmetric about its vertical axis) at a random place, size and contrast."""
    image = Image.fromarray(np.zeros((size, size), np.uint8), mode="L")
    draw = ImageDraw.Draw(image)
    r = rng.uniform(6, 11)
    cx, cy = rng.uniform(r + 1, size - r - 1, size=2)
    fill = 255
    if name == "disc":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif name == "ring":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), outline=fill, width=3)
    elif name == "square":
        draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif name == "diamond":
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill)
    elif name == "triangle":
        draw.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=fill)
    elif name == "cross":
        draw.rectangle((cx - r, cy - r / 3, cx + r, cy + r / 3), fill=fill)
        draw.rectangle((cx - r / 3, cy - r, cx + r / 3, cy + r), fill=fill)
    elif name == "bar":
        draw.rectangle((cx - r, cy - r / 4, cx + r, cy + r / 4), fill=fill)
    elif name == "star":
        points = [(cx + (r if k % 2 == 0 else r / 2.5) * math.sin(k * math.pi / 5),
                   cy - (r if k % 2 == 0 else r / 2.5) * math.cos(k * math.pi / 5)) for k in range(10)]
        draw.polygon(points, fill=fill)
    shape = np.asarray(image, dtype=np.float32) / 255
    background = _noisy_background(rng, size)
    return background + shape * rng.uniform(80, 160)


SHAPES = ("disc", "ring", "square", "diamond", "triangle", "cross", "bar", "star")


def draw_texture(name: str, rng, size: int = 32) -> np.ndarray:
    """A texture whose mirror image is the same texture (random phase and period)."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    period = rng.uniform(4, 9)
    px, py = rng.uniform(0, 2 * math.pi, size=2)
    if name == "hstripes":
        pattern = np.sin(2 * math.pi * y / period + py)
    elif name == "vstripes":
        pattern = np.sin(2 * math.pi * x / period + px)
    elif name == "checks":
        pattern = np.sign(np.sin(2 * math.pi * x / period + px) * np.sin(2 * math.pi * y / period + py))
    elif name == "dots":
        pattern = (np.sin(2 * math.pi * x / period + px) + np.sin(2 * math.pi * y / period + py) > 1.2) * 2.0 - 1
    elif name == "rings":
        cx, cy = rng.uniform(0, size, size=2)
        pattern = np.sin(2 * math.pi * np.hypot(x - cx, y - cy) / period)
    elif name == "fine_noise":
        pattern = rng.normal(0, 1, (size, size))
    else:  # coarse_noise
        small = rng.normal(0, 1, (size // 8, size // 8))
        pattern = np.asarray(Image.fromarray(small.astype(np.float32), mode="F").resize((size, size), Image.BICUBIC))
    return 128 + pattern * rng.uniform(40, 90) + rng.normal(0, 8, (size, size))


TEXTURES = ("hstripes", "vstripes", "checks", "dots", "rings", "fine_noise", "coarse_noise")


def make_fashion(root: Path) -> None:
    sys.path.insert(0, str(Path(__file__).parent))
    from small_images import CLASSES, load_split
    images, labels = load_split("train")
    order = np.random.default_rng(2).permutation(len(images))
    for split, indices in (("train", order[:2000]), ("val", order[2000:3000])):
        for i in indices:
            _save(root, split, CLASSES[labels[i]], int(i), images[i])


KINDS = {
    "digits": (make_digits, "scikit-learn digits, 1,797 at 32 px"),
    "glyphs": (lambda root: _write_split(root, render_glyph, GLYPHS, 60, 20, 1),
               "digits and capital letters rendered with DejaVu fonts, 28 px"),
    "letters": (lambda root: _write_split(root, render_glyph, LETTERS, 60, 20, 2),
                "capital letters alone, rendered the same way"),
    "fashion": (make_fashion, "Fashion-MNIST, 2,000 training images (1,000 other training images as val)"),
    "shapes": (lambda root: _write_split(root, draw_shape, SHAPES, 200, 60, 3),
               "mirror-symmetric shapes on noise, 32 px"),
    "textures": (lambda root: _write_split(root, draw_texture, TEXTURES, 200, 60, 4),
                 "mirror-symmetric textures at random phases, 32 px"),
}
CHARACTER_KINDS = ("digits", "glyphs", "letters")


def make_all() -> None:
    for kind, (make, _) in KINDS.items():
        target = FOLDERS / kind
        if target.is_dir():
            continue
        tmp = target.with_name(kind + ".tmp")
        make(tmp)
        tmp.rename(target)
        print(f"wrote {target}")


def probe(kind: str):
    from gcvimoe.data.flip_probe import decide_hflip, probe_dataset, probe_transform
    from gcvimoe.data.folder import ImageFolder
    train = ImageFolder(FOLDERS / kind, "train", transform=probe_transform())
    measured = probe_dataset(train, len(train.classes))
    return measured, decide_hflip(measured)[0]


def probe_all() -> None:
    for kind in KINDS:
        measured, hflip = probe(kind)
        print(f"{kind:9s} probe {100 * measured.accuracy:5.1f} -> mirrored {100 * measured.mirrored_accuracy:5.1f} "
              f"(chance {100 * measured.chance:4.1f}) loss {100 * measured.loss:5.1f} % -> hflip {hflip:g}",
              flush=True)


def _train(kind: str, name: str, extra) -> None:
    _run(OUT / kind / name, ["--data-dir", str(FOLDERS / kind), "--epochs", str(EPOCHS), "--seed", str(SEED), *extra])


def _run(folder: Path, flags) -> None:
    if (folder / "summary.csv").is_file() and (folder / "done.json").is_file():
        return
    command = [sys.executable, "-m", "gcvimoe", "train", *flags, "--output", str(folder), "--overwrite",
               "--no-tensorboard"]
    folder.mkdir(parents=True, exist_ok=True)
    print(" ".join(command[1:]), flush=True)
    with open(folder.with_suffix(".out"), "w") as log:
        subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, check=True, cwd=ROOT)
    (folder / "done.json").write_text(json.dumps({"command": command[1:]}))


RECIPE_RUNS = {
    "no warmup": ["--dataset", "digits", "--epochs", "4", "--warmup-epochs", "0"],
    "twice the lr, with warmup": ["--dataset", "digits", "--epochs", "4", "--lr", "4e-3"],
}
"""The recipe's robustness on the embedded digits (the default model and lr 2e-3 otherwise)."""


def run_all() -> None:
    for kind in KINDS:
        _, hflip = probe(kind)
        _train(kind, "plain", [])
        _train(kind, "other", ["--hflip", "0.5" if hflip == 0 else "0"])
    for name, flags in RECIPE_RUNS.items():
        _run(OUT / "recipe" / name.replace(" ", "_").replace(",", ""), flags)


def _last_top1(folder: Path):
    try:
        with open(folder / "summary.csv") as f:
            rows = list(csv.DictReader(f))
        return float(rows[-1]["eval_top1"]) if (folder / "done.json").is_file() else None
    except (OSError, IndexError, KeyError):
        return None


def _header_hflip(folder: Path) -> str:
    out = folder.with_suffix(".out")
    if not out.is_file():
        return ""
    return next((line.strip() for line in out.read_text().splitlines() if line.strip().startswith("hflip ")), "")


def _percent(value) -> str:
    return "-" if value is None else f"{value:.2f}"


def report() -> None:
    from gcvimoe.data.flip_probe import MAX_MIRROR_LOSS
    lines = [
        "The probe (`gcvimoe.data.flip_probe`) on the training images of each folder "
        "(`python benchmarks/flip_probe.py make probe run report`): nearest-class-mean top-1 on up to 3,000 training "
        "images at 16 px grey, each left out of its own class's mean, and the same with the queries mirrored. "
        "'loss' is the share of the above-chance accuracy that mirroring costs; over "
        f"{100 * MAX_MIRROR_LOSS:.0f} % the plain command trains without flips. Then the plain `gcvimoe train --data-dir DIR --epochs "
        f"{EPOCHS} --seed {SEED}` against the same command with the other flip setting (one seed; the last epoch's "
        "val top-1; small folders, so a point is a few images).",
        "",
        "| folder | classes | train / val | probe top-1 | mirrored | loss | plain: hflip | plain top-1 | "
        "other setting | its top-1 | plain - other |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    from gcvimoe.data.folder import count_images, find_classes
    for kind, (_, words) in KINDS.items():
        measured, hflip = probe(kind)
        plain, other = _last_top1(OUT / kind / "plain"), _last_top1(OUT / kind / "other")
        diff = "-" if plain is None or other is None else f"{plain - other:+.2f}"
        classes = len(find_classes(FOLDERS / kind / "train"))
        sizes = f"{count_images(FOLDERS / kind, 'train')} / {count_images(FOLDERS / kind, 'val')}"
        lines.append(f"| {kind}: {words} | {classes} | {sizes} | {100 * measured.accuracy:.1f} | "
                     f"{100 * measured.mirrored_accuracy:.1f} | {100 * measured.loss:.0f} % | {hflip:g} | "
                     f"{_percent(plain)} | --hflip {0.5 if hflip == 0 else 0:g} | {_percent(other)} | {diff} |")
    lines += ["", "The recipe without warmup and at twice its lr, on the embedded digits (`gcvimoe train` with the "
              "flags below; default model gcvimoe_pico): top-1 after each epoch.", "",
              "| run | flags | loss at the first step | top-1 per epoch |", "|---|---|---|---|"]
    for name, flags in RECIPE_RUNS.items():
        folder = OUT / "recipe" / name.replace(" ", "_").replace(",", "")
        try:
            with open(folder / "summary.csv") as f:
                top1 = ", ".join(f"{float(row['eval_top1']):.2f}" for row in csv.DictReader(f))
            first = next(line for line in folder.with_suffix(".out").read_text().splitlines()
                         if line.startswith("step "))
            loss = first.split("| loss ")[1].split()[0]
        except (OSError, StopIteration, IndexError):
            top1 = loss = "-"
        lines.append(f"| {name} | `{' '.join(flags)}` | {loss} | {top1} |")
    lines += ["", f"Machine: {machine()}."]
    write_section("Flip probe", "\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("steps", nargs="+", choices=["make", "probe", "run", "report"])
    args = parser.parse_args()
    actions = {"make": make_all, "probe": probe_all, "run": run_all, "report": report}
    for step in args.steps:
        actions[step]()


if __name__ == "__main__":
    main()
