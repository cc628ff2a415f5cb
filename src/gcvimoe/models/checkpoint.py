"""Reading model files: the one checkpoint reader of the package, and rebuilding a model from a file alone.

:func:`read_checkpoint` reads every form gcvimoe writes or accepts, and never runs code from a file (safetensors
holds tensors and a string header; ``.pth`` files are read with ``torch.load(weights_only=True)``):

- a training checkpoint (``last.pth``, ``best.pth``): a dict with ``model_name``, ``model_args``, ``state_dict``
  (``ema_state_dict``), ``data_config`` and the training state;
- a sharded training checkpoint folder (``last/``, ``best/`` of an expert-parallel run), read whole
  (:mod:`gcvimoe.models.sharded`);
- a model folder in the Hugging Face / timm layout (``config.json`` and ``model.safetensors``), which
  ``timm.create_model('local-dir:DIR', pretrained=True)`` also loads; ``local-dir:DIR`` and ``hf-hub:NAME`` (from the
  local Hugging Face cache only) name one too;
- a ``.safetensors`` export, with the model name, constructor arguments and preprocessing in its header;
- a plain or wrapped state dict (timm ``gcvit_*``, NVlabs: ``model``/``state_dict`` keys).
"""
import json
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional, Union

import torch
import torch.nn as nn
from safetensors import safe_open

from gcvimoe.errors import GcvimoeError, first_line
from gcvimoe.models.sharded import is_sharded_checkpoint, read_sharded_checkpoint

PathLike = Union[str, os.PathLike]
MODEL_KEY = 'gcvimoe.model'
ARGS_KEY = 'gcvimoe.model_args'
DATA_KEY = 'gcvimoe.data_config'
CONFIG_FILE, WEIGHTS_FILE = 'config.json', 'model.safetensors'
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
    """Read any model file or folder on the CPU, with one-line errors for a missing, foreign or damaged one."""
    text = str(path)
    if text.startswith('hf-hub:'):
        path = _hub_folder(text.removeprefix('hf-hub:'))
    else:
        path = Path(text.removeprefix('local-dir:'))
    if is_sharded_checkpoint(path):
        obj = read_sharded_checkpoint(path)
        return Checkpoint(path, obj['state_dict'], obj['model_name'], dict(obj['model_args'] or {}),
                          obj.get('ema_state_dict'), obj.get('data_config'), training=obj)
    if path.is_dir():
        return _read_model_folder(path)
    if not path.is_file():
        raise GcvimoeError(f"checkpoint {path} not found; pass a .pth or .safetensors file or a model folder")
    if path.suffix == '.safetensors':
        return _read_safetensors(path)
    try:
        with warnings.catch_warnings():  # torch's warnings about a foreign pickle would only precede the one line
            warnings.simplefilter('ignore')
            obj = torch.load(str(path), map_location='cpu', weights_only=True)
    except Exception as e:  # torch raises many types for a damaged or foreign file
        reason = _load_failure(e)
        raise GcvimoeError(f"cannot read checkpoint {str(path)!r} ({reason}); pass a file written by gcvimoe "
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


_ANSI_COLOURS = re.compile(r'\x1b\[[0-9;]*m')


def _load_failure(e: Exception) -> str:
    """Why ``torch.load`` failed, in a few words. Its advice to load with ``weights_only=False`` (which runs code from
    the file) is never passed on."""
    text = _ANSI_COLOURS.sub('', str(e)).strip()
    foreign = re.search(r'Unsupported global: GLOBAL (\S+)', text)
    if foreign:
        return f'it holds objects other than tensors and plain data ({foreign.group(1)})'
    if re.search(r'weights.only|unpickl', text, re.IGNORECASE) or len(text.split()) < 3:  # or a bare key or byte
        return 'not a PyTorch checkpoint, or a damaged one'
    return _ANSI_COLOURS.sub('', first_line(e)).split('. ')[0][:160]  # torch adds advice after the first sentence


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
    data_config = json.loads(meta[DATA_KEY]) if DATA_KEY in meta else None
    return Checkpoint(path, state_dict, meta[MODEL_KEY], json.loads(meta.get(ARGS_KEY, '{}')), data_config=data_config)


def _hub_folder(name: str) -> Path:
    """The local copy of a Hugging Face Hub model: this package never downloads."""
    try:
        from huggingface_hub import snapshot_download
        return Path(snapshot_download(name, local_files_only=True))
    except ImportError:
        raise GcvimoeError("hf-hub: names need huggingface_hub: pip install huggingface_hub") from None
    except Exception:  # the hub client raises several types for a model missing from the cache
        raise GcvimoeError(f"hf-hub:{name} is not in the local Hugging Face cache and gcvimoe does not download; "
                           f"fetch it with `huggingface-cli download {name}` or pass a local folder") from None


def _read_model_folder(folder: Path) -> Checkpoint:
    """A model folder: ``config.json`` (timm's layout) and ``model.safetensors``."""
    config_path, weights = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    if not config_path.is_file() or not weights.is_file():
        raise GcvimoeError(f"{folder} is a folder without {CONFIG_FILE} and {WEIGHTS_FILE}; pass a model folder "
                           f"(RUN/model, or one written by `gcvimoe convert export`) or a checkpoint file")
    try:
        config = json.loads(config_path.read_text())
        name, args, pretrained = config['architecture'], dict(config.get('model_args', {})), config['pretrained_cfg']
    except (ValueError, KeyError, TypeError) as e:
        raise GcvimoeError(f"{config_path} is not a timm model config ({type(e).__name__}: {e}); re-export the "
                           f"model with `gcvimoe convert export`") from None
    args.pop('global_pool', None)
    checkpoint = _read_safetensors(weights)
    return Checkpoint(folder, checkpoint.state_dict, name, args,
                      data_config=_data_config(config, pretrained, args))


def _data_config(config: Dict[str, Any], pretrained: Dict[str, Any], args: Dict[str, Any]) -> Dict[str, Any]:
    """The training preprocessing and class names, from a timm ``pretrained_cfg`` and gcvimoe's own record."""
    num_classes = config.get('num_classes', pretrained.get('num_classes'))
    names = config.get('label_names') or pretrained.get('label_names')
    in_chans, height = pretrained['input_size'][0], pretrained['input_size'][1]
    recorded = config.get('gcvimoe', {}).get('data_config', {})
    return {
        'dataset': recorded.get('dataset', ''), 'data_dir': recorded.get('data_dir', ''),
        'data_dir_as_typed': recorded.get('data_dir_as_typed', ''), 'img_size': height,
        'in_chans': args.get('in_chans', in_chans), 'mean': list(pretrained['mean']), 'std': list(pretrained['std']),
        'interpolation': pretrained.get('interpolation', 'bicubic'), 'crop_pct': pretrained.get('crop_pct', 1.0),
        'class_names': list(names) if names else [str(i) for i in range(num_classes)],
    }


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


def experts_per_layer(state_dict: Dict[str, torch.Tensor]) -> Dict[str, int]:
    return {m.group(1): v.shape[0] for k, v in state_dict.items() if (m := _EXPERT_KEY.match(k))}


def load_weights(model: nn.Module, state_dict: Dict[str, torch.Tensor], source: str = 'checkpoint') -> None:
    """Strict load that explains a mismatch in one line: expert count, MoE placement, variant or classes."""
    from gcvimoe.models.gcvit import checkpoint_filter_fn

    state_dict = checkpoint_filter_fn(state_dict, model)
    target = model.state_dict()
    have, want = experts_per_layer(state_dict), experts_per_layer(target)
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


def args_from_state_dict(state_dict: Dict[str, torch.Tensor]) -> Dict[str, Any]:
    """Constructor arguments a plain state dict implies: classes, input channels and experts per MoE layer."""
    args: Dict[str, Any] = {}
    if 'head.fc.weight' in state_dict:
        args['num_classes'] = state_dict['head.fc.weight'].shape[0]
    if 'stem.conv1.weight' in state_dict:
        args['in_chans'] = state_dict['stem.conv1.weight'].shape[1]
    experts = set(experts_per_layer(state_dict).values())
    args['num_experts'] = experts.pop() if len(experts) == 1 else 0
    return args


def model_from_checkpoint(
        checkpoint: Union[Checkpoint, PathLike],
        use_ema: bool = False,
        model_name: Optional[str] = None,
        **overrides,
) -> nn.Module:
    """Rebuild the model a file was saved from (name and arguments from the file), with its weights, in eval mode.

    Args:
        checkpoint: A :class:`Checkpoint`, or any form :func:`read_checkpoint` reads.
        use_ema: Load the EMA weights of a training checkpoint.
        model_name: The model to build for a plain state dict (a timm ``gcvit_*`` file into ``gcvimoe_*``, for
            instance); its classes, channels and experts follow the file.
        **overrides: Constructor arguments to change (e.g. ``eval_capacity_factor``); shape-changing ones fail clearly.
    """
    if not isinstance(checkpoint, Checkpoint):
        checkpoint = read_checkpoint(checkpoint)
    source = f"checkpoint {str(checkpoint.path)!r}"
    name, args = checkpoint.model_name, checkpoint.model_args
    if name is None:
        if model_name is None:
            raise GcvimoeError(f"{source} does not say which model it holds (a plain state dict); name it with "
                               f"--model (e.g. gcvimoe_tiny), or in Python pass model_name=...")
        name, args = model_name, args_from_state_dict(checkpoint.state_dict)
    state_dict = checkpoint.state_dict
    if use_ema:
        if checkpoint.ema_state_dict is None:
            raise GcvimoeError(f"{source} holds no EMA weights (trained without ema); drop --use-ema")
        state_dict, source = checkpoint.ema_state_dict, f"{source} (EMA weights)"
    model = build_model(name, {**args, **overrides})
    load_weights(model, state_dict, source=source)
    return model.eval()


def create_model_from_checkpoint(path: PathLike, **overrides) -> nn.Module:
    """Rebuild the model a training checkpoint, ``.safetensors`` export or model folder holds, with its weights.

    Args:
        path: A training checkpoint, a ``.safetensors`` export, a model folder, ``local-dir:DIR`` or
            ``hf-hub:NAME`` (local cache only).
        **overrides: Constructor arguments to change (e.g. ``eval_capacity_factor``); shape-changing ones fail clearly.
    """
    return model_from_checkpoint(read_checkpoint(path), **overrides)
