"""``gcvimoe validate``: top-1, top-5, loss, per-class accuracy and expert usage of a checkpoint.

The model and its preprocessing are rebuilt from the checkpoint alone; the data defaults to the validation split of
the data it was trained on. Examples::

    gcvimoe validate --checkpoint runs/digits/best.pth
    gcvimoe validate --checkpoint runs/tiny/last.pth --data-dir /data/imagenet --json
"""
import argparse
import dataclasses
import json
from contextlib import nullcontext
from typing import Any, Dict, Optional

import torch

from gcvimoe.data import DataConfig, build_transform, create_dataset, create_loader
from gcvimoe.data.factory import resolve_data_config
from gcvimoe.engine.checkpoint import load_checkpoint, model_from_checkpoint
from gcvimoe.engine.distributed import DistInfo, resolve_device
from gcvimoe.engine.evaluate import evaluate
from gcvimoe.errors import GcvimoeError


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, metavar="CKPT", help="a last.pth or best.pth of gcvimoe train")
    data = parser.add_mutually_exclusive_group()
    data.add_argument("--data-dir", metavar="DIR",
                      help="folder with a val/ class folder (or the Fashion-MNIST files); default: the training data")
    data.add_argument("--dataset", choices=("digits", "fashion-mnist"),
                      help="a built-in dataset; default: the training data")
    parser.add_argument("--split", default="val", choices=("train", "val"), help="which split to evaluate")
    parser.add_argument("--batch-size", type=int, metavar="N", help="default: the training run's eval batch size")
    parser.add_argument("--workers", type=int, metavar="N", help="data loading processes (default: the training run's)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--use-ema", action="store_true", help="evaluate the EMA weights")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the report")


def _eval_data_config(trained: DataConfig, dataset: Optional[str], data_dir: Optional[str]) -> DataConfig:
    """The training data config pointed at the data to evaluate (same size, channels, normalisation, classes)."""
    if dataset is None and data_dir is None:
        return trained
    if dataset is None:
        dataset = "fashion-mnist" if trained.dataset == "fashion-mnist" else "folder"
    if dataset != "folder" and resolve_data_config(dataset, data_dir or "").class_names != trained.class_names:
        raise GcvimoeError(f"the checkpoint was trained on other classes than {dataset}'s; evaluate it on its own data")
    return dataclasses.replace(trained, dataset=dataset, data_dir=data_dir or "")


def validate_checkpoint(
        checkpoint_path,
        dataset: Optional[str] = None,
        data_dir: Optional[str] = None,
        split: str = "val",
        batch_size: Optional[int] = None,
        workers: Optional[int] = None,
        device: str = "auto",
        use_ema: bool = False,
) -> Dict[str, Any]:
    """Evaluate a checkpoint; returns the metrics of :func:`gcvimoe.engine.evaluate.evaluate` plus context."""
    checkpoint = load_checkpoint(checkpoint_path)
    trained = DataConfig.from_dict(checkpoint["data_config"])
    data_cfg = _eval_data_config(trained, dataset, data_dir)
    info = DistInfo(device=torch.device(resolve_device(device)))
    model = model_from_checkpoint(checkpoint, use_ema=use_ema).to(info.device)
    eval_set = create_dataset(data_cfg, split, build_transform(data_cfg, is_training=False),
                              class_names=trained.class_names)
    config = checkpoint.get("config") or {}
    batch_size = batch_size or config.get("eval_batch_size") or config.get("batch_size") or 128
    workers = config.get("workers", 0) if workers is None else workers
    loader = create_loader(eval_set, batch_size, is_training=False, workers=workers)
    result = evaluate(model, loader, trained.num_classes, info, nullcontext)
    result.update(
        checkpoint=str(checkpoint_path), model=checkpoint["model_name"], epoch=checkpoint.get("epoch"),
        dataset=data_cfg.dataset, split=split, weights="ema" if use_ema else "model",
        class_names=trained.class_names)
    return result


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
