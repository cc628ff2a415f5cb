"""The GC ViT / GCViMoE variants (``gcvimoe_pico`` ... ``gcvimoe_large``) and their timm registration."""
import inspect
import re
from typing import Dict, Optional

import torch
from timm.layers import to_2tuple
from timm.models import generate_default_cfgs, register_model

from gcvimoe.models.gcvit import GlobalContextVit, base_cfg, create_gcvimoe
from gcvimoe.moe import MoEConfig
from gcvimoe.moe.config import FIELDS as MOE_FIELDS

__all__ = ['VARIANTS', 'variant_of']


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
    f'gcvimoe_{size}': base_cfg(input_size=(1 if size in SMALL_INPUT else 3, *to_2tuple(arch.get('img_size', 224))),
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
    model = create_gcvimoe(f'gcvimoe_{size}', pretrained=pretrained, moe=moe_config, **model_args)
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


def variant_of(state_dict: Dict[str, torch.Tensor]) -> Optional[str]:
    """The registered variant whose widths and depths a GC ViT state dict (ours or timm's ``gcvit_*``) has, or None.

    Each variant has its own stem width and blocks per stage, so these two tell them apart; the window size and
    input size are not needed, since the loader resizes position bias tables.
    """
    stem = state_dict.get('stem.conv1.weight')
    if stem is None:
        return None
    blocks: Dict[int, set] = {}
    for key in state_dict:
        if (match := re.match(r'stages\.(\d+)\.blocks\.(\d+)\.', key)):
            blocks.setdefault(int(match.group(1)), set()).add(int(match.group(2)))
    depths = tuple(len(blocks[stage]) for stage in sorted(blocks))
    return next((f'gcvimoe_{size}' for size, arch in VARIANTS.items()
                 if arch['embed_dim'] == stem.shape[0] and tuple(arch['depths']) == depths), None)
