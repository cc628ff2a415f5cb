"""Reading model files: the one checkpoint reader of the package, and rebuilding a model from a file alone.

:func:`read_checkpoint` reads every form gcvimoe writes or accepts, and never runs code from a file (safetensors
holds tensors and a string header; ``.pth`` files are read with ``torch.load(weights_only=True)``):

- a training checkpoint (``last.pth``, ``best.pth``): a dict with ``model_name``, ``model_args``, ``state_dict``
  (``ema_state_dict``), ``data_config`` and the training state;
- a ``.safetensors`` export, with the model name and constructor arguments in its header;
- a plain or wrapped state dict (timm ``gcvit_*``, NVlabs: ``model``/``state_dict`` keys).
"""
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional, Union

import torch
import torch.nn as nn
from safetensors import safe_open

from gcvimoe.errors import GcvimoeError

PathLike = Union[str, os.PathLike]
MODEL_KEY = 'gcvimoe.model'
ARGS_KEY = 'gcvimoe.model_args'
_EXPERT_KEY = re.compile(r'^(.*)\.mlp\.experts\.fc1_weight$')
TRAINING_KEYS = ('model_name', 'model_args', 'state_dict', 'data_config')


@dataclass
class Checkpoint:
    """What a model file holds.

    Attributes:
        path: Where it was read from.
        state_dict: The model weights.
        model_name: The registered model name, when the file says (None for a plain state dict).
        model_args: The constructor arguments the file records.
        ema_state_dict: EMA weights of a training checkpoint, if any.
        data_config: The training data's config (size, channels, mean/std, class names), if recorded.
        training: The whole training checkpoint dict (for resuming), None for other forms.
    """
    path: Path
    state_dict: Dict[str, torch.Tensor]
    model_name: Optional[str] = None
    model_args: Dict[str, Any] = field(default_factory=dict)
    ema_state_dict: Optional[Dict[str, torch.Tensor]] = None
    data_config: Optional[Dict[str, Any]] = None
    training: Optional[Dict[str, Any]] = None


def read_checkpoint(path: PathLike) -> Checkpoint:
    """Read any model file on the CPU, with one-line errors for a missing, foreign or damaged file."""
    path = Path(path)
    if not path.is_file():
        what = "is a folder" if path.is_dir() else "not found"
        raise GcvimoeError(f"checkpoint {path} {what}; pass the path of a .pth or .safetensors file")
    if path.suffix == '.safetensors':
        return _read_safetensors(path)
    try:
        obj = torch.load(str(path), map_location='cpu', weights_only=True)
    except Exception as e:  # torch raises many types for a damaged or foreign file
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if 'weights_only' in reason or 'Unpickler' in reason:
            reason = 'it holds objects other than tensors and plain data'
        raise GcvimoeError(f"cannot read checkpoint {str(path)!r} ({reason[:160]}); pass a file written by gcvimoe "
                           f"or a plain state dict") from None
    if not isinstance(obj, dict):
        raise GcvimoeError(f"checkpoint {str(path)!r} holds a {type(obj).__name__}, not a state dict")
    if all(key in obj for key in TRAINING_KEYS):
        return Checkpoint(path, _strip_prefixes(obj['state_dict']), obj['model_name'], dict(obj['model_args'] or {}),
                          obj.get('ema_state_dict'), obj['data_config'], training=obj)
    for key in ('state_dict', 'model'):
        if isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    return Checkpoint(path, _strip_prefixes(obj))


def _read_safetensors(path: Path) -> Checkpoint:
    try:
        with safe_open(str(path), framework='pt') as f:
            meta = f.metadata() or {}
            state_dict = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for bad headers
        raise GcvimoeError(f"checkpoint {str(path)!r} is not a readable safetensors file ({e}); re-export it with "
                           f"`gcvimoe convert export`") from None
    if MODEL_KEY not in meta:
        return Checkpoint(path, state_dict)
    return Checkpoint(path, state_dict, meta[MODEL_KEY], json.loads(meta.get(ARGS_KEY, '{}')))


def _strip_prefixes(state_dict: Dict[str, Any]) -> Dict[str, torch.Tensor]:
    """Keys without DDP's ``module.`` or torch.compile's ``_orig_mod.`` prefix; non-tensor entries dropped."""
    return {k.removeprefix('module.').removeprefix('_orig_mod.'): v for k, v in state_dict.items()
            if isinstance(v, torch.Tensor)}


def build_model(model_name: str, model_args: Dict[str, Any]) -> nn.Module:
    """Build a registered gcvimoe model from its name and constructor arguments, with one-line errors."""
    from gcvimoe.models.factory import create_model
    try:
        return create_model(model_name, **model_args)
    except GcvimoeError:
        raise
    except (TypeError, ValueError) as e:
        raise GcvimoeError(f"cannot build {model_name} with {model_args} ({e}); check img_size, model_kwargs and "
                           "the MoE options") from None


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


def model_from_checkpoint(checkpoint: Union[Checkpoint, PathLike], use_ema: bool = False, **overrides) -> nn.Module:
    """Rebuild the model a file was saved from (name and arguments from the file), with its weights, in eval mode.

    Args:
        checkpoint: A :class:`Checkpoint` or the path of a training checkpoint or ``.safetensors`` export.
        use_ema: Load the EMA weights of a training checkpoint.
        **overrides: Constructor arguments to change (e.g. ``eval_capacity_factor``); shape-changing ones fail clearly.
    """
    if not isinstance(checkpoint, Checkpoint):
        checkpoint = read_checkpoint(checkpoint)
    source = f"checkpoint {str(checkpoint.path)!r}"
    if checkpoint.model_name is None:
        raise GcvimoeError(f"{source} does not say which model it holds (a plain state dict); build the model with "
                           f"gcvimoe.create_model(...) and load it with gcvimoe.models.load_weights")
    state_dict = checkpoint.state_dict
    if use_ema:
        if checkpoint.ema_state_dict is None:
            raise GcvimoeError(f"{source} holds no EMA weights (trained without ema); drop --use-ema")
        state_dict, source = checkpoint.ema_state_dict, f"{source} (EMA weights)"
    model = build_model(checkpoint.model_name, {**checkpoint.model_args, **overrides})
    load_weights(model, state_dict, source=source)
    return model.eval()


def create_model_from_checkpoint(path: PathLike, **overrides) -> nn.Module:
    """Rebuild the model a training checkpoint or ``.safetensors`` export was saved from, with its weights.

    Args:
        path: A ``.safetensors`` export or a training checkpoint.
        **overrides: Constructor arguments to change (e.g. ``eval_capacity_factor``); shape-changing ones fail clearly.
    """
    return model_from_checkpoint(read_checkpoint(path), **overrides)
