"""Window attention: the learned relative position bias and multi-head attention within windows, its queries local or
taken from the stage's global tokens."""
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from timm.layers import to_2tuple, trunc_normal_

from gcvimoe import kernels
from gcvimoe.kernels.attention import biased_attention
from gcvimoe.tracing import exporting, fx_tracing

__all__ = ['RelativePositionBias', 'WindowAttentionGlobal', 'autocast_enabled']


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


def autocast_enabled(device: torch.device) -> bool:
    """Whether autocast is on for ``device``; False in shape-only runs (MAC counting), which have no backend to ask."""
    if fx_tracing() or device.type == 'meta':
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

    def forward(self, x: torch.Tensor, q_global: torch.Tensor, window: Tuple[int, int],
                key_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Attention within windows, then the output projection; arguments as for :meth:`attend`."""
        return self.proj_drop(self.proj(self.attend(x, q_global, window, key_mask)))

    def _use_attention_kernel(self, x: torch.Tensor) -> bool:
        """CPU training without attention dropout, autocast or compilation (see :mod:`gcvimoe.kernels.attention`)."""
        return (kernels.enabled('attention') and not fx_tracing() and torch.is_grad_enabled() and x.device.type == 'cpu'
                and (self.attn_drop == 0 or not self.training) and not autocast_enabled(x.device)
                and not torch.compiler.is_compiling())

    def attend(self, x: torch.Tensor, q_global: torch.Tensor, window: Tuple[int, int],
               key_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
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
