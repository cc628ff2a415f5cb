"""``gcvimoe predict``: the top-k labels of images, with probabilities, from a checkpoint alone.

Examples::

    gcvimoe predict --checkpoint runs/digits/model digit.png photos/ 'scans/**/*.png'
    gcvimoe predict --checkpoint runs/digits/best.pth photos/ --results-file predictions.csv --topk 3

Images are files, folders (searched recursively) or glob patterns. An unreadable image is reported on stderr and
skipped; the others still get their predictions and the command exits 0.

The preprocessing applied, and where each value came from, is printed on stderr first; timm's flags (``--img-size``,
``--input-size``, ``--crop-pct``, ``--mean``, ``--std``, ``--interpolation``) override it. ``--results-file`` writes
timm inference.py's columns (as with ``--label-type name --results-separate-col --fullname``): ``filename``,
``label_0`` ... ``label_{K-1}``, ``prob_0`` ... ``prob_{K-1}``.
"""
import argparse
import json
import sys

from gcvimoe.cli._common import (
    add_checkpoint, add_device, add_json, add_preprocessing, add_use_ema, preprocessing_overrides)
from gcvimoe.errors import GcvimoeError
from gcvimoe.files import write_records
from gcvimoe.train.predict import predict, result_rows


def configure(parser: argparse.ArgumentParser) -> None:
    add_checkpoint(parser)
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files, folders or glob patterns")
    parser.add_argument("--topk", type=int, default=5, metavar="K", help="labels per image (default: 5)")
    parser.add_argument("--batch-size", type=int, default=64, metavar="N", help="images per forward pass")
    parser.add_argument("--results-file", metavar="FILE",
                        help="write the predictions to FILE (.csv: a row per image, timm inference.py's columns; .json)")
    add_preprocessing(parser)
    add_device(parser)
    add_use_ema(parser)
    add_json(parser)


def _print_result(result: dict) -> None:
    print(result["image"])
    width = max(len(entry["label"]) for entry in result["top"])
    for rank, entry in enumerate(result["top"], 1):
        print(f"  {rank}. {entry['label']:<{width}}  {100 * entry['probability']:6.2f} %")


def run(args: argparse.Namespace) -> int:
    if args.results_file and not args.results_file.endswith((".json", ".csv")):
        raise GcvimoeError(f"--results-file {args.results_file} must end in .json or .csv")
    predictions = predict(args.checkpoint, args.images, topk=args.topk, batch_size=args.batch_size,
                          device=args.device, use_ema=args.use_ema, preprocessing=preprocessing_overrides(args))
    print("\n".join(predictions.preprocessing.lines()), file=sys.stderr)
    for path, reason in predictions.skipped:
        print(f"skipped: {reason}", file=sys.stderr)
    if args.results_file:
        write_records(args.results_file, result_rows(predictions))
    for result in predictions.results:
        if args.json:
            print(json.dumps(result))
        elif not args.results_file:
            _print_result(result)
    done = f"{len(predictions.results)} image(s) predicted"
    skipped = f", {len(predictions.skipped)} unreadable skipped" if predictions.skipped else ""
    where = f" -> {args.results_file}" if args.results_file else ""
    print(f"{done}{skipped}{where}", file=sys.stderr)
    if not predictions.results:
        raise GcvimoeError("no image could be read, so nothing was predicted; give image files (JPEG, PNG, ...) "
                           "or folders of them")
    return 0
