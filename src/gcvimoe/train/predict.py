"""Prediction: the top-k labels of image files, with probabilities, from a checkpoint alone."""
from pathlib import Path
from typing import Any, Dict, List, Sequence

import torch

from gcvimoe.data import build_transform, load_image
from gcvimoe.errors import GcvimoeError
from gcvimoe.models import model_from_checkpoint, read_checkpoint
from gcvimoe.train.distributed import resolve_device
from gcvimoe.train.evaluate import trained_data_config


@torch.no_grad()
def predict(
        checkpoint_path,
        images: Sequence[str],
        topk: int = 5,
        device: str = "auto",
        use_ema: bool = False,
) -> List[Dict[str, Any]]:
    """For each image: ``{"image": path, "top": [{"label": name, "probability": p}, ...]}``, most likely first."""
    missing = [str(path) for path in images if not Path(path).is_file()]
    if missing:
        raise GcvimoeError(f"image {missing[0]} not found" + (f" (and {len(missing) - 1} more)" if missing[1:] else "")
                           + "; pass paths of existing image files")
    checkpoint = read_checkpoint(checkpoint_path)
    data_cfg = trained_data_config(checkpoint, "predict with")
    device = resolve_device(device)
    model = model_from_checkpoint(checkpoint, use_ema=use_ema).to(device)
    transform = build_transform(data_cfg, is_training=False)
    mode = "L" if data_cfg.in_chans == 1 else "RGB"
    k = min(topk, data_cfg.num_classes)
    results = []
    for path in images:
        x = transform(load_image(path, mode)).unsqueeze(0).to(device)
        probs = model(x).float().softmax(dim=-1)[0]
        values, indices = probs.topk(k)
        results.append({
            "image": str(path),
            "top": [{"label": data_cfg.class_names[i], "probability": float(p)} for p, i in zip(values, indices)],
        })
    return results
