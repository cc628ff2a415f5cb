"""Build gcvimoe models by name, remembering the arguments so a checkpoint can rebuild the model on its own."""
from typing import List

import timm
import torch.nn as nn

from gcvimoe.errors import GcvimoeError, did_you_mean


def list_models() -> List[str]:
    """Names of the registered gcvimoe models (``gcvimoe_nano`` ... ``gcvimoe_large``)."""
    import gcvimoe.models.variants  # noqa: F401  (registers the models)
    return timm.list_models('gcvimoe_*')


def create_model(model_name: str, **kwargs) -> nn.Module:
    """``timm.create_model`` for a gcvimoe model, with a clear error for an unknown name.

    The model records ``model.model_name`` and ``model.model_args`` (the arguments given here, minus timm's
    loading options), which checkpoints store so that the model can be rebuilt from the file alone.

    Args:
        model_name: A registered name, e.g. ``gcvimoe_tiny``.
        **kwargs: Constructor arguments (``num_classes``, ``img_size``, ``num_experts``, ``top_k``, ...).

    Raises:
        GcvimoeError: the name is not a gcvimoe model (the nearest names are suggested).
    """
    names = list_models()
    if model_name not in names:
        hint = did_you_mean(model_name, names, fallback=f"choose one of {', '.join(names)}")
        raise GcvimoeError(f"unknown model {model_name!r}: {hint}")
    return timm.create_model(model_name, **kwargs)
