"""Writing models: model folders timm loads, safetensors files, ONNX graphs, and sparse upcycling."""
import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import torch
import torch.nn as nn
from safetensors.torch import save_file
from timm.models import adapt_input_conv
from timm.models._hub import save_config_for_hf

from gcvimoe.errors import GcvimoeError
from gcvimoe.files import atomic_dir, atomic_path
from gcvimoe.models.checkpoint import (
    ARGS_KEY, CONFIG_FILE, DATA_KEY, MODEL_KEY, WEIGHTS_FILE, Checkpoint, PathLike, build_model, experts_per_layer,
    load_weights, read_checkpoint)
from gcvimoe.moe import moe_layers

def save_model(model: nn.Module, path: PathLike, data_config: Optional[Dict[str, Any]] = None) -> Path:
    """Write ``model`` so that it rebuilds alone, atomically.

    Args:
        model: A gcvimoe model.
        path: A ``.safetensors`` file (the model name, constructor arguments and preprocessing in its header), or
            any other path for a model folder in the Hugging Face / timm layout: ``config.json`` written by timm's
            own writer, with the constructor arguments under ``model_args`` and the preprocessing and label names in
            ``pretrained_cfg``, and ``model.safetensors``. ``timm.create_model('local-dir:PATH', pretrained=True)``
            loads the folder after ``import gcvimoe``.
        data_config: The training preprocessing (``DataConfig.to_dict()``: size, mean, std, crop, interpolation,
            class names); None keeps the model's ``pretrained_cfg``.
    """
    path = Path(path)
    state_dict = model.state_dict()
    if path.suffix == '.safetensors':
        meta = {MODEL_KEY: str(model.model_name), ARGS_KEY: json.dumps(model.model_args, sort_keys=True)}
        if data_config is not None:
            meta[DATA_KEY] = json.dumps(data_config, sort_keys=True)
        with atomic_path(path) as tmp:
            save_file(state_dict, str(tmp), metadata=meta)
        return path
    with atomic_dir(path) as tmp:
        save_file(state_dict, str(tmp / WEIGHTS_FILE))
        model_config: Dict[str, Any] = {}
        preprocessing = None
        if data_config is not None:
            model_config = {'label_names': list(data_config['class_names']),
                            'gcvimoe': {'data_config': data_config}}
            preprocessing = {'input_size': (data_config['in_chans'], data_config['img_size'], data_config['img_size']),
                             'mean': tuple(data_config['mean']), 'std': tuple(data_config['std']),
                             'crop_pct': data_config['crop_pct'], 'interpolation': data_config['interpolation']}
        save_config_for_hf(model, tmp / CONFIG_FILE, model_config=model_config, model_args=dict(model.model_args),
                           data_config=preprocessing)
    return path


def export_onnx(model: nn.Module, path: PathLike, opset: Optional[int] = None,
                metadata: Optional[Dict[str, Any]] = None) -> Path:
    """Write the eval model as ONNX (torch's dynamo exporter) with a dynamic batch dimension, atomically.

    Height and width stay the model's: GC ViT's windows and its global query tokens are built for one feature
    size (:func:`at_input_size` builds the model for another). ``metadata`` goes into the file's
    ``metadata_props``, each value as JSON (:func:`onnx_metadata`: labels and preprocessing).

    MoE layers export dropless: every expert runs on every token and each token takes its experts' rows
    (``num_experts`` times the expert FLOPs, see :meth:`gcvimoe.moe.MoE._exported_forward`), so the graph has no
    shape that depends on the routing.
    """
    try:
        import onnx
        import onnxscript  # noqa: F401  (torch's exporter needs it)
    except ImportError:
        raise GcvimoeError("ONNX export needs onnx and onnxscript: pip install 'gcvimoe[export]'") from None
    model = model.eval()
    in_chans, height, width = model.pretrained_cfg['input_size'][0], *model.img_size
    example = torch.randn(2, in_chans, height, width)
    batch = torch.export.Dim('batch', min=1, max=4096)
    path = Path(path)
    with atomic_path(path) as tmp, torch.no_grad():
        torch.onnx.export(model, (example,), str(tmp), input_names=['images'], output_names=['logits'],
                          dynamic_shapes={'x': {0: batch}}, dynamo=True, external_data=False, verbose=False,
                          opset_version=opset)
        if metadata:
            proto = onnx.load(str(tmp))
            for key, value in metadata.items():
                entry = proto.metadata_props.add()
                entry.key, entry.value = key, json.dumps(value)
            onnx.save(proto, str(tmp))
    return path


def onnx_metadata(model: nn.Module, data_config: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    """What a consumer of the ONNX file needs beside the graph: the model, its input, labels and preprocessing
    (the trained mean, std, crop and interpolation where the checkpoint records them, else the model's defaults)."""
    cfg = dict(model.pretrained_cfg)
    metadata = {'model_name': model.model_name, 'input_size': [cfg['input_size'][0], *model.img_size],
                'mean': list(cfg['mean']), 'std': list(cfg['std']), 'crop_pct': cfg.get('crop_pct'),
                'interpolation': cfg.get('interpolation')}
    if data_config:
        metadata.update({key: data_config[key] for key in ('crop_pct', 'interpolation') if key in data_config})
        metadata.update({key: list(data_config[key]) for key in ('mean', 'std') if key in data_config})
        if data_config.get('class_names'):
            metadata['labels'] = list(data_config['class_names'])
    return metadata


def at_input_size(model: nn.Module, height: int, width: int, source: Checkpoint) -> nn.Module:
    """``model`` built for ``height x width`` with the weights of ``source``, resized as for a fine-tune (the
    relative position tables interpolated to the new windows)."""
    if (height, width) == tuple(model.img_size):
        return model
    if height % 32 or width % 32:
        raise GcvimoeError(f"--input-size {height} x {width}: GC ViT needs a height and width that are multiples of "
                           f"32; pick e.g. {max(32, round(height / 32) * 32)} x {max(32, round(width / 32) * 32)}")
    other = build_model(model.model_name, {**model.model_args, 'img_size': (height, width)})
    load_initial_weights(other, source)
    return other.eval()


def onnx_max_difference(model: nn.Module, path: PathLike, batch_size: int = 2) -> float:
    """Largest absolute difference between onnxruntime's and PyTorch's logits on a random batch."""
    try:
        import onnxruntime
    except ImportError:
        raise GcvimoeError("checking the ONNX file needs onnxruntime: pip install 'gcvimoe[export]'") from None
    in_chans, height, width = model.pretrained_cfg['input_size'][0], *model.img_size
    images = torch.randn(batch_size, in_chans, height, width)
    with torch.no_grad():
        expected = model.eval()(images).numpy()
    session = onnxruntime.InferenceSession(str(path), providers=['CPUExecutionProvider'])
    (logits,) = session.run(None, {session.get_inputs()[0].name: images.numpy()})
    return float(abs(logits - expected).max())


def upcycle(
        model_name: str,
        dense_state_dict: Dict[str, torch.Tensor],
        noise_std: float = 0.0,
        seed: int = 0,
        **model_args,
) -> nn.Module:
    """Sparse upcycling (Komatsuzaki et al., 2023): a GCViMoE whose experts all start as the dense MLP they replace.

    Unless told otherwise the gates are normalised (``normalize_gates=True``), so that with dropless evaluation the
    upcycled model gives the dense model's outputs; with ``top_k=1`` the gate keeps its gradient (see
    :func:`gcvimoe.moe.router.top_k_routing`).

    Args:
        model_name: The variant, e.g. ``gcvimoe_tiny``.
        dense_state_dict: Weights of the dense model (ours or timm's ``gcvit_*`` layout).
        noise_std: Gaussian noise added to each expert copy to break their symmetry (0 keeps them identical).
        seed: Seed for the router's fresh initialisation and the noise.
        **model_args: Constructor arguments of the MoE model (``num_experts``, ``top_k``, ``moe_blocks``, ...).
    """
    model_args.setdefault('normalize_gates', True)
    torch.manual_seed(seed)
    model = build_model(model_name, model_args)
    upcycle_into(model, dense_state_dict, noise_std=noise_std)
    return model


def dense_twin(model: nn.Module) -> nn.Module:
    """The model with the same arguments and no MoE layer."""
    args = dict(model.model_args)
    args['moe'] = dict(args.get('moe') or {}, num_experts=0)
    return build_model(model.model_name, args)


def upcycle_into(model: nn.Module, dense_state_dict: Dict[str, torch.Tensor], noise_std: float = 0.0) -> None:
    """Load dense weights into a MoE ``model`` in place: every expert a copy of the MLP it replaces, routers as
    they are (fresh)."""
    layers = dict(moe_layers(model))
    if not layers:
        raise GcvimoeError("upcycling needs num_experts > 0 and at least one MoE block; set --num-experts")
    dense = dense_twin(model)
    load_weights(dense, dense_state_dict, source='dense checkpoint')
    # everything outside the MoE layers is copied as is; each MoE layer gets the dense MLP it replaces
    rest = {k: v for k, v in dense.state_dict().items() if not any(k.startswith(name + '.') for name in layers)}
    missing, unexpected = model.load_state_dict(rest, strict=False)
    assert not unexpected and all(any(k.startswith(name + '.') for name in layers) for k in missing)
    for name, layer in layers.items():
        layer.load_from_mlp(dense.get_submodule(name), noise_std=noise_std)


def load_initial_weights(model: nn.Module, source: Union[Checkpoint, PathLike], noise_std: float = 0.0) -> List[str]:
    """Start ``model`` from the weights of ``source`` (a :class:`Checkpoint` or any form :func:`read_checkpoint`
    reads), as timm's ``--initial-checkpoint``; returns one line per adaptation made, for the run's log.

    Dense weights into a MoE model are upcycled (:func:`upcycle_into`); a head of another class count is left
    freshly initialised; a stem of another channel count is adapted with timm's ``adapt_input_conv``.
    """
    checkpoint = source if isinstance(source, Checkpoint) else read_checkpoint(source)
    source = checkpoint.path
    state_dict = dict(checkpoint.state_dict)
    notes = _adapt_head_and_stem(model, state_dict)
    if dict(moe_layers(model)) and not experts_per_layer(state_dict):
        upcycle_into(model, state_dict, noise_std=noise_std)
        notes.append(f"upcycled the dense weights: every expert starts as its MLP (noise std {noise_std:g}), "
                     f"routers start fresh")
    else:
        load_weights(model, state_dict, source=f"initial checkpoint {source}")
    return [f"initial weights from {source}"] + notes


def _adapt_head_and_stem(model: nn.Module, state_dict: Dict[str, torch.Tensor]) -> List[str]:
    """Replace a head of another class count by the model's fresh one, adapt the stem's input channels."""
    from gcvimoe.models.gcvit import checkpoint_filter_fn

    state_dict.update(checkpoint_filter_fn(state_dict, model))
    target, notes = model.state_dict(), []
    head = state_dict.get('head.fc.weight')
    if head is not None and head.shape != target['head.fc.weight'].shape:
        for key in ('head.fc.weight', 'head.fc.bias'):
            state_dict[key] = target[key]
        notes.append(f"the checkpoint has {head.shape[0]} classes and the model {target['head.fc.weight'].shape[0]}: "
                     f"the head is re-initialised")
    stem = state_dict.get('stem.conv1.weight')
    if stem is not None and stem.shape[1] != target['stem.conv1.weight'].shape[1]:
        in_chans = target['stem.conv1.weight'].shape[1]
        state_dict['stem.conv1.weight'] = adapt_input_conv(in_chans, stem)
        notes.append(f"the stem is adapted from {stem.shape[1]} to {in_chans} input channels")
    return notes
