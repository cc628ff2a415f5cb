"""``gcvimoe validate``: top-1, top-5, loss, per-class accuracy and expert usage of a checkpoint.

The model and its preprocessing are rebuilt from the checkpoint alone; the data defaults to the validation split of
the data it was trained on. Examples::

    gcvimoe validate --checkpoint runs/digits/best.pth
    gcvimoe validate --checkpoint runs/digits/model --results-file digits.csv
    gcvimoe validate --checkpoint runs/tiny/last.pth --data-dir /data/imagenet --json
    gcvimoe validate --model gcvimoe_tiny --checkpoint gcvit_tiny.pth --data-dir /data/imagenet  # a plain state dict
    gcvimoe validate --model local-dir:runs/tiny/model --pretrained                              # as timm's validate.py
    gcvimoe validate --checkpoint runs/tiny/model --data-dir photos/val --img-size 256 --crop-pct 1.0

The report starts with the preprocessing applied and where each value came from; timm's flags (``--img-size``,
``--input-size``, ``--crop-pct``, ``--mean``, ``--std``, ``--interpolation``) override it. ``--results-file`` writes
timm validate.py's columns first (model, top1, top1_err, top5, top5_err, param_count, img_size, crop_pct,
interpolation), then gcvimoe's.
"""
import argparse
import json
from typing import Any, Dict

from gcvimoe.cli._common import (
    CHECKPOINT_HELP, add_device, add_json, add_preprocessing, add_use_ema, preprocessing_overrides)
from gcvimoe.errors import GcvimoeError
from gcvimoe.files import write_records
from gcvimoe.train.evaluate import validate_checkpoint
from gcvimoe.train.preprocessing import preprocessing_lines

RESULT_KEYS = ("model", "top1", "top1_err", "top5", "top5_err", "param_count", "img_size", "crop_pct", "interpolation",
               "checkpoint", "epoch", "weights", "dataset", "split", "num_images", "loss", "dropped_fraction")
"""timm validate.py's columns, in its order, then gcvimoe's."""


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", metavar="CKPT", help=CHECKPOINT_HELP + "; with --model, a plain state dict too")
    parser.add_argument("--model", metavar="NAME",
                        help="the model a plain state dict (--checkpoint) is loaded into, e.g. gcvimoe_tiny for a timm "
                             "gcvit_tiny file; or local-dir:DIR / hf-hub:NAME with --pretrained")
    parser.add_argument("--pretrained", action="store_true",
                        help="with --model local-dir:DIR or hf-hub:NAME: evaluate that model's own weights")
    data = parser.add_mutually_exclusive_group()
    data.add_argument("--data-dir", metavar="DIR",
                      help="folder with a val/ class folder, a folder of class folders, tar shards (a folder or a pattern), or the Fashion-MNIST "
                           "files; default: the training data")
    data.add_argument("--dataset", metavar="NAME",
                      help="a dataset read without --data-dir: digits, fashion-mnist or hfds:NAME; default: the "
                           "training data")
    parser.add_argument("--split", default="val", choices=("train", "val"), help="which split to evaluate")
    parser.add_argument("--batch-size", type=int, metavar="N", help="default: the training run's eval batch size")
    parser.add_argument("--workers", type=int, metavar="N", help="data loading processes (default: the training run's)")
    add_preprocessing(parser)
    add_device(parser)
    add_use_ema(parser)
    add_json(parser)
    parser.add_argument("--results-file", metavar="FILE",
                        help="also write the metrics to FILE (.json or .csv), timm validate.py's columns first")


def format_report(result: Dict[str, Any]) -> str:
    """The human-readable report: metrics, per-class accuracy, expert usage."""
    lines = [
        *preprocessing_lines(result["preprocessing"]),
        f"checkpoint {result['checkpoint']} ({result['model']}, epoch {result['epoch']}, {result['weights']} weights)",
        f"data {result['dataset']} {result['split']}: {result['num_images']} images",
        f"top-1 {result['top1']:.2f} %   top-5 {result['top5']:.2f} %   loss {result['loss']:.4f}",
        "per-class top-1:",
    ]
    width = max(len(name) for name in result["class_names"])
    for name, acc, count in zip(result["class_names"], result["per_class_top1"], result["class_counts"],
                                strict=True):
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


def _source(args: argparse.Namespace):
    """The file or folder to read and the model name for a plain state dict, from --checkpoint/--model/--pretrained."""
    if args.pretrained:
        if args.model is None or not args.model.startswith(("local-dir:", "hf-hub:")):
            raise GcvimoeError("--pretrained needs --model local-dir:DIR or hf-hub:NAME (gcvimoe models have no "
                               "published weights); or pass --checkpoint")
        if args.checkpoint:
            raise GcvimoeError("pass either --model ... --pretrained or --checkpoint, not both")
        return args.model, None
    if not args.checkpoint:
        raise GcvimoeError("validate needs --checkpoint CKPT (or --model local-dir:DIR --pretrained)")
    return args.checkpoint, args.model


def check_args(args: argparse.Namespace) -> None:
    if args.batch_size is not None and args.batch_size < 1:
        raise GcvimoeError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.workers is not None and args.workers < 0:
        raise GcvimoeError(f"--workers must not be negative, got {args.workers}")


def run(args: argparse.Namespace) -> int:
    check_args(args)
    if args.results_file and not args.results_file.endswith((".json", ".csv")):
        raise GcvimoeError(f"--results-file {args.results_file} must end in .json or .csv")
    source, model_name = _source(args)
    result = validate_checkpoint(
        source, dataset=args.dataset, data_dir=args.data_dir, split=args.split, batch_size=args.batch_size,
        workers=args.workers, device=args.device, use_ema=args.use_ema, model_name=model_name,
        preprocessing=preprocessing_overrides(args))
    print(json.dumps(result) if args.json else format_report(result))
    if args.results_file:
        write_records(args.results_file, [{key: result[key] for key in RESULT_KEYS}])
        if not args.json:
            print(f"results: {args.results_file}")
    return 0
