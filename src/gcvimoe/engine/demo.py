"""``gcvimoe demo`` (``make demo``): train GCViMoE nano on the embedded digits, validate it, write a short report.

Uses ``configs/digits.yaml``; everything goes to ``--output`` (default ``demo_output``): the training run in
``train/``, the report in ``report.md`` with the training curves and the expert-usage plot beside it.
"""
import argparse
import os
import time
from pathlib import Path
from typing import Any, Dict

from gcvimoe.errors import GcvimoeError

SOURCE_ROOT = Path(__file__).resolve().parents[3]
DIGITS_CONFIG = SOURCE_ROOT / "configs" / "digits.yaml"
TARGET_TOP1 = 97.0
TARGET_SECONDS = 180.0


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output", default="demo_output", metavar="DIR", help="where the run and report go")
    parser.add_argument("--config", default=None, metavar="FILE",
                        help=f"training recipe (default: configs/digits.yaml of the source tree, {DIGITS_CONFIG})")
    parser.add_argument("--epochs", type=int, metavar="N", help="override the recipe's epochs")


def _find_config(path) -> Path:
    for candidate in ([Path(path)] if path else [DIGITS_CONFIG, Path("configs") / "digits.yaml"]):
        if candidate.is_file():
            return candidate
    raise GcvimoeError("configs/digits.yaml not found; run the demo from the source tree or pass --config FILE")


def _display(path: Path) -> str:
    """``configs/digits.yaml`` for a file of the source tree, the path as given otherwise."""
    try:
        return path.resolve().relative_to(SOURCE_ROOT).as_posix()
    except ValueError:
        return str(path)


def write_report(path: Path, cfg, result, metrics: Dict[str, Any], wall_seconds: float, config_path: Path) -> None:
    """A short markdown report of the run: what was trained, how long it took, what it reached, how it routed."""
    train_dir = Path(cfg.output)

    def rel(p) -> str:
        return Path(os.path.relpath(p, path.parent)).as_posix()

    ok_top1 = "meets" if metrics["top1"] >= TARGET_TOP1 else "misses"
    ok_time = "within" if result.train_seconds <= TARGET_SECONDS else "over"
    num_experts = len(next(iter(metrics["experts"].values()))["tokens_per_expert"]) if metrics["experts"] else 0
    lines = [
        "# GCViMoE demo: nano on the embedded digits",
        "",
        f"`{cfg.model}` with {num_experts} experts per MoE layer (top-{cfg.top_k or 1} routing), trained from scratch "
        f"on scikit-learn's handwritten digits (1437 training / 360 validation images, 8x8 upsampled to {cfg.img_size} "
        f"px) with `{_display(config_path)}` for {len(result.history)} epochs.",
        "",
        "| | |",
        "|---|---|",
        f"| validation top-1 (best checkpoint, epoch {result.best_epoch}) | **{metrics['top1']:.2f} %** "
        f"({ok_top1} the {TARGET_TOP1:.0f} % target) |",
        f"| validation top-5 | {metrics['top5']:.2f} % |",
        f"| validation loss | {metrics['loss']:.4f} |",
        f"| training time (epochs incl. evaluation) | {result.train_seconds:.0f} s ({ok_time} the "
        f"{TARGET_SECONDS:.0f} s target); {wall_seconds:.0f} s with start-up |",
        f"| last epoch: train loss / MoE aux loss | {result.history[-1]['train_loss']:.4f} / "
        f"{result.history[-1]['train_aux_loss']:.5f} |",
        f"| tokens dropped for capacity (last training epoch) | {100 * result.history[-1]['dropped_fraction']:.1f} % |",
        "",
        "## Training curves",
        "",
        f"![training curves]({rel(train_dir / 'curves.png')})",
        "",
        "## Per-class validation accuracy",
        "",
        "| digit | top-1 | images |",
        "|---|---|---|",
    ]
    for name, acc, count in zip(metrics["class_names"], metrics["per_class_top1"], metrics["class_counts"]):
        lines.append(f"| {name} | {acc:.1f} % | {count} |")
    lines += ["", "## Expert usage on the validation set", ""]
    if metrics["experts"]:
        lines += [
            f"Share of each MoE layer's routed tokens that each expert received (uniform = {1 / num_experts:.3f}); "
            "evaluation is dropless.",
            "",
            f"![expert usage]({rel(path.parent / 'expert_usage.png')})",
            "",
        ]
    else:
        lines += ["A dense model: no MoE layers.", ""]
    lines += [
        "## Files",
        "",
        f"- `{rel(train_dir)}/`: `config.yaml`, `summary.csv`, `train.log`, `last.pth`, `best.pth`, `curves.png`",
        f"- validate again: `gcvimoe validate --checkpoint {(train_dir / 'best.pth').as_posix()}`",
        f"- predict: `gcvimoe predict --checkpoint {(train_dir / 'best.pth').as_posix()} IMAGE...`",
        "",
    ]
    path.write_text("\n".join(lines))


def run(args: argparse.Namespace) -> int:
    from gcvimoe.engine.config import build_config
    from gcvimoe.engine.train import train
    from gcvimoe.engine.validate_cli import validate_checkpoint
    from gcvimoe.viz import plot_expert_usage

    output = Path(args.output)
    config_path = _find_config(args.config)
    overrides = {"output": str(output / "train")}
    if args.epochs:
        overrides["epochs"] = args.epochs
    cfg = build_config(config_path, overrides)
    print(f"demo: training {cfg.model} on the embedded digits with {config_path} -> {cfg.output}")
    start = time.perf_counter()
    result = train(cfg)
    wall_seconds = time.perf_counter() - start

    best = Path(cfg.output) / "best.pth"
    print(f"demo: validating {best}")
    metrics = validate_checkpoint(best, workers=0)
    usage_png = output / "expert_usage.png"
    usage_png.unlink(missing_ok=True)
    plot_expert_usage(metrics["experts"], usage_png, title="expert usage on the digits val set (best checkpoint)")
    report = output / "report.md"
    write_report(report, cfg, result, metrics, wall_seconds, config_path)
    print(f"demo: top-1 {metrics['top1']:.2f} % (top-5 {metrics['top5']:.2f} %) after {result.train_seconds:.0f} s "
          f"of training ({wall_seconds:.0f} s with start-up)")
    print(f"demo: report {report}")
    print(f"demo: plots  {Path(cfg.output) / 'curves.png'}, {usage_png}")
    return 0
