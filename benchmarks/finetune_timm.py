"""``benchmarks/finetune.py --from-timm``: the fine-tune recipe (picked by ``--initial-checkpoint`` without ``-c``)
against the from-scratch ImageNet recipe (``-c gcvimoe_tiny``), both starting from a timm ``gcvit_xxtiny`` state
dict, on a 64 px RGB image folder.

The "pretrained" weights are made here, without downloads: a dense ``gcvimoe_xxtiny`` trained on Fashion-MNIST's
first five classes, loaded into timm's own ``gcvit_xxtiny`` and saved as its plain state dict. The fine-tunes learn
the other five classes. The images are tinted with a random colour each, so the folder is RGB and colour carries no
class.
"""
import csv
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import timm
import torch
from PIL import Image

from _common import machine, write_section

import gcvimoe  # noqa: F401  (registers the models)
from gcvimoe.data.fashion_mnist import FASHION_MNIST_CLASSES, fashion_mnist_dir, read_idx
from gcvimoe.models import create_model_from_checkpoint

SIZE = 64
PRETRAIN_CLASSES, FINETUNE_CLASSES = range(0, 5), range(5, 10)


def write_rgb_folder(idx_dir: Path, root: Path, classes, train_images: int, val_images: int) -> Path:
    """``root/{train,val}/<class>/<n>.png``: the first images of ``classes``, 64 px, each tinted (kept if written)."""
    if (root / "done").is_file():
        return root
    rng = np.random.default_rng(0)
    for split, prefix, count in (("train", "train", train_images), ("val", "t10k", val_images)):
        images = read_idx(idx_dir / f"{prefix}-images-idx3-ubyte.gz")
        labels = read_idx(idx_dir / f"{prefix}-labels-idx1-ubyte.gz")
        chosen = [i for i in range(len(labels)) if int(labels[i]) in classes][:count]
        for i in chosen:
            name = FASHION_MNIST_CLASSES[int(labels[i])].replace("/", "-")
            (root / split / name).mkdir(parents=True, exist_ok=True)
            tint = rng.uniform(0.4, 1.0, size=3)
            pixels = (np.asarray(images[i], dtype=np.float32)[..., None] * tint).astype(np.uint8)
            Image.fromarray(pixels).resize((SIZE, SIZE), Image.BICUBIC).save(root / split / name / f"{i}.png")
    (root / "done").write_text("")
    return root


def train(argv, output: Path, reuse: bool = False) -> float:
    """Run ``gcvimoe train`` with ``argv``; returns the wall seconds (0 for a finished run ``reuse`` keeps)."""
    if reuse and (output / "model" / "config.json").is_file():
        return 0.0
    start = time.perf_counter()
    with open(output.with_suffix(".out"), "w") as log:
        command = [sys.executable, "-m", "gcvimoe", "train", *argv, "--output", str(output), "--overwrite",
                   "--tensorboard", "false"]
        if subprocess.run(command, stdout=log, stderr=subprocess.STDOUT).returncode != 0:
            sys.exit(f"{output.name} failed, see {output.with_suffix('.out')}")
    return time.perf_counter() - start


def timm_state_dict(model_dir: Path, path: Path) -> Path:
    """The dense run's weights as a plain timm ``gcvit_xxtiny`` state dict (loaded strictly into timm's model)."""
    ours = create_model_from_checkpoint(model_dir)
    reference = timm.create_model("gcvit_xxtiny", img_size=SIZE, num_classes=ours.num_classes)
    reference.load_state_dict(ours.state_dict(), strict=True)
    torch.save(reference.state_dict(), path)
    return path


def top1(run: Path):
    with open(run / "summary.csv") as f:
        return [float(row["eval_top1"]) for row in csv.DictReader(f)]


def header_line(run: Path, pattern: str) -> str:
    match = re.search(pattern, (run / "train.log").read_text())
    return match.group(0).strip() if match else "-"


def main(args) -> None:
    out = Path(args.output + "_timm")
    out.mkdir(parents=True, exist_ok=True)
    idx = fashion_mnist_dir(args.data_dir or "")
    pre = write_rgb_folder(idx, out / "pretrain_data", PRETRAIN_CLASSES, args.pretrain_images, 500)
    data = write_rgb_folder(idx, out / f"finetune_data_{args.train_images}_{args.test_images}", FINETUNE_CLASSES,
                            args.train_images, args.test_images)
    wall = {"pretrain": train(["--data-dir", str(pre), "--model", "gcvimoe_xxtiny", "--num-experts", "0",
                               "--epochs", str(args.pretrain_epochs)], out / "pretrain", reuse=True)}
    weights = timm_state_dict(out / "pretrain" / "model", out / "gcvit_xxtiny.pth")
    # loading in the training process for both: the ImageNet recipe's workers, forked from a 224 px run, exhaust 24 GiB
    command = ["--data-dir", str(data), "--initial-checkpoint", str(weights), "--epochs", "3", "--workers", "0"]
    wall["finetune"] = train(command, out / "finetune")
    # the ImageNet recipe's 10 cooldown epochs at min_lr (224 px on a CPU) are left out: 3 epochs each
    wall["gcvimoe_tiny"] = train(["-c", "gcvimoe_tiny", *command, "--cooldown-epochs", "0"], out / "gcvimoe_tiny")
    rows = {name: top1(out / name) for name in wall}
    lines = [
        f"Latest run: {machine()}. `python benchmarks/finetune.py --from-timm --pretrain-images "
        f"{args.pretrain_images} --pretrain-epochs {args.pretrain_epochs} --train-images {args.train_images} "
        f"--test-images {args.test_images}`. Pre-training: dense `gcvimoe_xxtiny` from scratch (default recipe) on "
        f"Fashion-MNIST classes 0-4 as a 64 px RGB folder, saved as a timm `gcvit_xxtiny` state dict (loaded strictly "
        f"into `timm.create_model('gcvit_xxtiny')`). Fine-tuning on classes 5-9 (the same folder form): "
        f"`gcvimoe train --data-dir D --initial-checkpoint gcvit_xxtiny.pth --epochs 3 --workers 0`, with no `-c` "
        f"and with `-c gcvimoe_tiny` (plus `--cooldown-epochs 0`: that recipe adds 10 epochs at min_lr after the "
        f"schedule, at 224 px, too long for this CPU). `--workers 0` on both: with the recipe's 8 loader processes, "
        f"and with 2, the 224 px run went out of this 24 GiB machine's memory at its second epoch. One seed each. "
        f"Wall times are for scale only (a shared 2-core machine; 0 = the pre-training of an earlier run, reused).",
        "",
        "| run | recipe (header) | top-1 per epoch | best top-1 | wall (s) |",
        "|---|---|---|---|---|",
    ]
    for name, label in (("pretrain", "pre-training (classes 0-4)"), ("finetune", "fine-tune, no `-c`"),
                        ("gcvimoe_tiny", "same command, `-c gcvimoe_tiny`")):
        recipe = header_line(out / name, r"recipe -c finetune \(picked by[^)]*\)") if name == "finetune" else \
            ("`-c gcvimoe_tiny`" if name == "gcvimoe_tiny" else "default")
        lines.append(f"| {label} | {recipe} | {', '.join(f'{v:.2f}' for v in rows[name])} | {max(rows[name]):.2f} | "
                     f"{wall[name]:.0f} |")
    lines += ["", "The fine-tune header's first lines: " + "; ".join(
        f"`{header_line(out / 'finetune', pattern)}`" for pattern in (r"model gcvimoe_xxtiny \(from the initial[^)]*\)",
                                                                      r"upcycled the dense weights[^\n]*"))]
    body = "\n".join(lines)
    print(body)
    if not args.no_report:
        write_section("finetune_timm", "## Fine-tuning a timm gcvit_xxtiny state dict: `-c finetune` vs "
                                       "`-c gcvimoe_tiny` (benchmarks/finetune.py --from-timm)\n\n" + body)
