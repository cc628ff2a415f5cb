"""Prediction: the top-k labels of images, with probabilities, from a checkpoint, export or model folder alone.

Images are files, folders (searched recursively) or glob patterns, read in batches; an unreadable image is skipped
and reported, and the rest still get their predictions.
"""
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from gcvimoe.data import build_transform, find_images, load_image
from gcvimoe.errors import GcvimoeError
from gcvimoe.models import model_from_checkpoint, read_checkpoint
from gcvimoe.train.device import resolve_device
from gcvimoe.train.evaluate import trained_data_config
from gcvimoe.train.preprocessing import Preprocessing, recorded_sources, resolve_preprocessing


@dataclass
class Predictions:
    """What :func:`predict` returns: one result per readable image, in input order, and the skipped files.

    Attributes:
        results: ``{"image": path, "top": [{"label": name, "probability": p}, ...]}``, most likely first.
        skipped: ``(path, reason)`` for every image that could not be read.
        preprocessing: What was applied to every image, and where each value came from.
    """
    results: List[Dict[str, Any]] = field(default_factory=list)
    skipped: List[Tuple[str, str]] = field(default_factory=list)
    preprocessing: Optional[Preprocessing] = None


@torch.no_grad()
def predict(
        checkpoint_path,
        images: Sequence[str],
        topk: int = 5,
        batch_size: int = 64,
        device: str = "auto",
        use_ema: bool = False,
        preprocessing: Optional[Mapping[str, Any]] = None,
) -> Predictions:
    """Predict the top ``topk`` labels of every image that ``images`` names (files, folders, globs), with the
    file's preprocessing and timm's ``preprocessing`` overrides
    (:func:`~gcvimoe.train.preprocessing.resolve_preprocessing`)."""
    if topk < 1:
        raise GcvimoeError(f"--topk must be at least 1, got {topk}")
    if batch_size < 1:
        raise GcvimoeError(f"--batch-size must be at least 1, got {batch_size}")
    paths = find_images(images)
    checkpoint = read_checkpoint(checkpoint_path)
    prep = resolve_preprocessing(trained_data_config(checkpoint, "predict with"), recorded_sources(), preprocessing)
    data_cfg = prep.data_cfg
    topk = min(topk, data_cfg.num_classes)  # as timm: the default 5 on a 3-class model lists all 3
    device = resolve_device(device)
    model = model_from_checkpoint(checkpoint, use_ema=use_ema).to(device)
    transform = build_transform(data_cfg, is_training=False)
    mode = "L" if data_cfg.in_chans == 1 else "RGB"
    out = Predictions(preprocessing=prep)
    for start in range(0, len(paths), batch_size):
        batch, names = [], []
        for path in paths[start:start + batch_size]:
            try:
                batch.append(transform(load_image(path, mode)))
                names.append(str(path))
            except GcvimoeError as e:
                out.skipped.append((str(path), str(e)))
        if not batch:
            continue
        probs = model(torch.stack(batch).to(device)).float().softmax(dim=-1).cpu()
        values, indices = probs.topk(topk, dim=-1)
        for name, row_values, row_indices in zip(names, values.tolist(), indices.tolist(), strict=True):
            out.results.append({"image": name, "top": [{"label": data_cfg.class_names[i], "probability": p}
                                                       for p, i in zip(row_values, row_indices, strict=True)]})
    return out


def result_rows(predictions: Predictions) -> List[Dict[str, Any]]:
    """One flat row per image for a CSV or JSON file, in the columns of timm's ``inference.py --label-type name
    --results-separate-col --fullname``: ``filename``, ``label_0`` ... ``label_{k-1}``, ``prob_0`` ... ``prob_{k-1}``,
    most likely first."""
    rows = []
    for result in predictions.results:
        row: Dict[str, Any] = {"filename": result["image"]}
        row.update((f"label_{rank}", entry["label"]) for rank, entry in enumerate(result["top"]))
        row.update((f"prob_{rank}", round(entry["probability"], 6)) for rank, entry in enumerate(result["top"]))
        rows.append(row)
    return rows
