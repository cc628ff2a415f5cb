"""Model weights on disk: safetensors with the constructor arguments beside them, strict loading with clear errors,
and sparse upcycling of dense GC ViT weights into a GCViMoE.

Loading never runs code from a file: ``.safetensors`` holds tensors and a string header, and ``.pth`` files are read
with ``torch.load(weights_only=True)``.
"""
import json
import os
import re
from pathlib import Path
from typing import Dict, Optional, Tuple, Union

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file

from gcvimoe.errors import GcvimoeError

PathLike = Union[str, os.PathLike]
_MODEL_KEY = 'gcvimoe.model'
_ARGS_KEY = 'gcvimoe.model_args'
_EXPERT_KEY = re.compile(r'^(.*)\.mlp\.experts\.fc1_weight$')


def read_state_dict(path: PathLike) -> Tuple[Dict[str, torch.Tensor], Dict[str, object]]:
    """Weights and what the file says about the model (``model``, ``model_args``; empty for a plain state dict).

    Accepts our ``.safetensors`` exports, training checkpoints (``last.pth``: a dict with ``state_dict``,
    ``model_name``, ``model_args``), and plain or wrapped state dicts (timm, NVlabs: ``model``/``state_dict`` keys).
    """
    path = Path(path)
    if not path.is_file():
        raise GcvimoeError(f"checkpoint {str(path)!r} does not exist; pass the path of a .pth or .safetensors file")
    if path.suffix == '.safetensors':
        try:
            with safe_open(str(path), framework='pt') as f:
                meta = f.metadata() or {}
                state_dict = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:  # safetensors raises its own error types for bad headers
            raise GcvimoeError(f"checkpoint {str(path)!r} is not a readable safetensors file ({e}); "
                               f"re-export it with `gcvimoe convert export`") from None
        info = {}
        if _MODEL_KEY in meta:
            info['model'] = meta[_MODEL_KEY]
            info['model_args'] = json.loads(meta.get(_ARGS_KEY, '{}'))
        return state_dict, info
    try:
        obj = torch.load(str(path), map_location='cpu', weights_only=True)
    except Exception as e:
        raise GcvimoeError(f"checkpoint {str(path)!r} cannot be read as weights only ({type(e).__name__}: "
                           f"{str(e).splitlines()[0][:200]}); gcvimoe loads tensors and plain data only") from None
    if not isinstance(obj, dict):
        raise GcvimoeError(f"checkpoint {str(path)!r} holds a {type(obj).__name__}, not a state dict")
    info = {}
    if 'model_name' in obj:
        info = {'model': obj['model_name'], 'model_args': dict(obj.get('model_args') or {})}
    for key in ('state_dict', 'model'):
        if isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    state_dict = {k.removeprefix('module.').removeprefix('_orig_mod.'): v for k, v in obj.items()
                  if isinstance(v, torch.Tensor)}
    return state_dict, info


def save_model(model: nn.Module, path: PathLike) -> Path:
    """Writes ``model``'s weights to ``path`` (.safetensors) with its name and constructor arguments in the header.

    The file is written next to its destination and moved into place, so an existing file is never half-replaced.
    """
    path = Path(path)
    name = getattr(model, 'model_name', None) or model.pretrained_cfg.get('architecture')
    args = getattr(model, 'model_args', {})
    meta = {_MODEL_KEY: str(name), _ARGS_KEY: json.dumps(args, sort_keys=True)}
    state_dict = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + '.tmp')
    save_file(state_dict, str(tmp), metadata=meta)
    os.replace(tmp, path)
    return path


def _experts_per_layer(state_dict: Dict[str, torch.Tensor]) -> Dict[str, int]:
    return {m.group(1): v.shape[0] for k, v in state_dict.items() if (m := _EXPERT_KEY.match(k))}


def load_weights(model: nn.Module, state_dict: Dict[str, torch.Tensor], source: str = 'checkpoint') -> None:
    """Strict load that explains a mismatch in one line: expert count, MoE placement, variant or classes."""
    from gcvimoe.models.gcvit import checkpoint_filter_fn

    state_dict = checkpoint_filter_fn(state_dict, model)
    target = model.state_dict()
    have, want = _experts_per_layer(state_dict), _experts_per_layer(target)
    if set(have) != set(want):
        raise GcvimoeError(
            f"{source} has MoE layers at {sorted(have) or 'none'} but the model at {sorted(want) or 'none'}; build "
            f"the model with the checkpoint's moe_blocks/num_experts (or upcycle dense weights with "
            f"`gcvimoe convert upcycle`)")
    for layer, count in have.items():
        if want[layer] != count:
            raise GcvimoeError(f"{source} has {count} experts per MoE layer ({layer}) but the model has {want[layer]};"
                               f" build the model with num_experts={count}")
    missing = [k for k in target if k not in state_dict]
    unexpected = [k for k in state_dict if k not in target]
    wrong = [k for k in target if k in state_dict and state_dict[k].shape != target[k].shape]
    if missing or unexpected or wrong:
        head_keys = {'head.fc.weight', 'head.fc.bias'}
        if set(wrong) <= head_keys and not missing and not unexpected:
            raise GcvimoeError(
                f"{source} has {state_dict['head.fc.weight'].shape[0]} classes but the model has "
                f"{target['head.fc.weight'].shape[0]}; build it with num_classes="
                f"{state_dict['head.fc.weight'].shape[0]} or drop the head weights to fine-tune")
        detail = '; '.join(part for part in (
            f"missing {len(missing)} keys (e.g. {missing[0]})" if missing else '',
            f"{len(unexpected)} unexpected keys (e.g. {unexpected[0]})" if unexpected else '',
            f"{len(wrong)} shape mismatches (e.g. {wrong[0]}: {tuple(state_dict[wrong[0]].shape)} in the file vs "
            f"{tuple(target[wrong[0]].shape)} in the model)" if wrong else '',
        ) if part)
        raise GcvimoeError(f"{source} does not fit {getattr(model, 'model_name', type(model).__name__)}: {detail}; "
                           f"it was saved from another variant or configuration")
    model.load_state_dict(state_dict, strict=True)


def create_model_from_checkpoint(path: PathLike, **overrides) -> nn.Module:
    """Rebuilds the model a checkpoint was saved from (name and arguments from the file) and loads its weights.

    Args:
        path: A ``.safetensors`` export or a training checkpoint.
        **overrides: Constructor arguments to change (e.g. ``eval_capacity_factor``); shape-changing ones fail clearly.
    """
    from gcvimoe.models.factory import create_model

    state_dict, info = read_state_dict(path)
    if 'model' not in info:
        raise GcvimoeError(f"checkpoint {str(path)!r} does not say which model it holds (a plain state dict); build "
                           f"the model with gcvimoe.create_model(...) and load it with load_weights")
    model = create_model(info['model'], **{**info['model_args'], **overrides})
    load_weights(model, state_dict, source=f"checkpoint {str(path)!r}")
    return model


def upcycle(
        model_name: str,
        dense_state_dict: Dict[str, torch.Tensor],
        noise_std: float = 0.0,
        seed: int = 0,
        **model_args,
) -> nn.Module:
    """Sparse upcycling (Komatsuzaki et al., 2023): a GCViMoE whose experts all start as the dense MLP they replace.

    Args:
        model_name: The variant, e.g. ``gcvimoe_tiny``.
        dense_state_dict: Weights of the dense model (ours or timm's ``gcvit_*`` layout).
        noise_std: Gaussian noise added to each expert copy to break their symmetry (0 keeps them identical).
        seed: Seed for the router's fresh initialisation and the noise.
        **model_args: Constructor arguments of the MoE model (``num_experts``, ``top_k``, ``moe_blocks``, ...).
    """
    from gcvimoe.models.factory import create_model
    from gcvimoe.moe import moe_layers

    dense_args = dict(model_args, num_experts=0)
    dense = create_model(model_name, **dense_args)
    load_weights(dense, dense_state_dict, source='dense checkpoint')
    torch.manual_seed(seed)
    model = create_model(model_name, **model_args)
    layers = dict(moe_layers(model))
    if not layers:
        raise GcvimoeError("upcycling needs num_experts > 0 and at least one MoE block; set --num-experts")
    # everything outside the MoE layers is copied as is; each MoE layer gets the dense MLP it replaces
    rest = {k: v for k, v in dense.state_dict().items() if not any(k.startswith(name + '.') for name in layers)}
    missing, unexpected = model.load_state_dict(rest, strict=False)
    assert not unexpected and all(any(k.startswith(name + '.') for name in layers) for k in missing)
    for name, layer in layers.items():
        layer.load_from_mlp(dense.get_submodule(name), noise_std=noise_std)
    return model
