"""GC ViT's transformer block (window attention, then a dense or MoE MLP) and the stage that runs its blocks."""
import math
from typing import Callable, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from timm.layers import DropPath, LayerNorm2d, LayerScale, Mlp, to_2tuple

from gcvimoe import kernels
from gcvimoe.kernels.residual import block_inference
from gcvimoe.models.attention import WindowAttentionGlobal, autocast_enabled
from gcvimoe.models.layers import Downsample2d, FeatureBlock
from gcvimoe.models.windows import WindowLayout
from gcvimoe.moe import MoE
from gcvimoe.tracing import exporting, fx_tracing

__all__ = ['GlobalContextVitBlock', 'GlobalContextVitStage']


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
        if (not self.training and not torch.is_grad_enabled() and not autocast_enabled(x.device)
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
        if not fx_tracing() and tuple(g.shape[-2:]) != layout.window:
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
        feat_size = self.feat_size if fx_tracing() else tuple(x.shape[-2:])
        layout = WindowLayout(feat_size, self.window_size, None if fx_tracing() else x.device)
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
