"""``gcvimoe demo`` (``make demo``): train GCViMoE nano on the embedded digits, validate it, write a short report.

Uses the built-in ``digits`` config (or ``--config NAME|FILE``); everything goes to ``--output`` (default
``demo_output``): the training run in ``train/``, the report in ``report.md`` with the training curves and the best
checkpoint's expert usage (``expert_usage_best.png``) beside it.
"""
import argparse
import time
from pathlib import Path

from gcvimoe.analysis import plot_expert_usage
from gcvimoe.analysis.report import write_report
from gcvimoe.cli._common import PlotCallback
from gcvimoe.errors import GcvimoeError
from gcvimoe.train import build_config, train
from gcvimoe.train.evaluate import validate_checkpoint


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output", default="demo_output", metavar="DIR", help="where the run and report go")
    parser.add_argument("-c", "--config", default="digits", metavar="NAME|FILE",
                        help="training recipe: a built-in config or a YAML file (default: digits)")
    parser.add_argument("--epochs", type=int, metavar="N", help="override the recipe's epochs")


def run(args: argparse.Namespace) -> int:
    if args.epochs is not None and args.epochs < 1:
        raise GcvimoeError(f"--epochs must be at least 1, got {args.epochs}")
    output = Path(args.output)
    overrides = {"output": str(output / "train"), "overwrite": True}  # the demo folder is rewritten on every run
    if args.epochs:
        overrides["epochs"] = args.epochs
    cfg = build_config(args.config, overrides)
    print(f"demo: training {cfg.model} on the embedded digits with -c {args.config} -> {cfg.output}")
    start = time.perf_counter()
    result = train(cfg, callbacks=[PlotCallback()])
    wall_seconds = time.perf_counter() - start

    best = Path(cfg.output) / "best.pth"
    print(f"demo: validating {best}")
    metrics = validate_checkpoint(best, workers=0)
    usage_png = output / "expert_usage_best.png"  # train/expert_usage.png is the last epoch's, this the best's
    usage_png.unlink(missing_ok=True)
    plot_expert_usage(metrics["experts"], usage_png,
                      title=f"expert usage on the digits val set, best checkpoint (epoch {result.best_epoch})")
    report = output / "report.md"
    write_report(report, cfg, result, metrics, wall_seconds, args.config)
    print(f"demo: top-1 {metrics['top1']:.2f} % (top-5 {metrics['top5']:.2f} %) after {result.train_seconds:.0f} s "
          f"of training ({wall_seconds:.0f} s with start-up)")
    print(f"demo: report {report}")
    print(f"demo: plots  {Path(cfg.output) / 'curves.png'}, {usage_png}")
    return 0
