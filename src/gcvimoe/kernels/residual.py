"""The in-place inference residual: a GC ViT block without autograd, in fewer passes over memory.

Each residual add becomes the beta = 1 term of the branch's output GEMM (layer scale folded into the weight), and
GELU runs in place. The plain path is the block's own forward (:class:`gcvimoe.models.blocks.GlobalContextVitBlock`),
which the tests compare it with.
"""
from typing import Optional

import torch
from timm.layers import LayerScale, Mlp
from torch import Tensor, nn

from gcvimoe.kernels.experts import activation_into


def add_linear(x: Tensor, inputs: Tensor, linear: nn.Linear, layer_scale: nn.Module, inplace: bool) -> Tensor:
    """``x + layer_scale(linear(inputs))`` without autograd, in ``x``'s memory when ``inplace``: one GEMM that
    accumulates into the residual (beta = 1) instead of a GEMM, a scale and an add over separate tensors."""
    weight, bias = linear.weight, linear.bias
    if isinstance(layer_scale, LayerScale):
        weight = weight * layer_scale.gamma[:, None]
        bias = bias * layer_scale.gamma if bias is not None else None
    if inplace and x.is_contiguous():
        out = x if bias is None else x.add_(bias)
    else:
        out = torch.empty_like(x, memory_format=torch.contiguous_format)
        if bias is None:
            out.copy_(x)
        else:
            torch.add(x, bias, out=out)
    out.view(-1, out.shape[-1]).addmm_(inputs.reshape(-1, inputs.shape[-1]), weight.t())
    return out


def block_inference(block: nn.Module, x: Tensor, q_global: Tensor, layout, key_mask: Optional[Tensor],
                    owns_input: bool) -> Tensor:
    """A :class:`gcvimoe.models.blocks.GlobalContextVitBlock`'s forward without autograd (its arguments, ``block``
    first); writes the residual stream into ``x`` when ``owns_input``."""
    b, length, c = x.shape
    windows = block.norm1(x).view(b * layout.num_windows, layout.tokens_per_window, c)
    attn = block.attn.attend(windows, q_global, layout.window, key_mask)
    x = add_linear(x, attn, block.attn.proj, block.ls1, inplace=owns_input)
    mlp = block.mlp
    if isinstance(mlp, Mlp) and layout.valid_index is None and isinstance(mlp.norm, nn.Identity):
        hidden = mlp.fc1(block.norm2(x))
        hidden = activation_into(mlp.act, hidden, out=hidden)
        return add_linear(x, hidden, mlp.fc2, block.ls2, inplace=True)
    return x.add_(block.ls2(block.mlp_or_moe(block.norm2(x), layout.valid_index)))
