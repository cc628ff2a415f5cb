"""Small-image folders: what a plain `gcvimoe train --data-dir DIR` reaches, and MoE against its dense twin.

Fashion-MNIST is written out as PNG class folders, so the runs take the path a user's own folder takes (the defaults
derived from the data, PNG decoding, loader processes):

    python benchmarks/small_images.py export                # runs/fmnist_png: train/ = 60,000, val/ = the 10,000 test
    python benchmarks/small_images.py export --tune         # runs/fmnist_tune: 50,000 / 10,000 held out of train
    python benchmarks/small_images.py run                   # the runs below, skipping finished ones; then the report
    python benchmarks/small_images.py report                # RESULTS.md section from what has finished

The runs (every one `gcvimoe train --data-dir DIR` with no flag but the seed, the epochs and the experts):

- ``full``: the PNG folder, 6 epochs, the default GCViMoE over 3 seeds and its dense twin (``--num-experts 0``) once;
- ``subset``: a random 8,000-image subset of the training images (the test images as val), 10 epochs, MoE and dense
  over 3 seeds each, and the dense twin again for as many epochs as fit in the MoE run's wall time.

A run whose ``summary.csv`` already holds its last epoch is skipped, so the runs can span sessions. The report gives
the last epoch's top-1 (never the best epoch's), wall times, and active MACs per image. Tuning used only the
``--tune`` split, carved from the training images; the test images are for this report alone.
"""
import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from _common import machine, write_section

from gcvimoe.data.fashion_mnist import read_idx

ROOT = Path(__file__).resolve().parents[1]
IDX_DIR = Path(os.environ.get("GCVIMOE_FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"))
RUNS = ROOT / "runs"
FULL_DIR, TUNE_DIR, SUBSET_DIR = RUNS / "fmnist_png", RUNS / "fmnist_tune", RUNS / "fmnist_subset8k"
OUT = RUNS / "small_images"
CLASSES = ("t-shirt_top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle_boot")
TUNE_SEED, SUBSET_SEED = 0, 1
SUBSET_SIZE = 8000
SEEDS = (0, 1, 2)
FULL_EPOCHS, SUBSET_EPOCHS = 6, 10
QUIET_FLAG = Path("/tmp/gcvimoe-quiet")  # another user of the machine asks for quiet cores while it exists


def load_split(prefix: str):
    def find(stem):
        return next(p for p in (IDX_DIR / stem, IDX_DIR / f"{stem}.gz") if p.is_file())
    return read_idx(find(f"{prefix}-images-idx3-ubyte")), read_idx(find(f"{prefix}-labels-idx1-ubyte"))


def write_folder(split_dir: Path, images: np.ndarray, labels: np.ndarray, indices) -> None:
    """``split_dir/<class>/<index>.png`` for each index (the index into the IDX file names the image)."""
    from PIL import Image
    for name in CLASSES:
        (split_dir / name).mkdir(parents=True, exist_ok=True)
    for i in indices:
        Image.fromarray(images[i], mode="L").save(split_dir / CLASSES[labels[i]] / f"{i:05d}.png")


def export(target: Path, train_indices, val_from_train=None) -> None:
    """Write ``target/train`` from the training images at ``train_indices`` and ``target/val`` from the training
    images at ``val_from_train`` (a held-out split) or, when None, from the 10,000 test images. Written under a
    temporary name and renamed, so a folder that exists is complete."""
    if target.is_dir():
        print(f"{target} exists; kept")
        return
    tmp = target.with_name(target.name + ".tmp")
    if tmp.exists():
        import shutil
        shutil.rmtree(tmp)
    images, labels = load_split("train")
    write_folder(tmp / "train", images, labels, train_indices)
    if val_from_train is not None:
        write_folder(tmp / "val", images, labels, val_from_train)
    else:
        test_images, test_labels = load_split("t10k")
        write_folder(tmp / "val", test_images, test_labels, range(len(test_images)))
    tmp.rename(target)
    print(f"wrote {target}")


def tune_split():
    """50,000 training / 10,000 held-out images, both from the training set (fixed seed)."""
    order = np.random.default_rng(TUNE_SEED).permutation(60000)
    return np.sort(order[:50000]), np.sort(order[50000:])


def subset_indices():
    return np.sort(np.random.default_rng(SUBSET_SEED).permutation(60000)[:SUBSET_SIZE])


def export_all(tune: bool) -> None:
    export(FULL_DIR, range(60000))
    export(SUBSET_DIR, subset_indices())
    if tune:
        train, held_out = tune_split()
        export(TUNE_DIR, train, held_out)


# ---------------------------------------------------------------------------------------------------------------------
# runs

def run_dir(group: str, name: str) -> Path:
    return OUT / group / name


def summary_rows(folder: Path):
    try:
        with open(folder / "summary.csv") as f:
            return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]
    except (OSError, ValueError):
        return []


def finished(folder: Path, epochs: int) -> bool:
    rows = summary_rows(folder)
    return bool(rows) and int(rows[-1]["epoch"]) >= epochs and (folder / "wall.json").is_file()


def wait_for_quiet() -> None:
    while QUIET_FLAG.exists():
        time.sleep(30)


def train(data_dir: Path, folder: Path, epochs: int, seed: int, num_experts=None) -> None:
    """One `gcvimoe train --data-dir DIR --epochs N --seed S` run (plus `--num-experts 0` for the dense twin), its
    whole wall time (start-up, evaluation and figures included) written to ``wall.json``. A run left unfinished by
    an earlier session is started again from scratch, so its wall time is one uninterrupted run's."""
    if finished(folder, epochs):
        print(f"{folder.relative_to(ROOT)}: finished, skipped")
        return
    wait_for_quiet()
    command = [sys.executable, "-m", "gcvimoe", "train", "--data-dir", str(data_dir), "--epochs", str(epochs),
               "--seed", str(seed), "--output", str(folder), "--overwrite"]
    if num_experts is not None:
        command += ["--num-experts", str(num_experts)]
    folder.mkdir(parents=True, exist_ok=True)
    print(" ".join(command[1:]), flush=True)
    start = time.perf_counter()
    with open(folder.with_suffix(".out"), "w") as log:
        subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, check=True, cwd=ROOT)
    wall = time.perf_counter() - start
    (folder / "wall.json").write_text(json.dumps({"wall_seconds": wall, "quiet_flag_seen": QUIET_FLAG.exists()}))
    print(f"  {wall:.0f} s", flush=True)


def wall_seconds(folder: Path):
    try:
        return json.loads((folder / "wall.json").read_text())["wall_seconds"]
    except (OSError, ValueError, KeyError):
        return None


def equal_time_epochs():
    """Epochs the dense twin gets to match the MoE's mean wall time on the subset: the MoE's mean wall time over the
    dense runs' mean wall time per epoch (start-up counted in both), or None until both have finished runs."""
    moe = [wall_seconds(run_dir("subset", f"moe_s{s}")) for s in SEEDS]
    dense = [wall_seconds(run_dir("subset", f"dense_s{s}")) for s in SEEDS]
    moe, dense = [w for w in moe if w], [w for w in dense if w]
    if not moe or not dense:
        return None
    return max(SUBSET_EPOCHS, round(statistics.mean(moe) / (statistics.mean(dense) / SUBSET_EPOCHS)))


def run_all(parts) -> None:
    """The runs, the full set's target first (3 MoE seeds, then the dense twin), then the subset comparison."""
    if "full" in parts:
        for seed in SEEDS:
            train(FULL_DIR, run_dir("full", f"moe_s{seed}"), FULL_EPOCHS, seed)
        train(FULL_DIR, run_dir("full", "dense_s0"), FULL_EPOCHS, 0, num_experts=0)
    if "subset" in parts:
        for seed in SEEDS:
            train(SUBSET_DIR, run_dir("subset", f"moe_s{seed}"), SUBSET_EPOCHS, seed)
            train(SUBSET_DIR, run_dir("subset", f"dense_s{seed}"), SUBSET_EPOCHS, seed, num_experts=0)
        epochs = equal_time_epochs()
        for seed in SEEDS:
            train(SUBSET_DIR, run_dir("subset", f"dense_time_s{seed}"), epochs, seed, num_experts=0)


# ---------------------------------------------------------------------------------------------------------------------
# report

def run_result(folder: Path):
    """Last-epoch top-1, epochs and wall time of a finished run (None when it has not finished)."""
    rows = summary_rows(folder)
    wall = wall_seconds(folder)
    if not rows or wall is None:
        return None
    return {"top1": rows[-1]["eval_top1"], "epochs": int(rows[-1]["epoch"]), "wall": wall}


def macs_per_image():
    """Active MACs per 28 px grey image at the model's 32 px input, MoE (top-1) and dense, as `gcvimoe info`."""
    from gcvimoe.models import create_model
    from gcvimoe.models.info import model_info
    from gcvimoe.train import TrainConfig
    model = TrainConfig().model
    info = model_info(model, input_size=(1, 32, 32), num_classes=10, in_chans=1, img_size=32)
    placement = create_model(model, num_classes=10).model_args["moe"]["moe_blocks"]
    return f"{model}, 8 experts, top-1, in {placement}", info.macs, info.dense_macs


def mean_std(values):
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def group_line(label: str, folders, expected: int, macs: int) -> str:
    results = [r for r in (run_result(f) for f in folders) if r]
    top1 = [r["top1"] for r in results]
    walls = [r["wall"] / 60 for r in results]
    epochs = sorted({r["epochs"] for r in results})
    per_run = ", ".join(f"{r['top1']:.2f}" for r in results) or "–"
    wall = f"{statistics.mean(walls):.1f} min" if walls else "–"
    return (f"| {label} | {'/'.join(map(str, epochs)) or '–'} | {len(results)} of {expected} | {mean_std(top1)} | "
            f"{per_run} | {wall} | {macs / 1e6:.2f} M |")


TUNING = RUNS / "tune"
TUNING_RUNS = (  # on the held-out split, seed 0; each named by what it changed from an earlier one
    ("T1_nano", 2, "T1: gcvimoe_nano, crops of area 0.75-1, lr 3e-3, warmup 0.33 epochs, drop path 0.05, flips, "
                   "2 threads"),
    ("T2_pico", 2, "T2: T1 with gcvimoe_pico"),
    ("T3_pico_nocrop", 2, "T3: T2 without crops (area 1)"),
    ("T4_pico_nocrop_lr2_t1", 2, "T4: T3 at lr 2e-3, 1 thread"),
    ("T6_lr1.4", 2, "T6: T4 at lr 1.4e-3"),
    ("T7_bs256_lr2.8", 2, "T7: T4 at batch 256, lr 2.8e-3"),
    ("C6_defaults", 6, "the resulting defaults: `gcvimoe train --data-dir DIR --epochs 6`"),
    # after the full-set runs missed 91.5 %: the anchor's remaining differences, and more tokens per image
    ("A_bs64", 6, "A: the defaults at batch 64 (twice the updates, lr 2e-3)"),
    ("B_wd01", 6, "B: the defaults at weight decay 0.01 (the timm anchor's AdamW default)"),
    ("C_48px_w12", 6, "C: the defaults at 48 px with 12-token windows (12x12 tokens in stage 1; about twice the "
                      "time)"),
    ("D_vit_init", 6, "D: the defaults with the Xavier-uniform init of timm's 'vit' scheme (`weight_init: vit`) "
                      "instead of NVlabs' normal of std 0.02: **the new default of gcvimoe_pico**"),
    # after the full-set runs with D's init still missed 91.5 %: what is left of the recipe, each against D
    ("E_xdrop0", 6, "E: D without expert dropout (0 instead of 0.1)"),
    ("F_lr3", 6, "F: D at lr 3e-3"),
    ("G_cap2", 6, "G: D at capacity factor 2.0 in training (1.25)"),
    ("H_dropless", 6, "H: D dropless in training (capacity factor 0)"),
    ("I_lr3_dropless", 6, "I: F and H together: lr 3e-3, dropless"),
    ("D_vit_init_s1", 6, "D again, seed 1"),
    ("K_moe_all_stages", 6, "K: D with the experts in every other block of every stage (`moe_blocks: every 2nd block of "
                            "stages 1-4`, 5 MoE layers) instead of Swin-MoE's stages 3-4, which a 32 px input leaves "
                            "2x2 and 1x1 tokens: **the new placement of gcvimoe_pico**"),
    ("K_moe_all_stages_s1", 6, "K again, seed 1"),
)


def tuning_lines():
    """The tuning runs' last-epoch top-1 on the held-out 10,000 training images, where their folders exist."""
    lines = []
    for name, epochs, change in TUNING_RUNS:
        rows = summary_rows(TUNING / name)
        if rows and int(rows[-1]["epoch"]) == epochs:
            lines.append(f"| {change} | {epochs} | {rows[-1]['eval_top1']:.2f} |")
    if not lines:
        return []
    return ["Tuning, on 50,000 training images with the other 10,000 held out (seed 0 unless named; T5, drop path 0, "
            "was stopped twice by a busy machine and never finished):", "", "| run | epochs | held-out top-1 (%) |", "|---|---|---|", *lines, ""]


def report(note: str = "") -> str:
    model, moe_macs, dense_macs = macs_per_image()
    header = ["| model | epochs | runs finished | last-epoch test top-1 (%), mean ± std | per run | wall time per run "
              "| active MACs / image |", "|---|---|---|---|---|---|---|"]
    full = [run_dir("full", f"moe_s{s}") for s in SEEDS]
    subset = {name: [run_dir("subset", f"{name}_s{s}") for s in SEEDS] for name in ("moe", "dense", "dense_time")}
    missing = [str(f.relative_to(OUT)) for f in [*full, run_dir("full", "dense_s0"), *sum(subset.values(), [])]
               if run_result(f) is None]
    full_top1 = [r["top1"] for r in (run_result(f) for f in full) if r]
    verdict = ""
    if len(full_top1) == len(SEEDS):
        met = "meets" if statistics.mean(full_top1) >= 91.5 else "misses"
        verdict = (f"The default GCViMoE {met} the 91.5 % target with {statistics.mean(full_top1):.2f} % "
                   f"(mean of {len(SEEDS)} seeds). ")
    lines = [
        "## Small-image folders: plain `gcvimoe train --data-dir DIR` on Fashion-MNIST as PNG (`benchmarks/small_images.py`)",
        "",
        f"{machine()}. Every run is `gcvimoe train --data-dir DIR --epochs N --seed S` (`--num-experts 0` for the "
        f"dense twin) with no other training flag: the model ({model}), warmup, crops, flips, "
        "drop path, channels, size, normalisation, loader processes and threads (one of each on these 2 cores) all "
        "come from the defaults and the data. "
        "The test images were used for nothing but these numbers (the defaults were tuned on 10,000 images held out "
        "of the training set). Top-1 is the last epoch's, never the best. Wall time is the whole command (start-up, "
        "an evaluation of the 10,000 test images after every epoch, figures); the machine was shared, so times vary "
        "by some tens of percent.",
        "",
        f"**Full set**: train/ = the 60,000 training images, val/ = the 10,000 test images, {FULL_EPOCHS} epochs.",
        "",
        *header,
        group_line("GCViMoE (default)", full, len(SEEDS), moe_macs),
        group_line("dense twin (`--num-experts 0`)", [run_dir("full", "dense_s0")], 1, dense_macs),
        "",
        verdict + "The timm anchor of issue 20 (dense GC ViT, 2.55 M parameters, one-cycle AdamW) reached 91.4 % in "
        "6 epochs on this CPU.",
        "",
        *tuning_lines(),
        f"**MoE vs dense on {SUBSET_SIZE:,} images**: a random subset of the training images (seed {SUBSET_SEED}), "
        f"val/ = the 10,000 test images; {SUBSET_EPOCHS} epochs at equal epochs, and the dense twin again with the "
        "epochs that fill the MoE runs' mean wall time (equal time).",
        "",
        *header,
        group_line("GCViMoE (default)", subset["moe"], len(SEEDS), moe_macs),
        group_line("dense twin, equal epochs", subset["dense"], len(SEEDS), dense_macs),
        group_line("dense twin, equal wall time", subset["dense_time"], len(SEEDS), dense_macs),
        "",
        ("Still missing: " + ", ".join(missing) + " (`python benchmarks/small_images.py run` continues)."
         if missing else "All runs finished.") + (f" {note}" if note else ""),
        "",
    ]
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=("export", "run", "report"))
    parser.add_argument("--tune", action="store_true", help="export: also write the held-out tuning split")
    parser.add_argument("--parts", default="full,subset", help="run: full, subset or both (comma-separated)")
    parser.add_argument("--note", default="", help="a sentence added to the report (e.g. what else ran meanwhile)")
    args = parser.parse_args()
    if args.action == "export":
        export_all(args.tune)
        return
    if args.action == "run":
        export_all(tune=False)
        run_all(args.parts.split(","))
    write_section("small_images", report(args.note))
    print(f"wrote the small_images section of {Path(__file__).parent / 'RESULTS.md'}")


if __name__ == "__main__":
    main()
