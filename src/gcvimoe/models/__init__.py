"""GC ViT / GCViMoE model family, registered in timm's registry as ``gcvimoe_<size>``; model files; counting."""
from gcvimoe.models.checkpoint import (
    Checkpoint, build_model, create_model_from_checkpoint, experts_per_layer, load_weights, model_from_checkpoint,
    read_checkpoint)
from gcvimoe.models.export import load_initial_weights, save_model, upcycle, upcycle_into
from gcvimoe.models.factory import create_model, list_models
from gcvimoe.models.gcvit import GlobalContextVit, checkpoint_filter_fn
from gcvimoe.models.variants import VARIANTS, variant_of
from gcvimoe.models.placement import resolve_moe_blocks

__all__ = [
    'GlobalContextVit', 'VARIANTS', 'variant_of', 'checkpoint_filter_fn', 'create_model', 'list_models',
    'resolve_moe_blocks',
    'Checkpoint', 'read_checkpoint', 'experts_per_layer', 'build_model', 'load_weights', 'model_from_checkpoint',
    'create_model_from_checkpoint', 'save_model', 'upcycle', 'upcycle_into', 'load_initial_weights',
]
