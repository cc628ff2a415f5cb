"""Model size: total and active parameters, MACs per image, and where the MoE layers are."""
from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode, mm_flop, register_flop_formula, sdpa_flop_count


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

    model = create_model(model_name, **kwargs)
    input_size = list(input_size or model.pretrained_cfg['input_size'])
    if kwargs.get('in_chans'):
        input_size[0] = kwargs['in_chans']
    return describe_model(model, input_size)


def describe_model(model: nn.Module, input_size: Optional[Sequence[int]] = None) -> ModelInfo:
    """Size and compute of a built gcvimoe ``model`` (its dense twin's MACs too when it has experts)."""
    from gcvimoe.models.export import dense_twin
    from gcvimoe.moe import moe_layers

    input_size = list(input_size or model.pretrained_cfg['input_size'])
    layers = dict(moe_layers(model))
    top_k = next(iter(layers.values())).config.top_k if layers else 0
    return ModelInfo(
        model=model.model_name,
        input_size=input_size,
        total_params=sum(p.numel() for p in model.parameters()),
        active_params=_active_params(model, top_k),
        macs=count_macs(model, input_size),
        dense_macs=count_macs(dense_twin(model), input_size) if layers else None,
        num_moe_layers=len(layers),
        moe_layers=list(layers),
        num_experts=getattr(model, 'num_experts', 0) if layers else 0,
        top_k=top_k,
    )
