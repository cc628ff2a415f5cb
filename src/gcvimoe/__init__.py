"""gcvimoe: GC ViT vision transformers whose MLP blocks are sparse Mixture-of-Experts.

Importing the package registers ``gcvimoe_<size>`` models in timm's registry.
"""
__version__ = "0.1.0"

from gcvimoe.models import create_model, list_models  # registers the models in timm
from gcvimoe.models import create_model_from_checkpoint

__all__ = ['create_model', 'create_model_from_checkpoint', 'list_models', '__version__']
