"""The demo's markdown report: what was trained, how long it took, what it reached, how it routed."""
import os
from pathlib import Path
from typing import Any, Dict

from gcvimoe.files import write_text

TARGET_TOP1 = 97.0
TARGET_SECONDS = 180.0


def write_report(path: Path, cfg, result, metrics: Dict[str, Any], wall_seconds: float, config_name: str) -> None:
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
        f"`{cfg.model}` with {num_experts} experts per MoE layer (top-{cfg.moe.top_k} routing), trained from scratch "
        f"on scikit-learn's handwritten digits (1437 training / 360 validation images, 8x8 upsampled to {cfg.img_size} "
        f"px) with `-c {config_name}` for {len(result.history)} epochs.",
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
    for name, acc, count in zip(metrics["class_names"], metrics["per_class_top1"], metrics["class_counts"],
                                 strict=True):
        lines.append(f"| {name} | {acc:.1f} % | {count} |")
    lines += ["", "## Expert usage on the validation set", ""]
    if metrics["experts"]:
        lines += [
            f"Share of each MoE layer's routed tokens that each expert received (uniform = {1 / num_experts:.3f}); "
            "evaluation is dropless.",
            "",
            f"![expert usage]({rel(path.parent / 'expert_usage_best.png')})",
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
    write_text(path, "\n".join(lines))
