"""`gcvimoe visualize`: where a checkpoint's experts send the patches of images: routing maps per image, the expert
load per MoE layer, which classes each expert serves, and ``stats.json`` with the numbers behind every figure.

    gcvimoe visualize --checkpoint runs/digits/best.pth --output runs/digits/viz     # val images across classes
    gcvimoe visualize --checkpoint runs/tiny/best.pth --images cat.jpg photos/ 'shots/*.png' --output viz
    gcvimoe visualize --checkpoint runs/tiny/best.pth --data-dir /data/imagenet --per-class 1 --output viz
"""
import argparse
import os
import sys
from typing import List, Optional, Sequence, Tuple

import torch

from gcvimoe.analysis.routing import sample_across_classes
from gcvimoe.analysis.visualize import visualize_routing
from gcvimoe.cli._common import add_checkpoint, add_device, add_use_ema
from gcvimoe.data import DataConfig, build_transform, create_dataset, find_images, load_image
from gcvimoe.errors import GcvimoeError
from gcvimoe.models import model_from_checkpoint, read_checkpoint
from gcvimoe.moe import moe_layers
from gcvimoe.train.device import resolve_device
from gcvimoe.train.evaluate import eval_data_config, trained_data_config

Images = Tuple[torch.Tensor, List[str], Optional[List[int]]]


def configure(parser: argparse.ArgumentParser) -> None:
    add_checkpoint(parser)
    parser.add_argument('--output', required=True, metavar='DIR', help='folder for the figures and stats.json')
    source = parser.add_mutually_exclusive_group()
    source.add_argument('--images', nargs='+', metavar='FILE',
                        help='image files, folders or glob patterns (default: images of the dataset the checkpoint '
                             'was trained on)')
    source.add_argument('--data-dir', metavar='DIR',
                        help='an image-folder dataset (train/ and val/ class folders) instead of the training data')
    parser.add_argument('--split', default='val', choices=('train', 'val'), help='the dataset split to sample')
    parser.add_argument('--per-class', type=int, default=2, metavar='N',
                        help='dataset images sampled from every class (default: 2)')
    parser.add_argument('--max-images', type=int, default=40, metavar='N',
                        help='at most this many dataset images; beyond, classes evenly spaced (default: 40)')
    parser.add_argument('--batch-size', type=int, default=32, metavar='N',
                        help='images per forward pass; where capacity applies, it decides what is dropped')
    add_device(parser)
    add_use_ema(parser)


def run(args: argparse.Namespace) -> int:
    for flag in ('per_class', 'max_images', 'batch_size'):
        if getattr(args, flag) < 1:
            raise GcvimoeError(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
    if os.path.exists(args.output) and not os.path.isdir(args.output):
        raise GcvimoeError(f"--output {args.output} is a file; give a folder for the figures (it is made if missing)")
    checkpoint = read_checkpoint(args.checkpoint)
    model = model_from_checkpoint(checkpoint, use_ema=args.use_ema)
    if not any(True for _ in moe_layers(model)):
        raise GcvimoeError(f"{args.checkpoint} holds a dense model (no MoE layers): there is nothing to map; "
                           f"visualize a model trained with experts (--num-experts N)")
    trained = trained_data_config(checkpoint, "visualize")
    model = model.to(resolve_device(args.device))
    if args.images:
        images, names, labels = _read_files(args.images, trained)
    else:
        images, names, labels = _sample_dataset(args, trained)
    mean = torch.tensor(trained.mean).view(1, -1, 1, 1)
    std = torch.tensor(trained.std).view(1, -1, 1, 1)
    stats = visualize_routing(model, images, images * std + mean, names, trained.class_names, args.output,
                              labels=labels, batch_size=args.batch_size)
    print(f"routing maps:   {args.output}/routing_maps/ ({len(names)} images x {len(stats['layers'])} MoE layers)")
    print(f"expert load:    {args.output}/expert_load.png")
    if "class_expert" in stats["figures"]:
        print(f"class x expert: {args.output}/class_expert.png")
    else:
        print("class x expert: not drawn (the images have no labels)")
    print(f"numbers:        {args.output}/stats.json")
    return 0


def _read_files(patterns: Sequence[str], data_cfg: DataConfig) -> Images:
    """The readable images among ``patterns``, preprocessed; each unreadable file is named and skipped."""
    paths = find_images(patterns)
    transform = build_transform(data_cfg, is_training=False)
    mode = "L" if data_cfg.in_chans == 1 else "RGB"
    images, names = [], []
    for path in paths:
        try:
            images.append(transform(load_image(path, mode)))
        except GcvimoeError as e:
            print(f"skipped: {e}", file=sys.stderr)
            continue
        names.append(str(path))
    if not images:
        raise GcvimoeError(f"none of the {len(paths)} image files could be read; pass readable image files")
    return torch.stack(images), names, None


def _sample_dataset(args: argparse.Namespace, trained: DataConfig) -> Images:
    """Images sampled across the classes of ``--data-dir``, or else of the data the checkpoint was trained on."""
    data_cfg = eval_data_config(trained, None, args.data_dir) if args.data_dir else trained
    dataset = create_dataset(data_cfg, args.split, build_transform(data_cfg, is_training=False),
                             class_names=trained.class_names)
    indices = sample_across_classes(dataset.targets, args.per_class, args.max_images)
    samples = [dataset[i] for i in indices]
    names = [f"{args.split} image {i}" for i in indices]
    return torch.stack([image for image, _ in samples]), names, [int(label) for _, label in samples]
