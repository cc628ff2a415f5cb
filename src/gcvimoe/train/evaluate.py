"""Evaluation: loss, top-1/top-5, per-class accuracy and expert usage, summed exactly over all processes."""
import dataclasses
from contextlib import nullcontext
from typing import Any, Callable, Dict, Iterable, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import nn

from gcvimoe.data import (
    DataConfig, build_transform, create_dataset, create_loader, dataset_for_dir, default_dataset, get_source,
    resolve_data_config)
from gcvimoe.errors import GcvimoeError
from gcvimoe.models import Checkpoint, model_from_checkpoint, read_checkpoint
from gcvimoe.moe import MoEReport, collect_moe_report, moe_layers
from gcvimoe.moe.parallel import is_expert_parallel
from gcvimoe.train.device import resolve_device
from gcvimoe.train.distributed import DistInfo, all_reduce_sum, max_over_processes
from gcvimoe.train.preprocessing import recorded_sources, resolve_preprocessing
from gcvimoe.train.progress import expert_load, track


def one_line(error: GcvimoeError) -> GcvimoeError:
    """A GcvimoeError raised in a DataLoader worker comes back wrapped in the worker's traceback; keep its message."""
    last = str(error).strip().splitlines()[-1] if str(error).strip() else ""
    prefix = f"{GcvimoeError.__module__}.{GcvimoeError.__name__}: "
    return GcvimoeError(last.removeprefix(prefix))


def iterate(loader: Iterable):
    """Iterate ``loader``, turning errors raised while loading (an unreadable image) into one-line errors."""
    try:
        yield from loader
    except GcvimoeError as e:
        raise one_line(e) from None


class ExpertUsage:
    """Sums per-layer expert token counts over batches (and processes) from :class:`gcvimoe.moe.MoEReport` s, on the
    layers' device: nothing is read from it until :meth:`all_reduce`.

    Args:
        model: Start every MoE layer of ``model`` at zero, so that a process that saw no batch still takes part in
            :meth:`all_reduce` layer by layer, as the others do.
    """

    def __init__(self, model: Optional[nn.Module] = None):
        self.tokens: Dict[str, torch.Tensor] = {}
        self.kept: Dict[str, torch.Tensor] = {}
        for name, layer in moe_layers(model) if model is not None else ():
            device = next(layer.parameters(), torch.empty(0)).device
            self.tokens[name] = torch.zeros(layer.num_experts, dtype=torch.float64, device=device)
            self.kept[name] = torch.zeros(layer.num_experts, dtype=torch.float64, device=device)

    def update(self, report: MoEReport) -> None:
        for name, stats in report.stats.items():
            tokens = torch.as_tensor(stats.tokens_per_expert).detach().double()
            kept = torch.as_tensor(stats.kept_tokens_per_expert).detach().double()
            if name in self.tokens:
                self.tokens[name] += tokens.to(self.tokens[name].device)
                self.kept[name] += kept.to(self.kept[name].device)
            else:
                self.tokens[name], self.kept[name] = tokens.clone(), kept.clone()

    def all_reduce(self, info: DistInfo) -> None:
        for name in self.tokens:
            self.tokens[name] = all_reduce_sum(self.tokens[name].to(info.device), info).cpu()
            self.kept[name] = all_reduce_sum(self.kept[name].to(info.device), info).cpu()

    @property
    def dropped_fraction(self) -> float:
        """Share of token-to-expert assignments dropped for capacity, over all layers (0 for a dense model)."""
        total = sum(float(t.sum()) for t in self.tokens.values())
        kept = sum(float(k.sum()) for k in self.kept.values())
        return 1.0 - kept / total if total > 0 else 0.0

    def summary(self) -> Dict[str, Dict[str, Any]]:
        """Per layer: each expert's share of the routed tokens, the dropped share, and the raw counts."""
        return {name: expert_load(tokens.tolist(), self.kept[name].tolist()) for name, tokens in self.tokens.items()}


def _match_collective_passes(model, num_batches, most_batches, example, loader, info, autocast, channels_last):
    """Under expert parallelism every forward pass is a collective, and the processes' shares of the val set may
    differ by a batch: a process with fewer batches runs passes on one of its images, uncounted, until all match."""
    missing = most_batches - num_batches
    if missing and example is None:  # a process without a single val image
        example = loader.dataset[0][0].unsqueeze(0).to(info.device)
        if channels_last:
            example = example.contiguous(memory_format=torch.channels_last)
    for _ in range(missing):
        with autocast():
            model(example)


@torch.no_grad()
def evaluate(
        model: nn.Module,
        loader: Iterable,
        num_classes: int,
        info: DistInfo,
        autocast: Callable = nullcontext,
        channels_last: bool = False,
        desc: Optional[str] = "eval",
) -> Dict[str, Any]:
    """Evaluate ``model`` (not a DDP wrapper) on this process's share of ``loader``; metrics cover all processes.

    The primary process shows the progress under ``desc`` (None: not at all) as a bar when stderr is a terminal, and
    not at all in a log (see :func:`gcvimoe.train.progress.track`).

    Returns:
        ``loss`` (mean cross-entropy), ``top1``, ``top5`` (percent), ``num_images``, ``per_class_top1`` (percent per
        class, None for a class without images), ``class_counts``, ``experts`` (see :meth:`ExpertUsage.summary`) and
        ``dropped_fraction``.
    """
    model.eval()
    k = min(5, num_classes)
    sums = torch.zeros(4, dtype=torch.float64, device=info.device)  # loss, top-1 hits, top-k hits, images
    class_hits = torch.zeros(num_classes, dtype=torch.float64, device=info.device)
    class_counts = torch.zeros(num_classes, dtype=torch.float64, device=info.device)
    usage = ExpertUsage(model)
    batches = iterate(loader)
    num_batches, example = 0, None
    expert_parallel = info.distributed and is_expert_parallel(model)
    most_batches = max_over_processes(len(loader), info) if expert_parallel else 0  # a collective: before the passes
    for images, targets in (track(batches, len(loader), desc, info) if desc else batches):
        images = images.to(info.device, non_blocking=True)
        targets = targets.to(info.device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast():
            logits = model(images)
        num_batches, example = num_batches + 1, images[:1]
        logits = logits.float()
        hits = logits.topk(k, dim=1).indices == targets[:, None]
        sums[0] += F.cross_entropy(logits, targets, reduction="sum")
        sums[1] += hits[:, 0].sum()
        sums[2] += hits.any(dim=1).sum()
        sums[3] += targets.numel()
        class_counts += torch.bincount(targets, minlength=num_classes)
        class_hits += torch.bincount(targets[hits[:, 0]], minlength=num_classes)
        usage.update(collect_moe_report(model))
    if expert_parallel:
        _match_collective_passes(model, num_batches, most_batches, example, loader, info, autocast, channels_last)
    for tensor in (sums, class_hits, class_counts):
        all_reduce_sum(tensor, info)
    usage.all_reduce(info)
    count = max(float(sums[3]), 1.0)
    return {
        "loss": float(sums[0]) / count,
        "top1": 100.0 * float(sums[1]) / count,
        "top5": 100.0 * float(sums[2]) / count,
        "num_images": int(sums[3]),
        "per_class_top1": [100.0 * float(h) / float(c) if c else None
                           for h, c in zip(class_hits, class_counts, strict=True)],
        "class_counts": [int(c) for c in class_counts],
        "experts": usage.summary(),
        "dropped_fraction": usage.dropped_fraction,
    }


def eval_data_config(trained: DataConfig, dataset: Optional[str], data_dir: Optional[str]) -> DataConfig:
    """The training data config pointed at the data to evaluate (same size, channels, normalisation, classes)."""
    if dataset is None and data_dir is None:
        return trained
    if dataset is None:
        dataset = dataset_for_dir(trained.dataset, data_dir)
    if get_source(dataset).fixed_classes and \
            resolve_data_config(dataset, data_dir or "").class_names != trained.class_names:
        raise GcvimoeError(f"the checkpoint was trained on other classes than {dataset}'s; evaluate it on its own data")
    return dataclasses.replace(trained, dataset=dataset, data_dir=data_dir or "")


def trained_data_config(checkpoint: Checkpoint, action: str) -> DataConfig:
    """The preprocessing and class names a checkpoint, export or model folder records; one line for a file that
    records none."""
    if checkpoint.data_config is None:
        raise GcvimoeError(f"{checkpoint.path} records no preprocessing or class names (a plain state dict); {action} "
                           f"a training checkpoint, an export or a model folder, or name the data with --data-dir")
    return DataConfig.from_dict(checkpoint.data_config)


def _plain_data_config(model: nn.Module, path, dataset: Optional[str], data_dir: Optional[str]):
    """For a file that records no preprocessing: the model's own ``pretrained_cfg``, the channels of its weights and
    the named data's classes; the data's own mean and std where the ``pretrained_cfg``'s have other channels (a grey
    model's ImageNet statistics). Returns the config and where each value came from."""
    if dataset is None and data_dir is None:
        raise GcvimoeError(f"{path} records no preprocessing or class names (a plain state dict); name the data "
                           f"with --data-dir DIR or --dataset")
    pretrained = model.pretrained_cfg
    in_chans = pretrained["input_size"][0]  # the built model's, whose stem follows the weights
    data_cfg = resolve_data_config(dataset or default_dataset(data_dir), data_dir or "",
                                   img_size=pretrained["input_size"][-1], in_chans=in_chans,
                                   interpolation=pretrained["interpolation"], crop_pct=pretrained["crop_pct"])
    if data_cfg.num_classes != model.num_classes:
        raise GcvimoeError(f"{path} has {model.num_classes} classes but the data {data_cfg.num_classes}; evaluate it "
                           f"on data with the same classes")
    model_cfg = "the model's pretrained_cfg"
    sources = {"input_size": f"{model_cfg}; channels from the weights", "crop_pct": model_cfg,
               "interpolation": model_cfg}
    if len(pretrained["mean"]) == in_chans:
        data_cfg = dataclasses.replace(data_cfg, mean=tuple(pretrained["mean"]), std=tuple(pretrained["std"]))
        sources.update(mean=model_cfg, std=model_cfg)
    else:
        sources.update(dict.fromkeys(("mean", "std"), f"the data ({data_cfg.dataset}), as the pretrained_cfg's are "
                                                      f"{len(pretrained['mean'])}-channel"))
    return data_cfg, sources


def validate_checkpoint(  # noqa: PLR0913  (the command's flags, as timm's validate.py)
        checkpoint_path,
        dataset: Optional[str] = None,
        data_dir: Optional[str] = None,
        split: str = "val",
        batch_size: Optional[int] = None,
        workers: Optional[int] = None,
        device: str = "auto",
        use_ema: bool = False,
        model_name: Optional[str] = None,
        preprocessing: Optional[Mapping[str, Any]] = None,
) -> Dict[str, Any]:
    """Evaluate a checkpoint; returns the metrics of :func:`evaluate` plus context, timm validate.py's columns
    (``top1_err``, ``top5_err``, ``param_count`` in millions, ``img_size``, ``crop_pct``, ``interpolation``) and the
    ``preprocessing`` with where each value came from (:class:`~gcvimoe.train.preprocessing.Preprocessing`).

    Args:
        checkpoint_path: A training checkpoint, ``.safetensors`` export, model folder, ``local-dir:DIR`` or
            ``hf-hub:NAME``; or a plain state dict when ``model_name`` names the model to load it into.
        model_name: The model for a plain state dict (a timm ``gcvit_*`` file into ``gcvimoe_*``).
        preprocessing: timm's overrides (``img_size``, ``input_size``, ``crop_pct``, ``mean``, ``std``,
            ``interpolation``; see :func:`~gcvimoe.train.preprocessing.resolve_preprocessing`).
    """
    checkpoint = read_checkpoint(checkpoint_path)
    info = DistInfo(device=resolve_device(device))
    model = model_from_checkpoint(checkpoint, use_ema=use_ema, model_name=model_name).to(info.device)
    if checkpoint.data_config is None:
        trained, sources = _plain_data_config(model, checkpoint.path, dataset, data_dir)
        data_cfg = trained
    else:
        trained, sources = trained_data_config(checkpoint, "validate"), recorded_sources()
        data_cfg = eval_data_config(trained, dataset, data_dir)
    prep = resolve_preprocessing(data_cfg, sources, preprocessing)
    data_cfg = prep.data_cfg
    eval_set = create_dataset(data_cfg, split, build_transform(data_cfg, is_training=False),
                              class_names=trained.class_names)
    training = checkpoint.training or {}
    config = training.get("config") or {}
    batch_size = batch_size or config.get("eval_batch_size") or config.get("batch_size") or 128
    workers = config.get("workers", 0) if workers is None else workers
    loader = create_loader(eval_set, batch_size, is_training=False, workers=workers)
    result = evaluate(model, loader, trained.num_classes, info, nullcontext)
    result.update(
        checkpoint=str(checkpoint_path), model=checkpoint.model_name or model_name, epoch=training.get("epoch"),
        dataset=data_cfg.dataset, split=split, weights="ema" if use_ema else "model",
        class_names=trained.class_names, top1_err=100.0 - result["top1"], top5_err=100.0 - result["top5"],
        param_count=round(sum(p.numel() for p in model.parameters()) / 1e6, 2), img_size=data_cfg.img_size,
        crop_pct=data_cfg.crop_pct, interpolation=data_cfg.interpolation, preprocessing=prep.to_dict())
    return result
