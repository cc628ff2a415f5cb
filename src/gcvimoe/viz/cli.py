"""`gcvimoe visualize`: expert usage over a dataset split and routing maps of a few images, for a checkpoint.

    gcvimoe visualize --checkpoint runs/digits/best.pth --output runs/digits/viz
"""
import argparse
import json
from contextlib import nullcontext
from pathlib import Path

import torch

from gcvimoe.errors import GcvimoeError


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('--checkpoint', required=True, metavar='CKPT', help='a last.pth or best.pth of gcvimoe train')
    parser.add_argument('--output', required=True, metavar='DIR', help='folder for the PNGs and usage.json')
    parser.add_argument('--split', default='val', choices=('train', 'val'))
    parser.add_argument('--num-images', type=int, default=6, metavar='N', help='images in the routing-map grid')
    parser.add_argument('--batch-size', type=int, default=128, metavar='N')
    parser.add_argument('--use-ema', action='store_true', help='visualise the EMA weights')


def run(args: argparse.Namespace) -> int:
    from gcvimoe.data import DataConfig, build_transform, create_dataset, create_loader
    from gcvimoe.engine.checkpoint import load_checkpoint, model_from_checkpoint
    from gcvimoe.engine.distributed import DistInfo
    from gcvimoe.engine.evaluate import evaluate
    from gcvimoe.moe import moe_layers
    from gcvimoe.viz.experts import plot_expert_usage
    from gcvimoe.viz.routing import plot_routing_maps

    if args.num_images < 1:
        raise GcvimoeError(f"--num-images must be at least 1, got {args.num_images}")
    checkpoint = load_checkpoint(args.checkpoint)
    data_cfg = DataConfig.from_dict(checkpoint['data_config'])
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

    (output / 'usage.json').write_text(json.dumps({'top1': metrics['top1'], 'experts': metrics['experts']}, indent=1))
    print(f"expert usage: {usage_png}\nrouting maps: {maps_png}\nnumbers:      {output / 'usage.json'}")
    return 0
