"""The convolutional layers of GC ViT: the stem, the downsamples between stages and the global-token tower."""
from typing import Callable, Optional

import torch
import torch.nn as nn

from timm.layers import LayerNorm2d, SEModule

__all__ = ['MbConvBlock', 'Downsample2d', 'FeatureBlock', 'Stem']


class MbConvBlock(nn.Module):
    """Depthwise-separable conv block with squeeze-excitation and a residual, no norm (GC ViT's "fused MBConv")."""

    def __init__(self, dim: int, act_layer: Callable = nn.GELU, device=None, dtype=None):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.conv_dw = nn.Conv2d(dim, dim, 3, 1, 1, groups=dim, bias=False, **dd)
        self.act = act_layer()
        self.se = SEModule(dim, rd_ratio=0.25, bias=False, act_layer=act_layer, **dd)
        self.conv_pw = nn.Conv2d(dim, dim, 1, 1, 0, bias=False, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv_pw(self.se(self.act(self.conv_dw(x))))


class Downsample2d(nn.Module):
    """Norm, MBConv, strided 3x3 conv, norm: halves the resolution (NCHW in and out)."""

    def __init__(self, dim: int, dim_out: Optional[int] = None, act_layer: Callable = nn.GELU,
                 norm_layer: Callable = LayerNorm2d, device=None, dtype=None):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        dim_out = dim_out or dim
        self.norm1 = norm_layer(dim, **dd)
        self.conv_block = MbConvBlock(dim, act_layer=act_layer, **dd)
        # oneDNN's CPU weight gradient of this strided conv takes about twice its forward; a patch GEMM does not
        self.reduction = nn.Conv2d(dim, dim_out, 3, 2, 1, bias=False, **dd)
        self.norm2 = norm_layer(dim_out, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm2(self.reduction(self.conv_block(self.norm1(x))))


class FeatureBlock(nn.Module):
    """The global-token tower: ``levels`` MBConv + max-pool steps bring the stage map down to the window size."""

    def __init__(self, dim: int, levels: int = 0, act_layer: Callable = nn.GELU, device=None, dtype=None):
        super().__init__()
        self.blocks = nn.Sequential()
        for i in range(max(1, levels)):
            self.blocks.add_module(f'conv{i + 1}', MbConvBlock(dim, act_layer=act_layer, device=device, dtype=dtype))
            if i < levels:
                self.blocks.add_module(f'pool{i + 1}', nn.MaxPool2d(kernel_size=3, stride=2, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


class Stem(nn.Module):
    """3x3 stride-2 conv then a downsample: 4x reduction, NCHW."""

    def __init__(self, in_chs: int = 3, out_chs: int = 96, act_layer: Callable = nn.GELU,
                 norm_layer: Callable = LayerNorm2d, device=None, dtype=None):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.conv1 = nn.Conv2d(in_chs, out_chs, kernel_size=3, stride=2, padding=1, **dd)
        self.down = Downsample2d(out_chs, act_layer=act_layer, norm_layer=norm_layer, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # channels-last convolutions: the LayerNorm2d permutes to NHWC and back become views instead of copies
        return self.down(self.conv1(x.contiguous(memory_format=torch.channels_last)))
