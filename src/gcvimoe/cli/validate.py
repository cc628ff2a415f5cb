"""``gcvimoe validate``: top-1, top-5, loss, per-class accuracy and expert usage of a checkpoint.

The model and its preprocessing are rebuilt from the checkpoint alone; the data defaults to the validation split of
the data it was trained on. Examples::

    gcvimoe validate --checkpoint runs/digits/best.pth
    gcvimoe validate --checkpoint runs/tiny/last.pth --data-dir /data/imagenet --json
"""
import argparse
import json
from typing import Any, Dict

from gcvimoe.cli._common import add_checkpoint, add_device, add_json, add_use_ema
from gcvimoe.train.evaluate import validate_checkpoint


def configure(parser: argparse.ArgumentParser) -> None:
    add_checkpoint(parser)
    data = parser.add_mutually_exclusive_group()
    data.add_argument("--data-dir", metavar="DIR",
                      help="folder with a val/ class folder (or the Fashion-MNIST files); default: the training data")
    data.add_argument("--dataset", choices=("digits", "fashion-mnist"),
                      help="a built-in dataset; default: the training data")
    parser.add_argument("--split", default="val", choices=("train", "val"), help="which split to evaluate")
    parser.add_argument("--batch-size", type=int, metavar="N", help="default: the training run's eval batch size")
    parser.add_argument("--workers", type=int, metavar="N", help="data loading processes (default: the training run's)")
    add_device(parser)
    add_use_ema(parser)
    add_json(parser)


def format_report(result: Dict[str, Any]) -> str:
    """The human-readable report: metrics, per-class accuracy, expert usage."""
    lines = [
        f"checkpoint {result['checkpoint']} ({result['model']}, epoch {result['epoch']}, {result['weights']} weights)",
        f"data {result['dataset']} {result['split']}: {result['num_images']} images",
        f"top-1 {result['top1']:.2f} %   top-5 {result['top5']:.2f} %   loss {result['loss']:.4f}",
        "per-class top-1:",
    ]
    width = max(len(name) for name in result["class_names"])
    for name, acc, count in zip(result["class_names"], result["per_class_top1"], result["class_counts"]):
        lines.append(f"  {name:<{width}}  " + (f"{acc:6.2f} %  ({count} images)" if acc is not None else "no images"))
    if result["experts"]:
        lines.append(f"expert usage (share of routed tokens per expert; uniform = "
                     f"{1 / len(next(iter(result['experts'].values()))['tokens_per_expert']):.3f}), "
                     f"dropped {100 * result['dropped_fraction']:.2f} % overall:")
        name_width = max(len(name) for name in result["experts"])
        for name, layer in result["experts"].items():
            shares = " ".join(f"{share:.3f}" for share in layer["tokens_per_expert"])
            lines.append(f"  {name:<{name_width}}  {shares}  dropped {100 * layer['dropped_fraction']:.2f} %")
    else:
        lines.append("expert usage: dense model, no MoE layers")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    result = validate_checkpoint(
        args.checkpoint, dataset=args.dataset, data_dir=args.data_dir, split=args.split, batch_size=args.batch_size,
        workers=args.workers, device=args.device, use_ema=args.use_ema)
    print(json.dumps(result) if args.json else format_report(result))
    return 0
