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

The model reads bottom-up across modules, as timm's file does within one: :mod:`~gcvimoe.models.layers` (stem,
downsample, global-token tower), :mod:`~gcvimoe.models.windows` (window layout), :mod:`~gcvimoe.models.attention`,
:mod:`~gcvimoe.models.blocks` (block and stage), this module (the model, its weight init and checkpoint filter) and
:mod:`~gcvimoe.models.variants` (the ``gcvimoe_*`` variants in timm's registry).
"""
import math
from functools import partial
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import (
    ClassifierHead, LayerNorm2d, calculate_drop_path_rates, resize_rel_pos_bias_table, to_2tuple, trunc_normal_,
)
from timm.models import build_model_with_cfg, named_apply
from timm.models._features import feature_take_indices

from gcvimoe.errors import GcvimoeError
from gcvimoe.models.blocks import GlobalContextVitStage
from gcvimoe.models.layers import Stem
from gcvimoe.models.placement import resolve_moe_blocks
from gcvimoe.moe import Experts, MoEConfig
from gcvimoe.tracing import fx_tracing

__all__ = ['GlobalContextVit', 'checkpoint_filter_fn', 'create_gcvimoe', 'base_cfg']


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
    def compile_blocks(self, **compile_options) -> None:
        """Regional compilation: ``torch.compile`` each block in place (one graph per block shape, compiled once and
        reused by the blocks like it) instead of the whole model, for a fraction of the cold-start compile time."""
        for stage in self.stages:
            for block in stage.blocks:
                block.compile(**{'fullgraph': True, **compile_options})

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
        if fx_tracing():
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


def create_gcvimoe(variant: str, pretrained: bool = False, **kwargs) -> GlobalContextVit:
    """timm's builder for a registered ``variant``: its pretrained cfg, the checkpoint filter, ``features_only``."""
    return build_model_with_cfg(
        GlobalContextVit,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=(0, 1, 2, 3), flatten_sequential=True),
        **kwargs,
    )


def base_cfg(**kwargs) -> dict:
    """The pretrained cfg every variant shares (ImageNet preprocessing), ``kwargs`` overriding it."""
    return {
        'url': '', 'num_classes': 1000, 'input_size': (3, 224, 224), 'pool_size': (7, 7),
        'crop_pct': 0.875, 'interpolation': 'bicubic', 'fixed_input_size': False,
        'mean': IMAGENET_DEFAULT_MEAN, 'std': IMAGENET_DEFAULT_STD,
        'first_conv': 'stem.conv1', 'classifier': 'head.fc', 'license': 'apache-2.0',
        **kwargs,
    }
