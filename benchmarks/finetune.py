"""Upcycling on the CPU: a dense GC ViT nano fine-tuned as a GCViMoE, against the same dense model trained on and a
GCViMoE trained from scratch for the same total epochs.

Four runs of the real command line, on a Fashion-MNIST subset written out as a PNG image folder (the path a user's
own data takes):

- ``dense``: the dense nano (``--num-experts 0``) for ``--pretrain-epochs``;
- ``upcycled``: ``--initial-checkpoint dense/model --num-experts 8`` for ``--finetune-epochs`` (every expert starts
  as the dense MLP; the evaluation before its first step is the dense model's);
- ``dense_on``: ``--initial-checkpoint dense/model --num-experts 0``, the same fine-tune recipe, so the only
  difference from ``upcycled`` is the experts;
- ``moe_scratch``: the GCViMoE from random weights for ``pretrain + finetune`` epochs with the pre-training recipe.

Writes ``<output>/results.json``, ``benchmarks/results/finetune.png`` (top-1 against total epochs) and the
``finetune`` section of ``benchmarks/RESULTS.md``. Accuracy only: wall times are listed for scale, and the runs go
two at a time, one thread each.

    python benchmarks/finetune.py                          # 12000 train / 2000 test images, 3 + 3 epochs
    python benchmarks/finetune.py --train-images 60000 --test-images 10000 --pretrain-epochs 6 --finetune-epochs 6

``--from-timm`` runs the fine-tune recipe's check instead (section ``finetune_timm``): dense weights pre-trained here
on one half of Fashion-MNIST's classes, saved as a timm ``gcvit_xxtiny`` state dict, then fine-tuned on the other
half, both as 64 px RGB folders, by ``gcvimoe train --data-dir D --initial-checkpoint F --epochs 3`` (no ``-c``:
the fine-tune recipe) and by the same command with ``-c gcvimoe_tiny`` (the from-scratch ImageNet recipe).

    python benchmarks/finetune.py --from-timm --train-images 1000 --test-images 500   # 2500 pre-training images
"""
import argparse
import csv
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from _common import machine, write_section

from gcvimoe.data.fashion_mnist import FASHION_MNIST_CLASSES, fashion_mnist_dir, read_idx

ROOT = Path(__file__).resolve().parents[1]
PLOT = ROOT / "benchmarks" / "results" / "finetune.png"


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-images", type=int, default=12000, help="first N training images (class-balanced)")
    parser.add_argument("--test-images", type=int, default=2000, help="first N test images, the val/ split")
    parser.add_argument("--pretrain-epochs", type=int, default=3)
    parser.add_argument("--finetune-epochs", type=int, default=3)
    parser.add_argument("--finetune-lr", type=float, default=1e-3, help="peak LR of both fine-tunes")
    parser.add_argument("--output", default="runs/finetune")
    parser.add_argument("--data-dir", help="Fashion-MNIST IDX files (default: the Debian package's folder)")
    parser.add_argument("--no-report", action="store_true", help="do not rewrite benchmarks/RESULTS.md")
    parser.add_argument("--from-timm", action="store_true",
                        help="the fine-tune recipe from a timm gcvit_xxtiny state dict against -c gcvimoe_tiny")
    parser.add_argument("--pretrain-images", type=int, default=2500, help="--from-timm: pre-training images")
    return parser.parse_args()


def write_folder(idx_dir: Path, root: Path, train_images: int, test_images: int) -> Path:
    """The first images of each split as ``root/{train,val}/<class>/<n>.png`` (kept if already written)."""
    if (root / "done").is_file():
        return root
    for split, prefix, count in (("train", "train", train_images), ("val", "t10k", test_images)):
        images = read_idx(idx_dir / f"{prefix}-images-idx3-ubyte.gz")[:count]
        labels = read_idx(idx_dir / f"{prefix}-labels-idx1-ubyte.gz")[:count]
        for name in FASHION_MNIST_CLASSES:
            (root / split / name.replace("/", "-")).mkdir(parents=True, exist_ok=True)
        for i, (image, label) in enumerate(zip(images, labels)):
            name = FASHION_MNIST_CLASSES[int(label)].replace("/", "-")
            Image.fromarray(np.asarray(image, dtype=np.uint8)).save(root / split / name / f"{i}.png")
    (root / "done").write_text("")
    return root


def commands(args, data: Path, out: Path):
    """The two phases of runs: name -> `gcvimoe train` arguments."""
    common = ["-c", "fashion_mnist", "--dataset", "folder", "--data-dir", str(data), "--in-chans", "1",
              "--threads", "1", "--overwrite", "--tensorboard", "false"]
    total = args.pretrain_epochs + args.finetune_epochs
    finetune = ["--epochs", str(args.finetune_epochs), "--warmup-epochs", "0", "--lr", str(args.finetune_lr),
                "--initial-checkpoint", str(out / "dense" / "model")]
    first = {"dense": common + ["--num-experts", "0", "--epochs", str(args.pretrain_epochs)],
             "moe_scratch": common + ["--num-experts", "8", "--epochs", str(total)]}
    second = {"upcycled": common + finetune + ["--num-experts", "8"],
              "dense_on": common + finetune + ["--num-experts", "0"]}
    return first, second


def run_phase(runs: dict, out: Path) -> dict:
    """Run the phase's trainings side by side; returns name -> wall seconds."""
    start, wall, procs = time.perf_counter(), {}, {}
    for name, argv in runs.items():
        log = open(out / f"{name}.out", "w")
        command = [sys.executable, "-m", "gcvimoe", "train", *argv, "--output", str(out / name)]
        procs[name] = (subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT), log)
    while procs:
        for name, (proc, log) in list(procs.items()):
            if proc.poll() is not None:
                log.close()
                if proc.returncode != 0:
                    sys.exit(f"{name} failed, see {out / name}.out")
                wall[name] = time.perf_counter() - start
                del procs[name]
        time.sleep(1)
    return wall


def top1_curve(run: Path):
    with open(run / "summary.csv") as f:
        return [float(row["eval_top1"]) for row in csv.DictReader(f)]


def initial_top1(run: Path) -> float:
    match = re.search(r"epoch\s+0 \(initial weights\).*?top-1\s+([0-9.]+)", (run / "train.log").read_text())
    return float(match.group(1))


def plot(results: dict, args) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(6.4, 3.8), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    start = args.pretrain_epochs
    curves = {
        "dense nano": (range(1, start + 1), results["dense"]["top1"], "C0", "-"),
        "dense, trained on": (range(start, start + args.finetune_epochs + 1),
                              [results["dense_on"]["initial_top1"]] + results["dense_on"]["top1"], "C0", "--"),
        "upcycled to 8 experts": (range(start, start + args.finetune_epochs + 1),
                                  [results["upcycled"]["initial_top1"]] + results["upcycled"]["top1"], "C3", "-"),
        "GCViMoE from scratch": (range(1, len(results["moe_scratch"]["top1"]) + 1), results["moe_scratch"]["top1"],
                                 "C2", ":"),
    }
    for label, (x, y, colour, style) in curves.items():
        ax.plot(list(x), y, style, color=colour, marker="o", markersize=3, label=label)
    ax.axvline(start, color="0.7", linewidth=0.8)
    ax.set_xlabel("total epochs")
    ax.set_ylabel("test top-1 (%)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(f"Fashion-MNIST subset ({args.train_images} train / {args.test_images} test images)", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    PLOT.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(PLOT, dpi=100)


def report(results: dict, args) -> str:
    lines = [f"Latest run: {machine()}. `python benchmarks/finetune.py --train-images {args.train_images} "
             f"--test-images {args.test_images} --pretrain-epochs {args.pretrain_epochs} --finetune-epochs "
             f"{args.finetune_epochs}`: recipe `-c fashion_mnist` on a PNG folder (1 channel, 32 px), fine-tunes at "
             f"LR {args.finetune_lr:g} without warmup; one seed. Test top-1 of the last epoch; wall times are for "
             f"scale only (two runs at a time, one thread each, other jobs on the machine).", "",
             "| run | epochs | start top-1 | last top-1 | best top-1 | wall (s) |", "|---|---|---|---|---|---|"]
    for name, label in (("dense", "dense nano (pre-training)"), ("dense_on", "dense nano, trained on"),
                        ("upcycled", "upcycled to 8 experts, fine-tuned"), ("moe_scratch", "GCViMoE nano, scratch")):
        r = results[name]
        start = f"{r['initial_top1']:.2f}" if "initial_top1" in r else "-"
        lines.append(f"| {label} | {r['epochs']} | {start} | {r['top1'][-1]:.2f} | {max(r['top1']):.2f} | "
                     f"{r['wall_s']:.0f} |")
    lines += ["", f"![top-1 against total epochs](results/{PLOT.name})"]
    return "\n".join(lines)


def main():
    args = parse_args()
    if args.from_timm:
        from finetune_timm import main as from_timm
        return from_timm(args)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    data = write_folder(fashion_mnist_dir(args.data_dir or ""), out / "data", args.train_images, args.test_images)
    first, second = commands(args, data, out)
    wall = run_phase(first, out)
    wall.update(run_phase(second, out))
    results = {}
    for name in (*first, *second):
        results[name] = {"top1": top1_curve(out / name), "wall_s": wall[name]}
        results[name]["epochs"] = len(results[name]["top1"])
        if name in second:
            results[name]["initial_top1"] = initial_top1(out / name)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    plot(results, args)
    body = report(results, args)
    print(body)
    if not args.no_report:
        write_section("finetune", "## Upcycling and fine-tuning (benchmarks/finetune.py)\n\n" + body)


if __name__ == "__main__":
    main()
