"""Flags that several subcommands share, so that each has one name and one meaning, and the plotting callback."""
import argparse
import typing
from pathlib import Path

from gcvimoe.moe import config as moe_config
from gcvimoe.train import Callback

DEVICE_HELP = "auto (the GPU when there is one), cpu, cuda or cuda:N"


def add_device(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", help=DEVICE_HELP)


def add_checkpoint(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, metavar="CKPT",
                        help="a training checkpoint (last.pth, best.pth) or a .safetensors export")


def add_use_ema(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--use-ema", action="store_true", help="use the EMA weights of a training checkpoint")


def add_json(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON instead of the report")


def metavar(tp) -> str:
    if typing.get_origin(tp) is typing.Union:
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
    if typing.get_origin(tp) in (list, typing.List):
        return "A,B"
    return {int: "N", float: "X", str: "STR", bool: "BOOL"}.get(tp, "YAML")


def add_moe_options(parser: argparse.ArgumentParser, title: str = "MoE options") -> None:
    """``--num-experts``, ``--top-k``, ... generated from :class:`gcvimoe.moe.MoEConfig`; absent unless given."""
    group = parser.add_argument_group(title)
    for name, f in moe_config.FIELDS.items():
        tp = moe_config.FIELD_TYPES[name]
        is_bool = tp is bool
        group.add_argument(
            f"--{name.replace('_', '-')}", dest=name, default=argparse.SUPPRESS, metavar=metavar(tp),
            nargs="?" if is_bool else None, const="true" if is_bool else None,
            help=f"{f.metadata['help']} (default: {getattr(moe_config.GCVIMOE, name)!r})")


def moe_options(args: argparse.Namespace) -> dict:
    """The MoE options given on the command line, typed."""
    from gcvimoe.train.config import parse_cli_value
    return {name: parse_cli_value(name, getattr(args, name)) for name in moe_config.FIELDS if hasattr(args, name)}


class PlotCallback(Callback):
    """Draws the training curves and the expert usage into the run folder when training ends (the loop never draws)."""

    def on_train_end(self, run, state, eval_result) -> None:
        from gcvimoe.analysis import plot_expert_usage, plot_training_curves
        output_dir = Path(run.output_dir)
        plot_training_curves(state.history, output_dir / "curves.png")
        if eval_result:
            plot_expert_usage(eval_result["experts"], output_dir / "expert_usage.png",
                              title=f"expert usage on the val set, epoch {state.history[-1]['epoch']}")
