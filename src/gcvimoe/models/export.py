"""Writing models: safetensors exports that rebuild their model alone, ONNX graphs, and sparse upcycling."""
import json
from pathlib import Path
from typing import Dict

import torch
import torch.nn as nn
from safetensors.torch import save_file

from gcvimoe.errors import GcvimoeError
from gcvimoe.files import atomic_path
from gcvimoe.models.checkpoint import ARGS_KEY, MODEL_KEY, PathLike, load_weights


def save_model(model: nn.Module, path: PathLike) -> Path:
    """Writes ``model``'s weights to ``path`` (.safetensors, atomically) with its name and constructor arguments in
    the header."""
    path = Path(path)
    name = getattr(model, 'model_name', None) or model.pretrained_cfg.get('architecture')
    args = getattr(model, 'model_args', {})
    meta = {MODEL_KEY: str(name), ARGS_KEY: json.dumps(args, sort_keys=True)}
    state_dict = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(state_dict, str(tmp), metadata=meta)
    return path


def export_onnx(model: nn.Module, path: PathLike) -> Path:
    """Write the eval model as ONNX (torch's dynamo exporter) with a dynamic batch dimension, atomically.

    MoE layers export dropless: every expert runs on every token and each token takes its experts' rows
    (``num_experts`` times the expert FLOPs, see :meth:`gcvimoe.moe.MoE._exported_forward`), so the graph has no
    shape that depends on the routing.
    """
    try:
        import onnx  # noqa: F401  (torch's exporter needs both)
        import onnxscript  # noqa: F401
    except ImportError:
        raise GcvimoeError("ONNX export needs onnx and onnxscript: pip install 'gcvimoe[export]'") from None
    model = model.eval()
    in_chans, height, width = model.pretrained_cfg['input_size'][0], *model.img_size
    example = torch.randn(2, in_chans, height, width)
    batch = torch.export.Dim('batch', min=1, max=4096)
    path = Path(path)
    with atomic_path(path) as tmp, torch.no_grad():
        torch.onnx.export(model, (example,), str(tmp), input_names=['images'], output_names=['logits'],
                          dynamic_shapes={'x': {0: batch}}, dynamo=True, external_data=False, verbose=False)
    return path


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
