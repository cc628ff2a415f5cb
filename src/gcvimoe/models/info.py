"""`gcvimoe info MODEL`: total and active parameters, MACs per image, and where the MoE layers are."""
import argparse
import json
from dataclasses import asdict, dataclass
from typing import List, Optional, Sequence

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode, mm_flop, register_flop_formula, sdpa_flop_count

from gcvimoe.errors import GcvimoeError

aten = torch.ops.aten


# torch counts the CUDA attention kernels but not the CPU flash kernel that SDPA picks on CPU
@register_flop_formula(aten._scaled_dot_product_flash_attention_for_cpu)
def _sdpa_cpu_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


# nor the in-place addmm_ with which inference adds a projection into the residual stream
@register_flop_formula(aten.addmm_)
def _addmm_inplace_flop(self_shape, a_shape, b_shape, *args, **kwargs) -> int:
    return mm_flop(a_shape, b_shape)


def count_macs(model: nn.Module, input_size: Sequence[int]) -> int:
    """Multiply-accumulates of one forward pass on a single ``input_size`` = (C, H, W) image, as the paper counts.

    For an MoE model this is the active compute: only the experts each token was sent to are counted.
    """
    param = next(model.parameters())
    x = torch.randn(1, *input_size, device=param.device, dtype=param.dtype)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(x)
    finally:
        model.train(was_training)
    return counter.get_total_flops() // 2


@dataclass
class ModelInfo:
    """What `gcvimoe info` reports."""
    model: str
    input_size: List[int]
    total_params: int
    active_params: int
    macs: int
    dense_macs: Optional[int]
    num_moe_layers: int
    moe_layers: List[str]
    num_experts: int
    top_k: int


def _active_params(model: nn.Module, top_k: int) -> int:
    """Parameters one token uses: expert weights count ``top_k / num_experts`` of their size (routers in full)."""
    total = 0
    for name, p in model.named_parameters():
        if getattr(p, 'is_expert', False):
            num_experts = p.shape[0]
            total += p.numel() * min(top_k, num_experts) // num_experts
        else:
            total += p.numel()
    return total


def model_info(model_name: str, input_size: Optional[Sequence[int]] = None, **kwargs) -> ModelInfo:
    """Builds ``model_name`` and measures its size and compute (and that of its dense twin when it has experts)."""
    from gcvimoe.models import create_model
    from gcvimoe.moe import moe_layers

    model = create_model(model_name, **kwargs)
    input_size = list(input_size or model.pretrained_cfg['input_size'])
    if kwargs.get('in_chans'):
        input_size[0] = kwargs['in_chans']
    layers = [name for name, _ in moe_layers(model)]
    num_experts = getattr(model, 'num_experts', 0)
    top_k = kwargs.get('top_k', 1) if layers else 0
    dense_macs = None
    if layers:
        dense = create_model(model_name, **dict(kwargs, num_experts=0))
        dense_macs = count_macs(dense, input_size)
    return ModelInfo(
        model=model_name,
        input_size=input_size,
        total_params=sum(p.numel() for p in model.parameters()),
        active_params=_active_params(model, top_k),
        macs=count_macs(model, input_size),
        dense_macs=dense_macs,
        num_moe_layers=len(layers),
        moe_layers=layers,
        num_experts=num_experts if layers else 0,
        top_k=top_k,
    )


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('model', help='model name, e.g. gcvimoe_tiny')
    parser.add_argument('--img-size', type=int, default=None, help='input resolution (default: the model\'s)')
    parser.add_argument('--in-chans', type=int, default=None, help='input channels (default: the model\'s)')
    parser.add_argument('--num-experts', type=int, default=None, help='experts per MoE layer (0 = dense)')
    parser.add_argument('--top-k', type=int, default=None, help='experts per token')
    parser.add_argument('--num-classes', type=int, default=None, help='classifier outputs')
    parser.add_argument('--json', action='store_true', help='print one JSON object')


def run(args: argparse.Namespace) -> int:
    kwargs = {k: v for k, v in dict(
        img_size=args.img_size, in_chans=args.in_chans, num_experts=args.num_experts, top_k=args.top_k,
        num_classes=args.num_classes).items() if v is not None}
    input_size = None
    if args.img_size is not None:
        input_size = [args.in_chans or 3, args.img_size, args.img_size]
    info = model_info(args.model, input_size=input_size, **kwargs)
    if args.json:
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
