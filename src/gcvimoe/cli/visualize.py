"""`gcvimoe visualize`: expert usage over a dataset split and routing maps of a few images, for a checkpoint.

    gcvimoe visualize --checkpoint runs/digits/best.pth --output runs/digits/viz
"""
import argparse
import json
from contextlib import nullcontext
from pathlib import Path

import torch

from gcvimoe.analysis.experts import plot_expert_usage
from gcvimoe.analysis.routing import plot_routing_maps
from gcvimoe.cli._common import add_checkpoint, add_use_ema
from gcvimoe.data import build_transform, create_dataset, create_loader
from gcvimoe.errors import GcvimoeError
from gcvimoe.files import write_text
from gcvimoe.models import model_from_checkpoint, read_checkpoint
from gcvimoe.moe import moe_layers
from gcvimoe.train.distributed import DistInfo
from gcvimoe.train.evaluate import evaluate, trained_data_config


def configure(parser: argparse.ArgumentParser) -> None:
    add_checkpoint(parser)
    parser.add_argument('--output', required=True, metavar='DIR', help='folder for the PNGs and usage.json')
    parser.add_argument('--split', default='val', choices=('train', 'val'))
    parser.add_argument('--num-images', type=int, default=6, metavar='N', help='images in the routing-map grid')
    parser.add_argument('--batch-size', type=int, default=128, metavar='N')
    add_use_ema(parser)


def run(args: argparse.Namespace) -> int:
    if args.num_images < 1:
        raise GcvimoeError(f"--num-images must be at least 1, got {args.num_images}")
    checkpoint = read_checkpoint(args.checkpoint)
    data_cfg = trained_data_config(checkpoint, "visualize")
    model = model_from_checkpoint(checkpoint, use_ema=args.use_ema)
    layers = dict(moe_layers(model))
    if not layers:
        raise GcvimoeError(f"{args.checkpoint} holds a dense model (num_experts=0): there is no routing to plot")
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)

    dataset = create_dataset(data_cfg, args.split, build_transform(data_cfg, is_training=False))
    loader = create_loader(dataset, args.batch_size, is_training=False)
    metrics = evaluate(model, loader, data_cfg.num_classes, DistInfo(device=torch.device('cpu')), nullcontext)
    usage_png = plot_expert_usage(metrics['experts'], output / 'expert_usage.png',
                                  title=f"expert usage on {data_cfg.dataset} {args.split} ({metrics['num_images']} "
                                        f"images, top-1 {metrics['top1']:.1f}%)")

    count = min(args.num_images, len(dataset))
    batch = torch.stack([dataset[i][0] for i in range(count)])
    labels = [int(dataset[i][1]) for i in range(count)]
    with torch.no_grad():
        predictions = model(batch).argmax(-1).tolist()
    maps = model.routing_maps()
    mean = torch.tensor(data_cfg.mean).view(1, -1, 1, 1)
    std = torch.tensor(data_cfg.std).view(1, -1, 1, 1)
    names = data_cfg.class_names
    titles = [f"{names[y]} (pred {names[p]})" for y, p in zip(labels, predictions)]
    num_experts = next(iter(layers.values())).num_experts
    maps_png = plot_routing_maps(batch * std + mean, maps, num_experts, output / 'routing_maps.png', titles=titles)

    write_text(output / 'usage.json', json.dumps({'top1': metrics['top1'], 'experts': metrics['experts']}, indent=1))
    print(f"expert usage: {usage_png}\nrouting maps: {maps_png}\nnumbers:      {output / 'usage.json'}")
    return 0
