"""``gcvimoe train``: a YAML config plus ``--key value`` overrides of any config key; see :mod:`gcvimoe.engine.train`.

Examples::

    gcvimoe train                                          # gcvimoe_nano on the embedded digits
    gcvimoe train -c configs/fashion_mnist.yaml --epochs 5 --num-experts 4
    gcvimoe train -c configs/gcvimoe_tiny.yaml --data-dir /data/imagenet --output runs/tiny
    gcvimoe train --output runs/tiny --resume auto         # continue runs/tiny from its last.pth
    torchrun --nproc_per_node 2 -m gcvimoe train -c configs/digits.yaml
"""
import argparse
import dataclasses
import difflib
import typing

from gcvimoe.engine.config import FIELD_TYPES, FIELDS, build_config, parse_cli_value
from gcvimoe.engine.checkpoint import find_resume_checkpoint, load_checkpoint

_GROUPS = (
    ("model", "model"), ("dataset", "data"), ("scale", "augmentation"), ("epochs", "optimisation"),
    ("ema", "model averaging"), ("device", "runtime"), ("output", "output"),
)


def _metavar(name: str) -> str:
    tp = FIELD_TYPES[name]
    if typing.get_origin(tp) is typing.Union:
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
    if typing.get_origin(tp) in (list, typing.List):
        return "A,B"
    return {int: "N", float: "X", str: "STR", bool: "BOOL"}.get(tp, "YAML")


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-c", "--config", metavar="FILE", help="YAML file of config keys (see configs/)")
    parser.add_argument("--resume", metavar="PATH",
                        help="checkpoint to continue from, or 'auto' for the output folder's last.pth (if any)")
    group = parser
    for name, f in FIELDS.items():
        heading = next((title for first, title in _GROUPS if first == name), None)
        if heading is not None:
            group = parser.add_argument_group(f"config keys: {heading}")
        is_bool = FIELD_TYPES[name] is bool
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        group.add_argument(
            f"--{name.replace('_', '-')}", dest=name, default=argparse.SUPPRESS, metavar=_metavar(name),
            nargs="?" if is_bool else None, const="true" if is_bool else None,
            help=f"{f.metadata['help']} (default: {default!r})")
    _suggest_unknown_options(parser)


def _suggest_unknown_options(parser: argparse.ArgumentParser) -> None:
    """Make an unknown ``--option`` an error naming the nearest config key (argparse alone only lists it)."""
    parse_known_args = parser.parse_known_args

    def parse_with_suggestion(args=None, namespace=None):
        namespace, extras = parse_known_args(args, namespace)
        for arg in extras:
            if arg.startswith("--"):
                option = arg[2:].split("=", 1)[0]
                close = difflib.get_close_matches(option.replace("-", "_"), list(FIELDS), n=1, cutoff=0.6)
                hint = f"; did you mean --{close[0].replace('_', '-')}?" if close else "; see gcvimoe train --help"
                parser.error(f"unknown option {arg.split('=', 1)[0]}{hint}")
        return namespace, extras

    parser.parse_known_args = parse_with_suggestion


def config_from_args(args: argparse.Namespace):
    """The effective config and the checkpoint to resume from (or None)."""
    overrides = {name: parse_cli_value(name, getattr(args, name)) for name in FIELDS if hasattr(args, name)}
    cfg = build_config(args.config, overrides)
    checkpoint = None
    if args.resume:
        path = find_resume_checkpoint(args.resume, cfg.output)
        if path is not None:
            checkpoint = load_checkpoint(path)
            cfg = build_config(args.config, overrides, base=checkpoint.get("config"))
    return cfg, checkpoint


def run(args: argparse.Namespace) -> int:
    from gcvimoe.engine.train import train
    cfg, checkpoint = config_from_args(args)
    if args.resume == "auto" and checkpoint is None:
        print(f"resume auto: no last.pth in {cfg.output}, starting a new run")
    train(cfg, resume=checkpoint)
    return 0
