"""``gcvimoe train``: a built-in or YAML config plus ``--key value`` overrides; see :mod:`gcvimoe.train.trainer`.

Examples::

    gcvimoe train                                          # gcvimoe_nano on the embedded digits
    gcvimoe train -c fashion_mnist --epochs 5 --num-experts 4
    gcvimoe train -c gcvimoe_tiny --data-dir /data/imagenet --output runs/tiny
    gcvimoe train -c my_recipe.yaml --print-config         # the resolved config, then exit
    gcvimoe train --output runs/tiny --resume auto         # continue runs/tiny from its last.pth
    gcvimoe train --data-dir DIR --initial-checkpoint gcvit_xxtiny.pth   # fine-tunes with -c finetune
    torchrun --nproc_per_node 2 -m gcvimoe train -c digits
"""
import argparse
import dataclasses
import sys
from pathlib import Path

from gcvimoe.cli._common import PlotCallback, add_moe_options
from gcvimoe.errors import GcvimoeError
from gcvimoe.fields import suggest_unknown_flags
from gcvimoe.moe import config as moe_config
from gcvimoe.train.config import (
    CONFIG_ALIASES, FIELDS, FINETUNE_CONFIG, TrainConfig, build_config, builtin_configs, config_yaml)
from gcvimoe.train.checkpointing import find_resume_checkpoint, load_training_checkpoint

_HEADINGS = {first: f"config keys: {title}" for first, title in (
    ("model", "model"), ("dataset", "data"), ("scale", "augmentation"), ("epochs", "optimisation"),
    ("ema", "model averaging"), ("device", "runtime"), ("output", "output"))}


def _help_defaults() -> dict:
    """The values ``--help`` shows: those of the ``-c`` config on the command line (``gcvimoe train -c digits -h``),
    else the defaults."""
    argv = sys.argv[1:]
    for flag in ("-c", "--config"):
        if flag in argv[:-1]:
            try:
                return build_config(argv[argv.index(flag) + 1]).to_dict()
            except GcvimoeError:
                break
    return TrainConfig().to_dict()


def configure(parser: argparse.ArgumentParser) -> None:
    defaults = _help_defaults() if {"-h", "--help"} & set(sys.argv[1:]) else TrainConfig().to_dict()
    parser.add_argument("-c", "--config", metavar="NAME|FILE",
                        help=f"a built-in config ({', '.join(sorted(builtin_configs()))}; "
                             f"{', '.join(f'{a} = {b}' for a, b in CONFIG_ALIASES.items())}) or a YAML file")
    parser.add_argument("--resume", metavar="PATH",
                        help="checkpoint to continue from, or 'auto' for the output folder's last.pth (if any)")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config (defaults < -c file < flags) as YAML and exit")
    defaults.pop("moe")  # flags of their own, below
    FIELDS.add_flags(parser, defaults, headings=_HEADINGS, aliases={"initial_checkpoint": ["--pretrained-path"]},
                     negatable=True)  # --pretrained-path: timm train.py's name
    add_moe_options(parser, "config keys: MoE options (the moe: section)")
    suggest_unknown_flags(parser, [*FIELDS, *moe_config.FIELDS], "see gcvimoe train --help")


def recipe_for(args: argparse.Namespace, overrides: dict):
    """The ``-c`` config to use and the header line that says why, when the command line did not name one: starting
    from weights without ``-c`` fine-tunes (``-c finetune``); a resumed run keeps its own config."""
    if args.config is None and overrides.get("initial_checkpoint") and not args.resume:
        return FINETUNE_CONFIG, (f"recipe -c {FINETUNE_CONFIG} (picked by --initial-checkpoint without -c: short "
                                 f"warmup, lower lr, layer decay, no CutMix/Mixup; -c NAME picks another)")
    return args.config, None


def config_from_args(args: argparse.Namespace):
    """The effective config, the checkpoint to resume from (or None), where each non-default value came from, and
    the header lines the command line adds."""
    overrides = {**FIELDS.from_args(args), **moe_config.FIELDS.from_args(args)}
    origins: dict = {}
    config, note = recipe_for(args, overrides)
    cfg = build_config(config, overrides, origins=origins)
    checkpoint = None
    if args.resume:
        path = find_resume_checkpoint(args.resume, cfg.output)
        if path is not None:
            checkpoint = load_training_checkpoint(path)
            origins.clear()
            cfg = build_config(config, overrides, base=checkpoint.get("config"), origins=origins)
    return cfg, checkpoint, origins, [note] if note else []


def _with_data(cfg):
    """The config with the data-derived values filled in and the header lines saying why, when the data can be read
    now (else None and none)."""
    from gcvimoe.train.build import derive_from_data
    try:
        derived, _, notes = derive_from_data(cfg)
        return derived, notes
    except GcvimoeError:
        return None, []


def run(args: argparse.Namespace) -> int:
    cfg, checkpoint, origins, notes = config_from_args(args)
    if args.print_config:
        print(config_yaml(cfg, *_with_data(cfg)), end="")
        return 0
    from gcvimoe.train.checkpointing import never_checkpointed
    from gcvimoe.train.trainer import train
    if args.resume == "auto" and checkpoint is None:
        print(f"resume auto: no last.pth in {cfg.output}, starting a new run")
        if never_checkpointed(Path(cfg.output)):
            cfg = dataclasses.replace(cfg, overwrite=True)  # a job killed early must be able to restart
    train(cfg, resume=checkpoint, callbacks=[PlotCallback()], origins=origins, notes=notes)
    return 0
