"""``gcvimoe predict``: the top-5 labels of images, with probabilities, from a checkpoint alone.

Example::

    gcvimoe predict --checkpoint runs/digits/best.pth digit.png photo.jpg
"""
import argparse
import json

from gcvimoe.cli._common import add_checkpoint, add_device, add_json, add_use_ema
from gcvimoe.errors import GcvimoeError
from gcvimoe.train.predict import predict


def configure(parser: argparse.ArgumentParser) -> None:
    add_checkpoint(parser)
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files")
    parser.add_argument("--topk", type=int, default=5, metavar="K", help="labels per image")
    add_device(parser)
    add_use_ema(parser)
    add_json(parser)


def run(args: argparse.Namespace) -> int:
    if args.topk < 1:
        raise GcvimoeError(f"--topk must be at least 1, got {args.topk}")
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
