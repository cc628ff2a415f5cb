"""The `gcvimoe` command line: one thin module per subcommand, each parsing its arguments and calling the library.

Every subcommand module defines ``configure(parser)`` to add its arguments and ``run(args) -> int`` to do the work.
Errors a user can cause (:class:`gcvimoe.errors.GcvimoeError`) print as a single ``error:`` line and exit 2; any
other exception is a bug and keeps its traceback.
"""
import argparse
import sys
import warnings
from typing import List, Optional

from gcvimoe import __version__
from gcvimoe.cli import benchmark, convert, demo, info, predict, train, validate, visualize
from gcvimoe.errors import GcvimoeError

COMMANDS = {
    "train": (train, "train a model (built-in or YAML config plus command-line overrides)"),
    "validate": (validate, "evaluate a checkpoint: top-1/top-5, loss, expert statistics"),
    "predict": (predict, "top-k labels for images"),
    "benchmark": (benchmark, "measure a model's throughput and memory"),
    "visualize": (visualize, "plot expert usage and routing maps of a checkpoint"),
    "info": (info, "parameters, active parameters and MACs of a model"),
    "convert": (convert, "convert checkpoints: upcycle dense weights, export safetensors"),
    "demo": (demo, "train, validate and report on the embedded digits set"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gcvimoe",
        description="GC ViT vision transformers with sparse Mixture-of-Experts MLPs.",
    )
    parser.add_argument("--version", action="version", version=f"gcvimoe {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        sub = subparsers.add_parser(name, help=help_text, description=help_text)
        module.configure(sub)
        sub.set_defaults(_run=module.run)
    return parser


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    return f"warning: {message}\n"


def main(argv: Optional[List[str]] = None) -> int:
    warnings.formatwarning = _one_line_warning  # a deprecation reads as one line, like an error
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "_run", None) is None:
        parser.print_help()
        return 0
    try:
        return int(args._run(args) or 0)
    except GcvimoeError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
