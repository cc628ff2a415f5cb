"""GC ViT / GCViMoE model family, registered in timm's registry as ``gcvimoe_<size>``."""
from gcvimoe.models.factory import create_model, list_models
from gcvimoe.models.gcvit import VARIANTS, GlobalContextVit, checkpoint_filter_fn
from gcvimoe.models.placement import resolve_moe_blocks

__all__ = ['GlobalContextVit', 'VARIANTS', 'checkpoint_filter_fn', 'create_model', 'list_models', 'resolve_moe_blocks']
