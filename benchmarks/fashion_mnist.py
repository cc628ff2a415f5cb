"""Fashion-MNIST: GCViMoE nano against its dense twin at equal active MACs, same recipe and epochs.

Trains ``gcvimoe_nano`` with 8 experts (top-1 routing: every token runs one expert MLP, the same compute as the dense
MLP it replaces) and with ``num_experts=0`` (the dense GC ViT twin), both from the built-in ``fashion_mnist`` config, on the
60000 training images, and evaluates on the 10000 test images. Writes ``<output>/results.json`` and the
``## Fashion-MNIST`` section of ``benchmarks/RESULTS.md``.

    python benchmarks/fashion_mnist.py                     # both models, one after the other
    python benchmarks/fashion_mnist.py --parallel          # both at once, one CPU thread each (2-core machines)
    python benchmarks/fashion_mnist.py --report-only       # rewrite the report from finished runs
    python benchmarks/fashion_mnist.py --epochs 2 --output runs/fmnist-short
    python benchmarks/fashion_mnist.py --epochs 30 -- --device cuda --workers 6   # after --: more train overrides

The images come from the Debian package ``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist``) or
``--data-dir``. Runs offline.
"""
import argparse
import csv
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

from _common import RESULTS, write_section

ROOT = Path(__file__).resolve().parents[1]
CONFIG = "fashion_mnist"
SECTION = "## Fashion-MNIST (benchmarks/fashion_mnist.py)"
VARIANTS = {"moe": 8, "dense": 0}  # name -> num_experts


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=CONFIG,
                        help="training recipe shared by both models (built-in name or YAML file)")
    parser.add_argument("--epochs", type=int, help="override the recipe's epochs (both models)")
    parser.add_argument("--data-dir", help="folder of the Fashion-MNIST IDX files")
    parser.add_argument("--output", default="runs/fashion_mnist", help="run folders and results.json go here")
    parser.add_argument("--parallel", action="store_true", help="train both models at once (the recipe uses 1 thread)")
    parser.add_argument("--no-report", action="store_true", help="do not rewrite benchmarks/RESULTS.md")
    parser.add_argument("--report-only", action="store_true", help="report on finished runs in --output, no training")
    parser.add_argument("--note", default="", help="a sentence added to the report (e.g. what else ran meanwhile)")
    parser.add_argument("train_overrides", nargs=argparse.REMAINDER,
                        help="after --: further `gcvimoe train` overrides for both models (e.g. -- --device cuda)")
    args = parser.parse_args()
    args.train_overrides = [a for a in args.train_overrides if a != "--"]
    return args


def train_command(args, name: str) -> list:
    command = [sys.executable, "-m", "gcvimoe", "train", "-c", args.config, "--num-experts", str(VARIANTS[name]),
               "--output", str(Path(args.output) / name)]
    if args.epochs:
        command += ["--epochs", str(args.epochs)]
    if args.data_dir:
        command += ["--data-dir", args.data_dir]
    return command + args.train_overrides


def run_trainings(args) -> dict:
    """Train the variants (sequentially or at once); returns name -> wall-clock seconds of the whole run."""
    wall = {}
    if args.parallel:
        start = time.perf_counter()
        logs = {name: open(Path(args.output) / f"{name}.out", "w") for name in VARIANTS}
        procs = {name: subprocess.Popen(train_command(args, name), stdout=logs[name], stderr=subprocess.STDOUT)
                 for name in VARIANTS}
        while procs:
            for name, proc in list(procs.items()):
                if proc.poll() is not None:
                    if proc.returncode != 0:
                        sys.exit(f"{name} training failed, see {logs[name].name}")
                    wall[name] = time.perf_counter() - start
                    del procs[name]
            time.sleep(1.0)
    else:
        for name in VARIANTS:
            start = time.perf_counter()
            subprocess.run(train_command(args, name), check=True)
            wall[name] = time.perf_counter() - start
    return wall


def read_run(folder: Path) -> dict:
    """Metrics of a finished run from its summary.csv and train.log."""
    with open(folder / "summary.csv") as f:
        rows = [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]
    log = (folder / "train.log").read_text()
    epoch_seconds = [float(s) for s in re.findall(r"img/s \| ([\d.]+)s", log)]
    train_images = int(re.search(r"(\d+) train /", log).group(1))
    best = max(rows, key=lambda row: row["eval_top1"])
    # training only (no evaluation), from each epoch's measured throughput
    train_seconds = sum(train_images / row["images_per_s"] for row in rows)
    return {
        "epochs": len(rows),
        "final_top1": rows[-1]["eval_top1"],
        "final_top5": rows[-1]["eval_top5"],
        "best_top1": best["eval_top1"],
        "best_epoch": int(best["epoch"]),
        "final_eval_loss": rows[-1]["eval_loss"],
        "train_seconds": train_seconds,
        "epoch_seconds_with_eval": sum(epoch_seconds),
        "images_per_s": train_images * len(rows) / train_seconds,
        "final_dropped_fraction": rows[-1]["dropped_fraction"],
        "curve_top1": [round(row["eval_top1"], 2) for row in rows],
    }


def model_sizes() -> dict:
    """Parameters and MACs per 32 px image of both variants (gcvimoe info's numbers)."""
    from gcvimoe.models.info import model_info
    info = model_info("gcvimoe_nano", num_classes=10, in_chans=1, img_size=32, num_experts=VARIANTS["moe"])
    return {
        "moe": {"total_params": info.total_params, "active_params": info.active_params, "macs": info.macs},
        "dense_macs": info.dense_macs,
    }


def describe_machine(train_overrides: list, recipe: dict) -> str:
    """The hardware the runs trained on: the GPU when they were told to use one, else the CPU."""
    cpu = f"{os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), torch {torch.__version__}"
    device = train_overrides[train_overrides.index("--device") + 1] if "--device" in train_overrides else "auto"
    if device != "cpu" and torch.cuda.is_available():
        amp = recipe.get("amp") or "--amp" in train_overrides
        precision = f"{recipe.get('amp_dtype', 'bfloat16')} mixed precision" if amp else "fp32"
        return f"one {torch.cuda.get_device_name()} ({precision}) with {cpu}"
    return cpu


def format_section(results: dict) -> str:
    moe, dense, sizes = results["moe"], results["dense"], results["sizes"]
    recipe = results["recipe"]
    lines = [
        SECTION,
        "",
        f"`gcvimoe_nano` with {VARIANTS['moe']} experts (top-1) against its dense twin (`--num-experts 0`), both "
        f"trained with `{recipe['config']}` for {moe['epochs']} epochs on the 60000 training images and evaluated on "
        f"the 10000 test images ({recipe['img_size']} px, batch {recipe['batch_size']}, AdamW lr {recipe['lr']:g}, "
        f"cosine, label smoothing {recipe['smoothing']}). Measured on {results['machine']}, "
        f"{results['date']}; {results['mode']}.",
        "",
        "| model | params (total / active) | MACs / image | best top-1 | final top-1 | final top-5 | "
        "training time | img/s | dropped tokens |",
        "|---|---|---|---|---|---|---|---|---|",
        f"| GCViMoE nano, 8 experts | {sizes['moe']['total_params'] / 1e6:.2f} M / "
        f"{sizes['moe']['active_params'] / 1e6:.2f} M | {sizes['moe']['macs'] / 1e6:.1f} M | "
        f"{moe['best_top1']:.2f} % (epoch {moe['best_epoch']}) | {moe['final_top1']:.2f} % | "
        f"{moe['final_top5']:.2f} % | {moe['train_seconds'] / 60:.1f} min | {moe['images_per_s']:.0f} | "
        f"{100 * moe['final_dropped_fraction']:.1f} % |",
        f"| dense GC ViT nano | {results['dense_params'] / 1e6:.2f} M / {results['dense_params'] / 1e6:.2f} M | "
        f"{sizes['dense_macs'] / 1e6:.1f} M | {dense['best_top1']:.2f} % (epoch {dense['best_epoch']}) | "
        f"{dense['final_top1']:.2f} % | {dense['final_top5']:.2f} % | {dense['train_seconds'] / 60:.1f} min | "
        f"{dense['images_per_s']:.0f} | – |",
        "",
        f"Top-1 per epoch, MoE: {', '.join(map(str, moe['curve_top1']))}; "
        f"dense: {', '.join(map(str, dense['curve_top1']))}.",
        "",
        "Training time counts the training passes only (images / measured throughput, summed over epochs), not "
        "evaluation or start-up. " + results["verdict"] + (" " + results["note"] if results["note"] else ""),
        "",
    ]
    return "\n".join(lines)


def main():
    args = parse_args()
    Path(args.output).mkdir(parents=True, exist_ok=True)
    previous = {}
    if args.report_only:
        previous_file = Path(args.output) / "results.json"
        previous = json.loads(previous_file.read_text()) if previous_file.is_file() else {}
        wall = {name: previous.get(name, {}).get("wall_seconds") for name in VARIANTS}
    else:
        wall = run_trainings(args)
    from gcvimoe.train.config import load_yaml
    recipe = load_yaml(args.config)
    results = {name: {**read_run(Path(args.output) / name), "wall_seconds": wall[name]} for name in VARIANTS}
    results["sizes"] = model_sizes()
    from gcvimoe.models import create_model
    dense = create_model("gcvimoe_nano", num_classes=10, in_chans=1, img_size=32, num_experts=0)
    results["dense_params"] = sum(p.numel() for p in dense.parameters())
    results["recipe"] = {"config": args.config, "img_size": recipe.get("img_size"),
                         "batch_size": recipe.get("batch_size"), "lr": float(recipe.get("lr")),
                         "smoothing": recipe.get("smoothing")}
    results["machine"] = previous.get("machine") or describe_machine(args.train_overrides, recipe)
    results["date"] = previous.get("date", time.strftime("%Y-%m-%d"))
    results["mode"] = previous.get("mode") or ("both models trained at the same time, one CPU thread each"
                                               if args.parallel else "one model after the other")
    moe_top1, dense_top1 = results["moe"]["final_top1"], results["dense"]["final_top1"]
    target = "meets" if moe_top1 >= 92.0 else "misses"
    order = "at or above" if moe_top1 >= dense_top1 else "below"
    results["verdict"] = (f"The MoE model {target} the 92 % target ({moe_top1:.2f} %) and ends {order} the dense twin "
                          f"({moe_top1 - dense_top1:+.2f} points).")
    if all(results[name]["best_epoch"] == results[name]["epochs"] for name in VARIANTS):
        results["verdict"] += " Both were still improving at the last epoch: a longer schedule should gain more."
    results["note"] = args.note
    (Path(args.output) / "results.json").write_text(json.dumps(results, indent=2))
    section = format_section(results)
    print(section)
    if not args.no_report:
        write_section("fashion_mnist", section)
        print(f"updated {RESULTS}")


if __name__ == "__main__":
    main()
