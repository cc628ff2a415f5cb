"""Dropout from 16-bit random numbers, as a custom operator that ``torch.compile`` keeps whole.

Inside a compiled graph, inductor draws one random number per element with its own generator, which on the CPU
costs as much as an expert's GEMMs. This operator draws the keep-mask as the CPU expert kernel does (four 16-bit
numbers per 64-bit draw, :func:`gcvimoe.kernels.experts._keep_mask`), out of the compiler's sight, and the multiply
by the mask and ``1 / keep`` stays in the graph, where inductor fuses it. The plain path is ``nn.Dropout``.
"""
import torch
from torch import Tensor

from gcvimoe.kernels.experts import _keep_mask, dropout_keep


@torch.library.custom_op("gcvimoe::keep_mask", mutates_args=())
def keep_mask(x: Tensor, p: float) -> Tensor:
    """A uint8 mask of ``x``'s shape: 1 with probability ``dropout_keep(p)``, else 0."""
    return _keep_mask(x.numel(), 1, dropout_keep(p), x.device).view(x.shape)


@keep_mask.register_fake
def _(x: Tensor, p: float) -> Tensor:
    return torch.empty(x.shape, dtype=torch.uint8, device=x.device)


def dropout_bits(x: Tensor, p: float) -> Tensor:
    """Inverted dropout of ``x`` at rate ``p`` (training), with the mask from :func:`keep_mask`."""
    keep = dropout_keep(p)
    if keep >= 1:
        return x
    return x * keep_mask(x, p) * (1. / keep)
