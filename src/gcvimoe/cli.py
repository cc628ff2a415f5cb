"""The `gcvimoe` command line: one subcommand per module, each module owning its arguments.

Every subcommand module defines ``configure(parser)`` to add its arguments and ``run(args) -> int`` to do the work.
Errors a user can cause (:class:`gcvimoe.errors.GcvimoeError`) print as a single ``error:`` line and exit 2.
"""
import argparse
import importlib
import importlib.util
import sys
from typing import List, Optional

from gcvimoe.errors import GcvimoeError

# name -> (module, one-line help); a subcommand appears once its module exists.
COMMANDS = {
    "train": ("gcvimoe.engine.train_cli", "train a model (YAML config plus command-line overrides)"),
    "validate": ("gcvimoe.engine.validate_cli", "evaluate a checkpoint: top-1/top-5, loss, expert statistics"),
    "predict": ("gcvimoe.engine.predict_cli", "top-5 labels for images"),
    "benchmark": ("gcvimoe.engine.benchmark_cli", "measure a model's throughput and memory"),
    "visualize": ("gcvimoe.viz.cli", "plot expert usage and routing maps of a checkpoint"),
    "info": ("gcvimoe.models.info", "parameters, active parameters and MACs of a model"),
    "convert": ("gcvimoe.models.convert", "convert checkpoints: upcycle dense weights, export safetensors"),
    "demo": ("gcvimoe.engine.demo", "train, validate and report on the embedded digits set"),
}


def _available_commands():
    for name, (module, help_text) in COMMANDS.items():
        if importlib.util.find_spec(module) is not None:
            yield name, module, help_text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gcvimoe",
        description="GC ViT vision transformers with sparse Mixture-of-Experts MLPs.",
    )
    from gcvimoe import __version__
    parser.add_argument("--version", action="version", version=f"gcvimoe {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module_name, help_text in _available_commands():
        module = importlib.import_module(module_name)
        sub = subparsers.add_parser(name, help=help_text, description=help_text)
        module.configure(sub)
        sub.set_defaults(_run=module.run)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "_run", None) is None:
        parser.print_help()
        return 0
    try:
        return int(args._run(args) or 0)
    except GcvimoeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
