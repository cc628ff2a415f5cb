"""`gcvimoe info --model MODEL` or `gcvimoe info --checkpoint FILE`: total and active parameters, MACs per image, and
where the MoE layers are."""
import argparse
import json
import warnings
from dataclasses import asdict

from gcvimoe.cli._common import add_json, add_moe_options
from gcvimoe.errors import GcvimoeError
from gcvimoe.models import create_model_from_checkpoint
from gcvimoe.models.info import describe_model, model_info
from gcvimoe.moe.config import FIELDS as MOE_FIELDS


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('--model', dest='model_name', metavar='MODEL', help='model name, e.g. gcvimoe_tiny')
    parser.add_argument('--checkpoint', metavar='FILE',
                        help='describe the model a file or folder holds (a run\'s best.pth, RUN/model, .safetensors)')
    parser.add_argument('model', nargs='?', help=argparse.SUPPRESS)  # the 0.1 positional form, kept for one release
    parser.add_argument('--img-size', type=int, default=None, help='input resolution (default: the model\'s)')
    parser.add_argument('--in-chans', type=int, default=None, help='input channels (default: the model\'s)')
    parser.add_argument('--num-classes', type=int, default=None, help='classifier outputs')
    add_json(parser)
    add_moe_options(parser)


def run(args: argparse.Namespace) -> int:
    name = args.model_name or args.model
    if args.checkpoint is not None:
        if name is not None:
            raise GcvimoeError("give --model or --checkpoint, not both: the checkpoint names its model")
        info = describe_model(create_model_from_checkpoint(args.checkpoint))
        return _print(info, args.json)
    if name is None:
        raise GcvimoeError("name the model: gcvimoe info --model gcvimoe_tiny (or --checkpoint FILE)")
    if args.model and not args.model_name:
        warnings.warn("gcvimoe info MODEL is deprecated; write gcvimoe info --model MODEL", FutureWarning, stacklevel=2)
    for flag in ('img_size', 'in_chans', 'num_classes'):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise GcvimoeError(f"--{flag.replace('_', '-')} must be at least 1, got {value}")
    kwargs = {k: v for k, v in dict(img_size=args.img_size, in_chans=args.in_chans,
                                    num_classes=args.num_classes).items() if v is not None}
    kwargs.update(MOE_FIELDS.from_args(args))
    return _print(model_info(name, **kwargs), args.json)  # the model's input size follows img_size and in_chans


def _print(info, as_json: bool) -> int:
    if as_json:
        print(json.dumps(asdict(info)))
        return 0
    print(f"model            {info.model}  (input {'x'.join(map(str, info.input_size))})")
    print(f"parameters       {info.total_params / 1e6:.2f} M total, {info.active_params / 1e6:.2f} M active per token")
    print(f"MACs per image   {info.macs / 1e9:.3f} G active"
          + (f", {info.dense_macs / 1e9:.3f} G for the dense twin ({info.macs / info.dense_macs:.3f}x)"
             if info.dense_macs else ""))
    if info.num_moe_layers:
        print(f"MoE layers       {info.num_moe_layers} x {info.num_experts} experts, top-{info.top_k}: "
              + ", ".join(name.removesuffix('.mlp') for name in info.moe_layers))
    else:
        print("MoE layers       none (dense)")
    return 0
