"""Global Context ViT (GC ViT) with optional sparse Mixture-of-Experts MLPs (GCViMoE).

GC ViT: Hatamizadeh et al., "Global Context Vision Transformers", ICML 2023 (https://arxiv.org/abs/2206.09959).
Window attention in every block; odd-indexed blocks take their queries from a global token stream that a small
conv-and-pool tower (``global_block``) distils from the whole stage input.

With ``num_experts=0`` the state dict equals timm's ``gcvit_*`` (same keys and shapes), so timm checkpoints load
strictly. The implementation differs where it pays:

- The residual stream of a stage is kept in window order ``[b, windows * n, c]``: GC ViT has no shifted windows, so
  LayerNorm, MLP and MoE (all per token) run in that order and the stage partitions and restores windows once,
  not twice per block.
- Attention runs through ``F.scaled_dot_product_attention`` with the relative position bias as the additive mask;
  CPU training uses one hand-differentiated node instead when that kernel is on (:mod:`gcvimoe.kernels.attention`).
- Without autograd (inference) a block adds each branch into the residual stream in place when that kernel is on
  (:mod:`gcvimoe.kernels.residual`): fewer passes over memory, the same numbers.
- Any input size runs: windows are clipped to the feature map, maps that the window does not divide are padded
  (padded keys masked, padded tokens kept out of the MLP/MoE), and the global query is resized to the window when
  the tower's output does not match it. Relative position tables are resized on load when the window changes.
"""
import inspect
import math
from functools import partial
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import (
    ClassifierHead, DropPath, LayerNorm2d, LayerScale, Mlp, SEModule, calculate_drop_path_rates,
    resize_rel_pos_bias_table, to_2tuple, trunc_normal_,
)
from timm.models import build_model_with_cfg, generate_default_cfgs, named_apply, register_model
from timm.models._features import feature_take_indices

from gcvimoe.errors import GcvimoeError
from gcvimoe import kernels
from gcvimoe.kernels.attention import biased_attention
from gcvimoe.kernels.residual import block_inference
from gcvimoe.models.placement import resolve_moe_blocks
from gcvimoe.moe import Experts, MoE, MoEConfig
from gcvimoe.moe.config import FIELDS as MOE_FIELDS
from gcvimoe.tracing import exporting

__all__ = ['GlobalContextVit', 'checkpoint_filter_fn', 'VARIANTS']


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

    def __init__(
            self,
            dim: int,
            dim_out: Optional[int] = None,
            act_layer: Callable = nn.GELU,
            norm_layer: Callable = LayerNorm2d,
            device=None,
            dtype=None,
    ):
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

    def __init__(
            self,
            in_chs: int = 3,
            out_chs: int = 96,
            act_layer: Callable = nn.GELU,
            norm_layer: Callable = LayerNorm2d,
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.conv1 = nn.Conv2d(in_chs, out_chs, kernel_size=3, stride=2, padding=1, **dd)
        self.down = Downsample2d(out_chs, act_layer=act_layer, norm_layer=norm_layer, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # channels-last convolutions: the LayerNorm2d permutes to NHWC and back become views instead of copies
        return self.down(self.conv1(x.contiguous(memory_format=torch.channels_last)))


class RelativePositionBias(nn.Module):
    """Learned relative position bias for a ``window_size`` window, usable for any smaller window too.

    The table holds one row per relative offset of the configured window, ``(2 wh - 1) * (2 ww - 1)`` rows, laid out
    as timm's ``gen_relative_position_index`` lays them out; a smaller runtime window (a feature map smaller than the
    window) uses the subset of offsets it spans.
    """

    def __init__(self, window_size: Tuple[int, int], num_heads: int, device=None, dtype=None):
        super().__init__()
        self.window_size = tuple(window_size)
        self.num_heads = num_heads
        num_offsets = (2 * self.window_size[0] - 1) * (2 * self.window_size[1] - 1)
        self.relative_position_bias_table = nn.Parameter(
            torch.empty(num_offsets, num_heads, device=device, dtype=dtype))
        # the configured window's index as a buffer: it moves with the module and is no side effect under export
        self.register_buffer('relative_position_index', self._index(self.window_size, device), persistent=False)
        trunc_normal_(self.relative_position_bias_table, std=.02)

    def _index(self, window: Tuple[int, int], device) -> torch.Tensor:
        """The table row of every token pair of a ``window`` ``[n * n]``."""
        coords = torch.stack(torch.meshgrid(
            torch.arange(window[0], device=device), torch.arange(window[1], device=device), indexing='ij',
        )).flatten(1)
        rel = coords[:, :, None] - coords[:, None, :]
        return ((rel[0] + self.window_size[0] - 1) * (2 * self.window_size[1] - 1)
                + rel[1] + self.window_size[1] - 1).view(-1)

    def forward(self, window: Tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
        """Returns the bias ``[1, heads, n, n]`` for a ``window`` (n = wh * ww tokens) in ``dtype``."""
        table = self.relative_position_bias_table
        n = window[0] * window[1]
        rows = self.relative_position_index if window == self.window_size else self._index(window, table.device)
        return table[rows].t().reshape(1, self.num_heads, n, n).to(dtype)


def _fx_tracing() -> bool:
    return torch.fx._symbolic_trace.is_fx_symbolic_tracing()


def _autocast_enabled(device: torch.device) -> bool:
    if _fx_tracing() or device.type == 'meta':  # shape-only runs (MAC counting): autocast has no meta backend to ask
        return False
    return torch.is_autocast_enabled(device.type)


class WindowAttentionGlobal(nn.Module):
    """Multi-head attention within windows; with ``use_global`` the queries come from the stage's global tokens."""

    def __init__(  # noqa: PLR0913  (flat keywords, as timm's modules)
            self,
            dim: int,
            num_heads: int,
            window_size: Tuple[int, int],
            use_global: bool = True,
            qkv_bias: bool = True,
            attn_drop: float = 0.,
            proj_drop: float = 0.,
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.use_global = use_global
        self.rel_pos = RelativePositionBias(to_2tuple(window_size), num_heads, **dd)
        self.qkv = nn.Linear(dim, dim * (2 if use_global else 3), bias=qkv_bias, **dd)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim, **dd)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(
            self,
            x: torch.Tensor,
            q_global: torch.Tensor,
            window: Tuple[int, int],
            key_mask: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Attention within windows, then the output projection; arguments as for :meth:`attend`."""
        return self.proj_drop(self.proj(self.attend(x, q_global, window, key_mask)))

    def _use_attention_kernel(self, x: torch.Tensor) -> bool:
        """CPU training without attention dropout, autocast or compilation (see :mod:`gcvimoe.kernels.attention`)."""
        return (kernels.enabled('attention') and not _fx_tracing() and torch.is_grad_enabled() and x.device.type == 'cpu'
                and (self.attn_drop == 0 or not self.training) and not _autocast_enabled(x.device)
                and not torch.compiler.is_compiling())

    def attend(
            self,
            x: torch.Tensor,
            q_global: torch.Tensor,
            window: Tuple[int, int],
            key_mask: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Attention within windows, heads merged, before the output projection: ``[b*w, n, c]``.

        Args:
            x: Window tokens ``[b*w, n, c]`` (w windows per image, n tokens per window).
            q_global: Global queries ``[b*w, h, n, c/h]``, already broadcast to every window.
            window: The runtime window (wh, ww), wh * ww = n.
            key_mask: Additive mask ``[b*w, 1, 1, n]`` (-inf on padded keys) or None.
        """
        bw, n, c = x.shape[0], x.shape[1], x.shape[2]
        if self.use_global:
            k, v = self.qkv(x).view(bw, n, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
            q = q_global
        else:
            q, k, v = self.qkv(x).view(bw, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        bias = self.rel_pos(window, q.dtype)
        if key_mask is not None:
            bias = bias + key_mask.to(q.dtype)
        if self._use_attention_kernel(x):
            x = biased_attention(q, k, v, bias, self.head_dim ** -0.5)
        elif exporting():
            # the plain ops: ONNX decomposes SDPA into an output of other strides than the traced one
            x = ((q * self.head_dim ** -0.5) @ k.transpose(-2, -1) + bias).softmax(-1) @ v
        else:
            x = F.scaled_dot_product_attention(
                q, k, v, attn_mask=bias, dropout_p=self.attn_drop if self.training else 0.,
            )
        return x.transpose(1, 2).reshape(bw, n, c)


class WindowLayout:
    """How a stage's feature map ``[b, c, H, W]`` is cut into windows: sizes, padding, and the masks that padding needs.

    Token order inside the stage is window-major per image: ``[b, windows * n, c]``, so ``view(b * windows, n, c)``
    gives the attention batch without a copy.
    """

    def __init__(self, feat_size: Tuple[int, int], window_size: Tuple[int, int], device: torch.device):
        height, width = feat_size
        # a window never exceeds the map; a map the window does not divide is padded at the bottom/right
        self.window = (min(window_size[0], height), min(window_size[1], width))
        self.feat_size = (height, width)
        self.padded_size = (
            math.ceil(height / self.window[0]) * self.window[0],
            math.ceil(width / self.window[1]) * self.window[1],
        )
        self.grid = (self.padded_size[0] // self.window[0], self.padded_size[1] // self.window[1])
        self.num_windows = self.grid[0] * self.grid[1]
        self.tokens_per_window = self.window[0] * self.window[1]
        self.is_padded = self.padded_size != self.feat_size
        self.key_mask = None  # [w, 1, 1, n], -inf on padded keys
        self.valid_index = None  # [valid tokens] positions of real tokens in window order
        if self.is_padded:
            valid = torch.zeros(self.padded_size, dtype=torch.bool, device=device)
            valid[:height, :width] = True
            valid = self._to_windows(valid[None, None]).view(-1)  # [w * n]
            self.valid_index = valid.nonzero().squeeze(1)
            self.key_mask = torch.zeros(valid.shape, device=device).masked_fill(~valid, float('-inf'))
            self.key_mask = self.key_mask.view(self.num_windows, 1, 1, self.tokens_per_window)

    def _to_windows(self, x: torch.Tensor) -> torch.Tensor:
        """``[b, c, Hp, Wp]`` -> ``[b, w * n, c]`` (one copy)."""
        b, c = x.shape[0], x.shape[1]
        (gh, gw), (wh, ww) = self.grid, self.window
        x = x.view(b, c, gh, wh, gw, ww).permute(0, 2, 4, 3, 5, 1)
        return x.reshape(b, self.num_windows * self.tokens_per_window, c)

    def partition(self, x: torch.Tensor) -> torch.Tensor:
        """``[b, c, H, W]`` -> ``[b, w * n, c]``, zero-padding the map first when needed."""
        if self.is_padded:
            x = F.pad(x, (0, self.padded_size[1] - self.feat_size[1], 0, self.padded_size[0] - self.feat_size[0]))
        return self._to_windows(x)

    def reverse(self, x: torch.Tensor) -> torch.Tensor:
        """``[b, w * n, c]`` -> ``[b, c, H, W]`` (one copy), dropping padding."""
        b, c = x.shape[0], x.shape[2]
        (gh, gw), (wh, ww) = self.grid, self.window
        x = x.view(b, gh, gw, wh, ww, c).permute(0, 5, 1, 3, 2, 4).reshape(b, c, *self.padded_size)
        if self.is_padded:
            x = x[:, :, :self.feat_size[0], :self.feat_size[1]].contiguous()
        return x

    def window_batch_mask(self, batch_size: int) -> Optional[torch.Tensor]:
        """The key mask repeated for every image: ``[b*w, 1, 1, n]``."""
        if self.key_mask is None:
            return None
        return self.key_mask.repeat(batch_size, 1, 1, 1)


class GlobalContextVitBlock(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm1(x))`` then ``x + mlp(norm2(x))``, the MLP dense or MoE."""

    def __init__(  # noqa: PLR0913  (flat keywords, as timm's modules)
            self,
            dim: int,
            num_heads: int,
            window_size: Tuple[int, int],
            mlp_ratio: float = 4.,
            use_global: bool = True,
            qkv_bias: bool = True,
            layer_scale: Optional[float] = None,
            proj_drop: float = 0.,
            attn_drop: float = 0.,
            drop_path: float = 0.,
            act_layer: Callable = nn.GELU,
            norm_layer: Callable = nn.LayerNorm,
            moe_kwargs: Optional[dict] = None,
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.norm1 = norm_layer(dim, **dd)
        self.attn = WindowAttentionGlobal(
            dim,
            num_heads=num_heads,
            window_size=window_size,
            use_global=use_global,
            qkv_bias=qkv_bias,
            attn_drop=attn_drop,
            proj_drop=proj_drop,
            **dd,
        )
        self.ls1 = LayerScale(dim, layer_scale, **dd) if layer_scale is not None else nn.Identity()
        self.drop_path1 = DropPath(drop_path) if drop_path > 0. else nn.Identity()

        self.norm2 = norm_layer(dim, **dd)
        hidden = int(dim * mlp_ratio)
        if moe_kwargs is not None:
            self.mlp = MoE(dim, hidden, act_layer=act_layer, drop=proj_drop, **moe_kwargs, **dd)
        else:
            self.mlp = Mlp(in_features=dim, hidden_features=hidden, act_layer=act_layer, drop=proj_drop, **dd)
        self.ls2 = LayerScale(dim, layer_scale, **dd) if layer_scale is not None else nn.Identity()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0. else nn.Identity()

    @property
    def is_moe(self) -> bool:
        return not isinstance(self.mlp, Mlp)

    def mlp_or_moe(self, x: torch.Tensor, valid_index: Optional[torch.Tensor]) -> torch.Tensor:
        if valid_index is None:
            return self.mlp(x)
        # padding tokens take no expert capacity and no compute
        out = torch.zeros_like(x)
        out[:, valid_index] = self.mlp(x[:, valid_index])
        return out

    def forward(
            self,
            x: torch.Tensor,
            q_global: torch.Tensor,
            layout: WindowLayout,
            key_mask: Optional[torch.Tensor] = None,
            owns_input: bool = False,
    ) -> torch.Tensor:
        """Args:
            x: Stage tokens in window order ``[b, w * n, c]``.
            q_global: ``[b*w, h, n, c/h]`` global queries (used by global blocks).
            layout: The stage's window layout.
            key_mask: ``[b*w, 1, 1, n]`` additive padding mask, or None.
            owns_input: Inference may write the residual stream into ``x`` (the stage's own tensor, no one else's).
        """
        # (under autocast the branches come out in half precision and the fp32 residual cannot take them in place)
        if (not self.training and not torch.is_grad_enabled() and not _autocast_enabled(x.device)
                and kernels.enabled('inplace_residual')):
            return block_inference(self, x, q_global, layout, key_mask, owns_input)
        b, length, c = x.shape[0], x.shape[1], x.shape[2]
        windows = self.norm1(x).view(b * layout.num_windows, layout.tokens_per_window, c)
        attn = self.attn(windows, q_global, layout.window, key_mask).view(b, length, c)
        x = x + self.drop_path1(self.ls1(attn))
        x = x + self.drop_path2(self.ls2(self.mlp_or_moe(self.norm2(x), layout.valid_index)))
        return x


class GlobalContextVitStage(nn.Module):
    """Optional downsample, the global-token tower, then ``depth`` blocks alternating local and global attention."""

    def __init__(  # noqa: PLR0913  (flat keywords, as timm's modules)
            self,
            dim: int,
            depth: int,
            num_heads: int,
            feat_size: Tuple[int, int],
            window_size: Tuple[int, int],
            downsample: bool = True,
            global_norm: bool = False,
            stage_norm: bool = False,
            mlp_ratio: float = 4.,
            qkv_bias: bool = True,
            layer_scale: Optional[float] = None,
            proj_drop: float = 0.,
            attn_drop: float = 0.,
            drop_path: Union[List[float], float] = 0.0,
            act_layer: Callable = nn.GELU,
            norm_layer: Callable = LayerNorm2d,
            norm_layer_cl: Callable = nn.LayerNorm,
            moe_block_indices: Sequence[int] = (),
            moe_kwargs: Optional[dict] = None,
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        if downsample:
            self.downsample = Downsample2d(dim, dim * 2, act_layer=act_layer, norm_layer=norm_layer, **dd)
            dim = dim * 2
            feat_size = (feat_size[0] // 2, feat_size[1] // 2)
        else:
            self.downsample = nn.Identity()
        self.window_size = to_2tuple(window_size)
        self.num_heads = num_heads
        # tower depth from the layout resolution; maps smaller than the window (tiny inputs) get no pooling
        feat_levels = max(0, int(math.log2(max(1, min(feat_size)) / min(self.window_size))))
        self.global_block = FeatureBlock(dim, feat_levels, act_layer=act_layer, **dd)
        self.global_norm = norm_layer_cl(dim, **dd) if global_norm else nn.Identity()

        self.blocks = nn.ModuleList([
            GlobalContextVitBlock(
                dim=dim,
                num_heads=num_heads,
                window_size=self.window_size,
                mlp_ratio=mlp_ratio,
                use_global=(i % 2 != 0),
                qkv_bias=qkv_bias,
                layer_scale=layer_scale,
                proj_drop=proj_drop,
                attn_drop=attn_drop,
                drop_path=drop_path[i] if isinstance(drop_path, (list, tuple)) else drop_path,
                act_layer=act_layer,
                norm_layer=norm_layer_cl,
                moe_kwargs=moe_kwargs if i in moe_block_indices else None,
                **dd,
            )
            for i in range(depth)
        ])
        self.norm = norm_layer_cl(dim, **dd) if stage_norm else nn.Identity()
        self.dim = dim
        self.feat_size = feat_size
        self.grad_checkpointing = False
        self.last_layout: Optional[WindowLayout] = None

    def _global_queries(self, x: torch.Tensor, layout: WindowLayout) -> torch.Tensor:
        """The global tokens as queries ``[b*w, h, n, c/h]``: one per window position, shared by all windows."""
        g = self.global_block(x)
        if not _fx_tracing() and tuple(g.shape[-2:]) != layout.window:
            # off the configured resolution the tower's output need not match the window: resample it
            if g.shape[-2] >= layout.window[0] and g.shape[-1] >= layout.window[1]:
                g = F.adaptive_avg_pool2d(g, layout.window)
            else:
                g = F.interpolate(g, size=layout.window, mode='bilinear', align_corners=False)
        b, c = g.shape[0], g.shape[1]
        g = self.global_norm(g.permute(0, 2, 3, 1))  # [b, wh, ww, c]
        q = g.reshape(b, 1, layout.tokens_per_window, self.num_heads, c // self.num_heads).permute(0, 1, 3, 2, 4)
        q = q.expand(b, layout.num_windows, -1, -1, -1)
        return q.reshape(b * layout.num_windows, self.num_heads, layout.tokens_per_window, c // self.num_heads)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x)
        b = x.shape[0]
        # symbolic tracing (timm's fx feature extraction) lays windows out for the configured size
        feat_size = self.feat_size if _fx_tracing() else tuple(x.shape[-2:])
        layout = WindowLayout(feat_size, self.window_size, None if _fx_tracing() else x.device)
        if not exporting():
            self.last_layout = layout  # for routing_maps(): where each token of the last input sat
        q_global = self._global_queries(x, layout)
        key_mask = layout.window_batch_mask(b)
        x = layout.partition(x)
        for i, blk in enumerate(self.blocks):
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x = checkpoint(blk, x, q_global, layout, key_mask, use_reentrant=False)
            else:
                x = blk(x, q_global, layout, key_mask, owns_input=i > 0)
        x = self.norm(x)
        return layout.reverse(x)


def _channels_last_strides(weight: nn.Parameter) -> None:
    """Give a depthwise or 1x1 conv weight the exact strides of a channels-last tensor, size-1 dimensions included
    (``.contiguous`` leaves those as they are). Every conv after the stem runs on channels-last maps, so its weight
    gradient comes out with these strides, and DDP's gradient buckets, laid out like the parameters, take it without
    a copy. For such a weight the channels-last layout is contiguous too. A full 3x3 conv's (the downsamples'
    reductions) is not, and safetensors, so timm's ``save_for_hf``, refuses non-contiguous tensors: that weight keeps
    the standard layout, and autograd lays its gradient out the same way."""
    out_chs, in_chs, height, width = weight.shape
    if in_chs > 1 and height * width > 1:
        return
    strides = (height * width * in_chs, 1, width * in_chs, in_chs)
    weight.data = torch.empty_strided(weight.shape, strides, dtype=weight.dtype, device=weight.device).copy_(weight)


def _vit_init(module: nn.Module, name: str = '') -> None:
    """timm's ``'vit'`` scheme for GC ViT, extended to stacked experts (see ``GlobalContextVit``'s ``weight_init``)."""
    if isinstance(module, nn.Linear) and not name.endswith('shared_expert_gate'):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.normal_(module.bias, std=1e-6) if 'mlp' in name else nn.init.zeros_(module.bias)
    elif isinstance(module, Experts):
        for weight, bias in ((module.fc1_weight, module.fc1_bias), (module.fc2_weight, module.fc2_bias)):
            for expert_weight in weight.data:
                nn.init.xavier_uniform_(expert_weight)
            if bias is not None:
                nn.init.normal_(bias, std=1e-6)


class GlobalContextVit(nn.Module):
    """GC ViT, dense or with MoE MLPs (GCViMoE).

    Args:
        in_chans: Input image channels.
        num_classes: Classifier outputs (0 for no classifier).
        global_pool: Head pooling type.
        img_size: The resolution the windows are laid out for (other sizes still run).
        window_ratio: Per-stage ``img_size // ratio`` window sizes, used when ``window_size`` is None.
        window_size: Explicit per-stage window sizes.
        embed_dim: Stage-1 width; stages 2-4 double it.
        depths: Blocks per stage.
        num_heads: Attention heads per stage.
        mlp_ratio: MLP hidden width over model width.
        qkv_bias: Bias in the qkv projection.
        layer_scale: LayerScale init value, None for none.
        drop_rate: Dropout before the classifier.
        proj_drop_rate: Dropout after attention projection and in MLPs.
        attn_drop_rate: Attention-probability dropout.
        drop_path_rate: Stochastic depth, rising linearly over blocks.
        norm_eps: LayerNorm epsilon.
        weight_init: ``'normal'``: NVlabs' init, linear weights from a truncated normal of std 0.02, zero biases
            (experts keep ``nn.Linear``'s init). ``'vit'``: the scheme of timm's
            ``GlobalContextVit(weight_init='vit')``, Xavier-uniform linear weights, and each expert initialised as
            such a linear layer; MLP biases ``N(0, 1e-6)``, others zero. Routers keep their own init either way.
        moe: The MoE options (:class:`gcvimoe.moe.MoEConfig` or a dict of them); the default is the GCViMoE recipe
            (:data:`gcvimoe.moe.GCVIMOE`: 8 experts, top-1, dropless evaluation). ``num_experts=0`` builds the dense
            GC ViT. A null ``moe_blocks`` is the Swin-MoE placement; the registered variants fill in their own.
        **moe_options: MoE options as flat keywords (``num_experts=8, top_k=2``), as ``timm.create_model`` passes
            them; they override ``moe``.
    """

    def __init__(  # noqa: PLR0913  (flat keywords, as timm's modules)
            self,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = 'avg',
            img_size: Union[int, Tuple[int, int]] = 224,
            window_ratio: Sequence[int] = (32, 32, 16, 32),
            window_size: Optional[Union[int, Sequence]] = None,
            embed_dim: int = 64,
            depths: Sequence[int] = (3, 4, 19, 5),
            num_heads: Sequence[int] = (2, 4, 8, 16),
            mlp_ratio: float = 3.0,
            qkv_bias: bool = True,
            layer_scale: Optional[float] = None,
            drop_rate: float = 0.,
            proj_drop_rate: float = 0.,
            attn_drop_rate: float = 0.,
            drop_path_rate: float = 0.,
            norm_eps: float = 1e-5,
            weight_init: str = 'normal',
            moe: Union[MoEConfig, dict, None] = None,
            device=None,
            dtype=None,
            **moe_options,
    ):
        super().__init__()
        if weight_init not in ('normal', 'vit'):
            raise ValueError(f"weight_init must be 'normal' or 'vit', got {weight_init!r}")
        dd = dict(device=device, dtype=dtype)
        moe_config = MoEConfig.resolve(moe, **moe_options)
        act_layer = nn.GELU
        norm_layer = partial(LayerNorm2d, eps=norm_eps)
        norm_layer_cl = partial(nn.LayerNorm, eps=norm_eps)
        num_stages = len(depths)
        img_size = to_2tuple(img_size)
        feat_size = (img_size[0] // 4, img_size[1] // 4)
        if window_size is None:
            window_sizes = [(max(1, img_size[0] // r), max(1, img_size[1] // r)) for r in window_ratio]
        else:
            window_sizes = [to_2tuple(w) for w in (window_size if isinstance(window_size, (list, tuple))
                                                   else [window_size] * num_stages)]
        self.in_chans = in_chans
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.drop_rate = drop_rate
        self.img_size = img_size
        self.moe_config = moe_config
        self.num_experts = moe_config.num_experts
        self.num_features = self.head_hidden_size = int(embed_dim * 2 ** (num_stages - 1))
        self.moe_blocks = ([[] for _ in depths] if moe_config.is_dense
                           else resolve_moe_blocks(moe_config.moe_blocks, depths))
        moe_kwargs = None if moe_config.is_dense else {'config': moe_config}

        self.stem = Stem(in_chans, embed_dim, act_layer=act_layer, norm_layer=norm_layer, **dd)
        dpr = calculate_drop_path_rates(drop_path_rate, list(depths), stagewise=True)
        self.feature_info = []
        stages = []
        for i in range(num_stages):
            stage_scale = 2 ** max(i - 1, 0)
            stages.append(GlobalContextVitStage(
                dim=embed_dim * stage_scale,
                depth=depths[i],
                num_heads=num_heads[i],
                feat_size=(feat_size[0] // stage_scale, feat_size[1] // stage_scale),
                window_size=window_sizes[i],
                downsample=i != 0,
                stage_norm=i == num_stages - 1,
                mlp_ratio=mlp_ratio,
                qkv_bias=qkv_bias,
                layer_scale=layer_scale,
                proj_drop=proj_drop_rate,
                attn_drop=attn_drop_rate,
                drop_path=dpr[i],
                act_layer=act_layer,
                norm_layer=norm_layer,
                norm_layer_cl=norm_layer_cl,
                moe_block_indices=self.moe_blocks[i],
                moe_kwargs=moe_kwargs,
                **dd,
            ))
            self.feature_info.append(dict(num_chs=stages[-1].dim, reduction=2 ** (i + 2), module=f'stages.{i}'))
        self.stages = nn.Sequential(*stages)
        self.head = ClassifierHead(self.num_features, num_classes, pool_type=global_pool, drop_rate=drop_rate, **dd)
        if weight_init == 'vit':
            named_apply(_vit_init, self)
        else:
            self.apply(self._init_weights)
        for module in self.modules():
            if isinstance(module, nn.Conv2d) and module is not self.stem.conv1:
                _channels_last_strides(module.weight)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        # NVlabs GC ViT init: truncated normal linear weights, zero biases
        if isinstance(module, nn.Linear):
            trunc_normal_(module.weight, std=.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        return {k for k, _ in self.named_parameters() if 'relative_position_bias_table' in k}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        return dict(stem=r'^stem', blocks=r'^stages\.(\d+)' if coarse else [
            (r'^stages\.(\d+)\.blocks\.(\d+)', None),
            (r'^stages\.(\d+)\.(?:downsample|global_block|global_norm)', (0,)),
            (r'^stages\.(\d+)\.norm', (99999,)),
        ])

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for stage in self.stages:
            stage.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        self.num_classes = num_classes
        if global_pool is None:
            global_pool = self.head.global_pool.pool_type
        self.global_pool = global_pool
        if hasattr(self, 'model_args'):
            self.model_args.update(num_classes=num_classes, global_pool=global_pool)
        device = self.head.fc.weight.device if isinstance(self.head.fc, nn.Linear) else None
        self.head = ClassifierHead(
            self.num_features, num_classes, pool_type=global_pool, drop_rate=self.drop_rate, device=device,
        )
        self.head.train(self.training)

    def moe_report(self):
        """The last forward's MoE outcome: ``report.aux_loss`` (the weighted aux losses summed over every MoE layer,
        differentiable: add it to the task loss), ``report.losses`` and ``report.stats`` per layer, ``report.summary()``
        as floats for logging. See :class:`gcvimoe.moe.MoEReport`.
        """
        from gcvimoe.moe import collect_moe_report
        return collect_moe_report(self)

    @torch.no_grad()
    def routing_maps(self, unrouted: bool = False) -> Dict[str, torch.Tensor]:
        """Each MoE layer's top-1 expert per token in the last forward, as a ``[b, H, W]`` map of the stage's grid;
        with ``unrouted``, whether no expert computed each token instead (dropped for capacity, or chosen by none)."""
        maps = {}
        for stage_index, stage in enumerate(self.stages):
            layout = stage.last_layout
            for block_index, block in enumerate(stage.blocks):
                stats = getattr(block.mlp, 'stats', None)
                if not block.is_moe or stats is None or layout is None:
                    continue
                top1 = stats.unrouted.long() if unrouted else stats.top1_expert
                if layout.valid_index is not None:  # padded windows: padding positions get -1
                    full = top1.new_full((top1.shape[0], layout.num_windows * layout.tokens_per_window), -1)
                    full[:, layout.valid_index] = top1
                    top1 = full
                token_map = layout.reverse(top1.unsqueeze(-1))[:, 0]
                maps[f'stages.{stage_index}.blocks.{block_index}.mlp'] = token_map.bool() if unrouted else token_map
        return maps

    def _check_input(self, x: torch.Tensor) -> None:
        if _fx_tracing():
            return
        if x.ndim != 4 or x.shape[1] != self.in_chans:
            raise GcvimoeError(
                f"input of shape {tuple(x.shape)} does not fit a model built with in_chans={self.in_chans}: "
                f"pass [batch, {self.in_chans}, height, width] images or build the model with "
                f"in_chans={x.shape[1] if x.ndim == 4 else '<channels>'}")

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Features of the chosen stages (NCHW), and the final features unless ``intermediates_only``."""
        if output_fmt != 'NCHW':
            raise ValueError(f"output_fmt {output_fmt!r} is not supported; use 'NCHW'")
        self._check_input(x)
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        intermediates = []
        x = self.stem(x)
        stages = self.stages[:max_index + 1] if stop_early else self.stages
        for i, stage in enumerate(stages):
            x = stage(x)
            if i in take_indices:
                intermediates.append(x)
        if intermediates_only:
            return intermediates
        return x, intermediates

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        return self.stages(self.stem(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head(x, pre_logits=pre_logits) if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def checkpoint_filter_fn(state_dict: Dict[str, torch.Tensor], model: GlobalContextVit) -> Dict[str, torch.Tensor]:
    """Adapts a GC ViT state dict (ours, timm's or NVlabs-converted timm) to ``model``.

    Unwraps ``{'model': ...}``/``{'state_dict': ...}`` containers and resizes relative position bias tables whose
    window differs from the model's (a 224 px checkpoint loaded into a 384 px model, for example).
    """
    for key in ('state_dict', 'model', 'state_dict_ema'):
        if key in state_dict and isinstance(state_dict[key], dict):
            state_dict = state_dict[key]
            break
    target = model.state_dict()
    out = {}
    for k, v in state_dict.items():
        k = k.removeprefix('module.')
        if k.endswith('relative_position_bias_table') and k in target and v.shape != target[k].shape:
            rel_pos = model.get_submodule(k.rsplit('.', 1)[0])
            old = round((math.sqrt(v.shape[0]) + 1) / 2)
            v = resize_rel_pos_bias_table(
                v, new_window_size=rel_pos.window_size, new_bias_shape=tuple(target[k].shape),
                old_window_size=(old, old),
            )
        out[k] = v
    return out


def _create_gcvimoe(variant: str, pretrained: bool = False, **kwargs) -> GlobalContextVit:
    return build_model_with_cfg(
        GlobalContextVit,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=(0, 1, 2, 3), flatten_sequential=True),
        **kwargs,
    )


def _cfg(**kwargs) -> dict:
    return {
        'url': '', 'num_classes': 1000, 'input_size': (3, 224, 224), 'pool_size': (7, 7),
        'crop_pct': 0.875, 'interpolation': 'bicubic', 'fixed_input_size': False,
        'mean': IMAGENET_DEFAULT_MEAN, 'std': IMAGENET_DEFAULT_STD,
        'first_conv': 'stem.conv1', 'classifier': 'head.fc', 'license': 'apache-2.0',
        **kwargs,
    }


# Architecture of each published GC ViT variant (paper Table 1 / NVlabs configs) and our small `pico` and `nano`.
# `pico` is the small-image default of `gcvimoe train`: 8x8-token windows clipped to the feature map, so at 32 px every
# stage attends over its whole map (8x8, 4x4, 2x2, 1x1 tokens) instead of nano's 4x4 windows in stage 1, and four
# stage-3 blocks instead of six. Windows are given in tokens, not as a ratio of the input, so larger inputs keep
# cheap 8x8 windows. Its experts go in every other block of every stage: Swin-MoE's stages 3-4 see 2x2 and 1x1 tokens
# of a 32 px image, 5 of its 85 tokens, while every other block of every stage gives the experts all four maps.
VARIANTS: Dict[str, dict] = {
    'pico': dict(embed_dim=32, depths=(2, 2, 4, 2), num_heads=(1, 2, 4, 8), mlp_ratio=3., img_size=32,
                 window_size=8, weight_init='vit', default_moe_blocks='every 2nd block of stages 1-4'),
    'nano': dict(embed_dim=32, depths=(2, 2, 6, 2), num_heads=(1, 2, 4, 8), mlp_ratio=3., img_size=32,
                 window_ratio=(8, 8, 16, 32)),
    'xxtiny': dict(embed_dim=64, depths=(2, 2, 6, 2), num_heads=(2, 4, 8, 16), mlp_ratio=3.),
    'xtiny': dict(embed_dim=64, depths=(3, 4, 6, 5), num_heads=(2, 4, 8, 16), mlp_ratio=3.),
    'tiny': dict(embed_dim=64, depths=(3, 4, 19, 5), num_heads=(2, 4, 8, 16), mlp_ratio=3.),
    'tiny2': dict(embed_dim=64, depths=(3, 4, 29, 5), num_heads=(2, 4, 8, 16), mlp_ratio=3.),
    'small': dict(embed_dim=96, depths=(3, 4, 19, 5), num_heads=(3, 6, 12, 24), mlp_ratio=2., layer_scale=1e-5),
    'small2': dict(embed_dim=96, depths=(3, 4, 23, 5), num_heads=(3, 6, 12, 24), mlp_ratio=3., layer_scale=1e-5),
    'base': dict(embed_dim=128, depths=(3, 4, 19, 5), num_heads=(4, 8, 16, 32), mlp_ratio=2., layer_scale=1e-5),
    'large': dict(embed_dim=192, depths=(3, 4, 19, 5), num_heads=(6, 12, 24, 48), mlp_ratio=2., layer_scale=1e-5),
}

SMALL_INPUT = ('pico', 'nano')  # single-channel 32 px variants

default_cfgs = generate_default_cfgs({
    f'gcvimoe_{size}': _cfg(input_size=(1 if size in SMALL_INPUT else 3, *to_2tuple(arch.get('img_size', 224))),
                            pool_size=(1, 1) if size in SMALL_INPUT else (7, 7))
    for size, arch in VARIANTS.items()
})


_CONSTRUCTOR_ARGS = frozenset(inspect.signature(GlobalContextVit.__init__).parameters) - {'self', 'device', 'dtype'}


def _variant(size: str, pretrained: bool, **kwargs) -> GlobalContextVit:
    model_args = dict(VARIANTS[size])
    placement = model_args.pop('default_moe_blocks', 'swin')
    if size in SMALL_INPUT:
        model_args.update(in_chans=1)
    model_args.update(kwargs)
    # the MoE options resolved once, with the variant's placement where they leave it null; the model and its saved
    # arguments get this concrete config, so a later default cannot move a saved model's experts
    moe_config = MoEConfig.resolve(model_args.pop('moe', None),
                                   **{k: model_args.pop(k) for k in list(model_args) if k in MOE_FIELDS})
    if moe_config.moe_blocks is None:
        moe_config = moe_config.replace(moe_blocks=placement)
    model = _create_gcvimoe(f'gcvimoe_{size}', pretrained=pretrained, moe=moe_config, **model_args)
    # the registered input size is the variant's default; timm's data helpers read the built model's own
    in_chans, input_size = model_args.get('in_chans', 3), model.pretrained_cfg['input_size']
    img_size = getattr(model, 'img_size', None)  # a features_only wrapper has none, and no data config to serve
    if img_size is not None and (input_size[0] != in_chans or tuple(input_size[1:]) != tuple(img_size)):
        model.pretrained_cfg = model.default_cfg = {**model.pretrained_cfg, 'input_size': (in_chans, *img_size)}
    # what a checkpoint needs to rebuild this model: the name and the arguments that differ from the variant's
    model.model_name = f'gcvimoe_{size}'
    model.model_args = {k: v for k, v in kwargs.items() if k in _CONSTRUCTOR_ARGS and k != 'moe'}
    model.model_args['moe'] = moe_config.to_dict()
    return model


@register_model
def gcvimoe_pico(pretrained: bool = False, **kwargs) -> GlobalContextVit:
    """GCViMoE pico: 32 px single-channel default, widths 32-256, depths 2,2,4,2, 8x8-token windows clipped to the
    map (whole-map attention in every stage at 32 px): the small-image default of ``gcvimoe train``."""
    return _variant('pico', pretrained, **kwargs)


@register_model
def gcvimoe_nano(pretrained: bool = False, **kwargs) -> GlobalContextVit:
    """GCViMoE nano: 32 px single-channel default, widths 32-256, depths 2,2,6,2 (for digits / Fashion-MNIST)."""
    return _variant('nano', pretrained, **kwargs)


@register_model
def gcvimoe_xxtiny(pretrained: bool = False, **kwargs) -> GlobalContextVit:
    return _variant('xxtiny', pretrained, **kwargs)


@register_model
def gcvimoe_xtiny(pretrained: bool = False, **kwargs) -> GlobalContextVit:
    return _variant('xtiny', pretrained, **kwargs)


@register_model
def gcvimoe_tiny(pretrained: bool = False, **kwargs) -> GlobalContextVit:
    return _variant('tiny', pretrained, **kwargs)


@register_model
def gcvimoe_tiny2(pretrained: bool = False, **kwargs) -> GlobalContextVit:
    return _variant('tiny2', pretrained, **kwargs)


@register_model
def gcvimoe_small(pretrained: bool = False, **kwargs) -> GlobalContextVit:
    return _variant('small', pretrained, **kwargs)


@register_model
def gcvimoe_small2(pretrained: bool = False, **kwargs) -> GlobalContextVit:
    return _variant('small2', pretrained, **kwargs)


@register_model
def gcvimoe_base(pretrained: bool = False, **kwargs) -> GlobalContextVit:
    return _variant('base', pretrained, **kwargs)


@register_model
def gcvimoe_large(pretrained: bool = False, **kwargs) -> GlobalContextVit:
    return _variant('large', pretrained, **kwargs)
