"""`gcvimoe convert`: upcycle dense GC ViT weights into a GCViMoE, export a checkpoint as a model folder,
safetensors or ONNX; write an image folder as tar shards.

    gcvimoe convert upcycle --model gcvimoe_tiny --checkpoint gcvit_tiny.pth --num-experts 8 --output moe.safetensors
    gcvimoe convert export --checkpoint output/digits/best.pth --output digits_model     # a folder timm loads
    gcvimoe convert export --checkpoint output/digits/best.pth --output digits.safetensors
    gcvimoe convert onnx --checkpoint output/digits/best.pth --output digits.onnx
    gcvimoe convert hub output/digits --output hub/digits     # + a model card; --push-to-hub me/digits uploads it
    gcvimoe convert shards data/flowers shards/flowers --images-per-shard 1000   # then --data-dir shards/flowers
"""
import argparse
import json

import torch

from gcvimoe.data.shards import write_shards
from gcvimoe.errors import GcvimoeError
from gcvimoe.models import (
    load_weights, model_from_checkpoint, read_checkpoint, save_model, upcycle)
from gcvimoe.models.export import at_input_size, dense_twin, export_onnx, onnx_max_difference, onnx_metadata
from gcvimoe.moe import moe_layers


def configure(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest='action', metavar='ACTION', required=True)
    up = sub.add_parser('upcycle', help='every expert starts as a copy of the dense MLP it replaces')
    up.add_argument('--model', required=True, help='target variant, e.g. gcvimoe_tiny')
    up.add_argument('--checkpoint', required=True, help='dense weights: ours or timm gcvit_* (.pth or .safetensors)')
    up.add_argument('--output', required=True, help='where to write the GCViMoE (a .safetensors file or a folder)')
    up.add_argument('--num-experts', type=int, default=8)
    up.add_argument('--top-k', type=int, default=1)
    up.add_argument('--no-normalize-gates', dest='normalize_gates', action='store_false',
                    help='keep raw gate probabilities (the outputs then differ from the dense model\'s)')
    up.add_argument('--moe-blocks', default=None,
                    help='placement, e.g. "every 2nd block of stages 3-4" or JSON [[-1],[-1],[1,3,5],[1]]')
    up.add_argument('--noise-std', type=float, default=0.0, help='noise added to each expert copy')
    up.add_argument('--num-classes', type=int, default=None, help='classes of the dense checkpoint\'s head')
    up.add_argument('--img-size', type=int, default=None)
    up.add_argument('--in-chans', type=int, default=None)
    up.add_argument('--seed', type=int, default=0)
    ex = sub.add_parser('export', help='write a checkpoint\'s model as a model folder timm loads (config.json, '
                                         'model.safetensors) or, for a .safetensors path, one file')
    ex.add_argument('--checkpoint', required=True)
    ex.add_argument('--output', required=True, help='a folder, or a file ending in .safetensors')
    ex.add_argument('--use-ema', action='store_true', help='export the EMA weights of a training checkpoint')
    onnx = sub.add_parser('onnx', help='write the eval model as ONNX (dynamic batch; MoE layers export dropless; '
                                       'labels and preprocessing in its metadata)')
    onnx.add_argument('--checkpoint', required=True)
    onnx.add_argument('--output', required=True)
    onnx.add_argument('--opset', type=int, default=None, help="the ONNX opset (default: torch's exporter's)")
    onnx.add_argument('--input-size', type=int, nargs=3, metavar=('C', 'H', 'W'), default=None,
                      help="export for another height and width, as timm's --input-size (default: the trained "
                           "size; GC ViT's windows fix the size in the graph)")
    onnx.add_argument('--no-check', action='store_true', help='skip comparing onnxruntime with PyTorch')
    hub = sub.add_parser('hub', help='write a training run as a Hugging Face Hub folder: the model folder timm loads '
                                     'and a model card (README.md) with the run\'s recipe and results')
    hub.add_argument('run_dir', metavar='RUN_DIR', help='the --output folder of a gcvimoe train run')
    hub.add_argument('--output', required=True, help='the folder to write (replaced)')
    hub.add_argument('--use-ema', action='store_true', help='share the EMA weights of the best checkpoint')
    hub.add_argument('--push-to-hub', metavar='REPO', default=None,
                     help='also upload the folder to this Hub repository (needs a token and the network; nothing '
                          'is sent without this flag)')
    hub.add_argument('--private', action='store_true', help='create the Hub repository private')
    shards = sub.add_parser('shards', help='write an image folder (train/ and val/ class folders) as webdataset tar '
                                           'shards with _info.json (classes, shard sizes)')
    shards.add_argument('folder', help='the image folder')
    shards.add_argument('output', help='the folder to write the shards into (replaced)')
    shards.add_argument('--images-per-shard', type=int, default=1000, metavar='N',
                        help='images per shard (default: 1000); at least one shard per training process')


def _placement(text):
    if text is None:
        return None
    if text.lstrip().startswith('['):
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise GcvimoeError(f"--moe-blocks {text!r} is not valid JSON ({e.msg}); write e.g. [[-1],[-1],[1,3],[1]]")
    return text


def _onnx(args: argparse.Namespace) -> int:
    checkpoint = read_checkpoint(args.checkpoint)
    model = model_from_checkpoint(checkpoint)
    if args.input_size is not None:
        chans, height, width = args.input_size
        if chans != model.pretrained_cfg['input_size'][0]:
            raise GcvimoeError(f"--input-size {chans} {height} {width}: the model takes "
                               f"{model.pretrained_cfg['input_size'][0]} channels; keep C at that")
        model = at_input_size(model, height, width, checkpoint)
    layers = dict(moe_layers(model))
    if layers and any(layer.config.eval_capacity_factor > 0 for layer in layers.values()):
        print(f"note: {args.checkpoint} evaluates with capacity (eval_capacity_factor "
              f"{next(iter(layers.values())).config.eval_capacity_factor}); the ONNX export is dropless: every token "
              f"gets its experts")
    metadata = onnx_metadata(model, checkpoint.data_config)
    path = export_onnx(model, args.output, opset=args.opset, metadata=metadata)
    what = f"{len(layers)} MoE layers, dropless" if layers else "dense"
    labels = f", {len(metadata['labels'])} labels" if 'labels' in metadata else ""
    print(f"wrote {path} ({model.model_name}, {what}, dynamic batch, input {'x'.join(map(str, metadata['input_size']))}"
          f"{labels}; mean/std and labels in its metadata)")
    if not args.no_check:
        print(f"onnxruntime vs PyTorch logits, random batch of 2: max abs difference "
              f"{onnx_max_difference(model, path):.2e}")
    return 0


def _shards(args: argparse.Namespace) -> int:
    written = write_shards(args.folder, args.output, args.images_per_shard)
    skipped = f"; {written['unreadable']} unreadable images left out" if written['unreadable'] else ""
    print(f"wrote {written['train']} train and {written['val']} val images as shards of {args.images_per_shard} "
          f"into {args.output}{skipped}")
    return 0


def _hub(args: argparse.Namespace) -> int:
    from gcvimoe.analysis.card import push_hub_folder, write_hub_folder

    path = write_hub_folder(args.run_dir, args.output, use_ema=args.use_ema, repo_id=args.push_to_hub)
    print(f"wrote {path} (config.json, model.safetensors, README.md model card); timm loads it as "
          f"local-dir:{path} after import gcvimoe")
    if args.push_to_hub:
        print(f"pushed to {push_hub_folder(path, args.push_to_hub, private=args.private)}")
    return 0


def _export(args: argparse.Namespace) -> int:
    checkpoint = read_checkpoint(args.checkpoint)
    model = model_from_checkpoint(checkpoint, use_ema=args.use_ema)
    path = save_model(model, args.output, data_config=checkpoint.data_config)
    print(f"wrote {path} ({model.model_name}, {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M params)")
    return 0


def run(args: argparse.Namespace) -> int:
    return ACTIONS[args.action](args)


def _upcycle(args: argparse.Namespace) -> int:
    checkpoint = read_checkpoint(args.checkpoint)
    state_dict, model_args = checkpoint.state_dict, dict(checkpoint.model_args)
    # the dense file decides the head and stem widths unless told otherwise
    head, stem = state_dict.get('head.fc.weight'), state_dict.get('stem.conv1.weight')
    model_args.update({k: v for k, v in dict(
        num_classes=args.num_classes if args.num_classes is not None else (None if head is None else head.shape[0]),
        in_chans=args.in_chans if args.in_chans is not None else (None if stem is None else stem.shape[1]),
        img_size=args.img_size).items() if v is not None})
    model_args.update(num_experts=args.num_experts, top_k=args.top_k, moe_blocks=_placement(args.moe_blocks),
                      normalize_gates=args.normalize_gates)
    model = upcycle(args.model, state_dict, noise_std=args.noise_std, seed=args.seed, **model_args)
    path = save_model(model, args.output, data_config=checkpoint.data_config)
    print(f"wrote {path}: {args.model} with {len(list(moe_layers(model)))} MoE layers x {args.num_experts} experts, "
          f"upcycled from {args.checkpoint}")
    print(f"largest logit difference to the dense model on a random batch of 4 (dropless eval): "
          f"{_difference_to_dense(model, state_dict):.2e}")
    return 0


@torch.no_grad()
def _difference_to_dense(model, dense_state_dict) -> float:
    dense = dense_twin(model)
    load_weights(dense, dense_state_dict, source='dense checkpoint')
    in_chans, (height, width) = model.pretrained_cfg['input_size'][0], model.img_size
    images = torch.randn(4, in_chans, height, width, generator=torch.Generator().manual_seed(0))
    return float((model.eval()(images) - dense.eval()(images)).abs().max())


ACTIONS = {'upcycle': _upcycle, 'export': _export, 'onnx': _onnx, 'hub': _hub, 'shards': _shards}
"""What each ``gcvimoe convert ACTION`` runs; a new action is a subparser in :func:`configure` and an entry here."""
