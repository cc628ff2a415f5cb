"""``gcvimoe predict``: the top-5 labels of images, with probabilities, from a checkpoint alone.

Example::

    gcvimoe predict --checkpoint runs/digits/best.pth digit.png photo.jpg
"""
import argparse
import json
from pathlib import Path
from typing import Any, Dict, List, Sequence

import torch

from gcvimoe.data import DataConfig, build_transform, load_image
from gcvimoe.engine.checkpoint import load_checkpoint, model_from_checkpoint
from gcvimoe.engine.distributed import resolve_device
from gcvimoe.errors import GcvimoeError


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, metavar="CKPT", help="a last.pth or best.pth of gcvimoe train")
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files")
    parser.add_argument("--topk", type=int, default=5, metavar="K", help="labels per image")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--use-ema", action="store_true", help="use the EMA weights")
    parser.add_argument("--json", action="store_true", help="print one JSON object per image")


@torch.no_grad()
def predict(
        checkpoint_path,
        images: Sequence[str],
        topk: int = 5,
        device: str = "auto",
        use_ema: bool = False,
) -> List[Dict[str, Any]]:
    """For each image: ``{"image": path, "top": [{"label": name, "probability": p}, ...]}``, most likely first."""
    missing = [str(path) for path in images if not Path(path).is_file()]
    if missing:
        raise GcvimoeError(f"image {missing[0]} not found" + (f" (and {len(missing) - 1} more)" if missing[1:] else "")
                           + "; pass paths of existing image files")
    checkpoint = load_checkpoint(checkpoint_path)
    data_cfg = DataConfig.from_dict(checkpoint["data_config"])
    device = torch.device(resolve_device(device))
    model = model_from_checkpoint(checkpoint, use_ema=use_ema).to(device)
    transform = build_transform(data_cfg, is_training=False)
    mode = "L" if data_cfg.in_chans == 1 else "RGB"
    k = min(topk, data_cfg.num_classes)
    results = []
    for path in images:
        x = transform(load_image(path, mode)).unsqueeze(0).to(device)
        probs = model(x).float().softmax(dim=-1)[0]
        values, indices = probs.topk(k)
        results.append({
            "image": str(path),
            "top": [{"label": data_cfg.class_names[i], "probability": float(p)} for p, i in zip(values, indices)],
        })
    return results


def run(args: argparse.Namespace) -> int:
    results = predict(args.checkpoint, args.images, topk=args.topk, device=args.device, use_ema=args.use_ema)
    for result in results:
        if args.json:
            print(json.dumps(result))
            continue
        print(result["image"])
        width = max(len(entry["label"]) for entry in result["top"])
        for rank, entry in enumerate(result["top"], 1):
            print(f"  {rank}. {entry['label']:<{width}}  {100 * entry['probability']:6.2f} %")
    return 0
