"""A training run as a folder for the Hugging Face Hub: the model folder timm loads, and a model card made from the
run's own records (``config.yaml``, ``summary.csv``), so that every number on the card is one the run measured.

    write_hub_folder('runs/flowers', 'hub/flowers')         # config.json, model.safetensors, README.md
    push_hub_folder('hub/flowers', 'me/gcvimoe-flowers')    # needs huggingface_hub's token and the network
"""
import csv
from pathlib import Path
from typing import Any, Dict, List, Optional

import yaml

from gcvimoe.errors import GcvimoeError, first_line
from gcvimoe.files import write_text
from gcvimoe.models import model_from_checkpoint, read_checkpoint, save_model
from gcvimoe.models.checkpoint import PathLike
from gcvimoe.models.info import ModelInfo, describe_model

CARD_FILE = 'README.md'
RECIPE_KEYS = ('epochs', 'batch_size', 'grad_accum_steps', 'opt', 'lr', 'lr_batch_size', 'layer_decay', 'weight_decay',
               'sched', 'warmup_epochs', 'min_lr', 'clip_grad', 'drop_path_rate', 'smoothing', 'mixup', 'cutmix',
               'scale', 'hflip', 'color_jitter', 'auto_augment', 'ema', 'initial_checkpoint', 'seed')
"""The config keys a card lists under its recipe (those present in the run's config.yaml)."""


def read_run_records(run_dir: PathLike) -> Dict[str, Any]:
    """A finished run's records: ``config`` (config.yaml as a mapping) and ``history`` (summary.csv, one dict of
    floats per epoch)."""
    run_dir = Path(run_dir)
    missing = [name for name in ('config.yaml', 'summary.csv') if not (run_dir / name).is_file()]
    if missing:
        raise GcvimoeError(f"{run_dir} is not a finished training run ({' and '.join(missing)} missing); pass the "
                           f"--output folder of a gcvimoe train run")
    config = yaml.safe_load((run_dir / 'config.yaml').read_text()) or {}
    with open(run_dir / 'summary.csv', newline='') as f:
        history = [{key: float(value) for key, value in row.items() if value != ''} for row in csv.DictReader(f)]
    if not history:
        raise GcvimoeError(f"{run_dir}/summary.csv holds no epoch yet; let the run finish an epoch first")
    return {'config': config, 'history': history}


def best_epoch(history: List[Dict[str, float]]) -> Dict[str, float]:
    """The row of the epoch with the best ``eval_top1`` (the first of equals, as the trainer's best.pth)."""
    return max(history, key=lambda row: (row['eval_top1'], -row['epoch']))


def write_hub_folder(run_dir: PathLike, output: PathLike, use_ema: bool = False, repo_id: Optional[str] = None
                     ) -> Path:
    """Write ``output``: the run's best weights as a timm model folder (``config.json``, ``model.safetensors``,
    written atomically) and a model card ``README.md``.

    Args:
        run_dir: The ``--output`` folder of a training run (its ``best.pth``, or ``last.pth`` when none).
        output: The folder to write (replaced).
        use_ema: Share the EMA weights of the checkpoint.
        repo_id: The Hub repository the card's loading example names (a placeholder without it).
    """
    run_dir, output = Path(run_dir), Path(output)
    records = read_run_records(run_dir)
    source = next((run_dir / name for name in ('best.pth', 'best', 'last.pth', 'last') if (run_dir / name).exists()),
                  None)
    if source is None:
        raise GcvimoeError(f"{run_dir} holds no best.pth or last.pth; pass the --output folder of a training run")
    checkpoint = read_checkpoint(source)
    model = model_from_checkpoint(checkpoint, use_ema=use_ema)
    card = model_card(describe_model(model), records, checkpoint.data_config or {}, repo_hint=repo_id or 'USER/REPO')
    save_model(model, output, data_config=checkpoint.data_config)
    write_text(output / CARD_FILE, str(card))
    return output


def model_card(info: ModelInfo, records: Dict[str, Any], data_config: Dict[str, Any], repo_hint: str = 'USER/REPO'):
    """The model card (a ``huggingface_hub.ModelCard``) of a model described by ``info``, trained as ``records``
    say on data described by ``data_config``."""
    from huggingface_hub import ModelCard, ModelCardData

    config, history = records['config'], records['history']
    best, last = best_epoch(history), history[-1]
    class_names = list(data_config.get('class_names') or [])
    card_data = ModelCardData(library_name='timm', license='apache-2.0', pipeline_tag='image-classification',
                              tags=['image-classification', 'timm', 'gcvimoe', 'mixture-of-experts'])
    sections = [
        f"# {info.model} trained with gcvimoe",
        "",
        f"A GC ViT vision transformer whose MLPs are sparse Mixture-of-Experts layers ({info.model}), trained with "
        f"gcvimoe for {len(history)} epoch(s); best validation top-1 "
        f"**{best['eval_top1']:.2f} %** at epoch {best['epoch']:.0f}.",
        "",
        "## Architecture",
        "",
        *_table([
            ('model', f"`{info.model}`"),
            ('input', 'x'.join(map(str, info.input_size)) + ' (channels x height x width)'),
            ('parameters', f"{info.total_params / 1e6:.2f} M total, {info.active_params / 1e6:.2f} M active per "
                           f"token"),
            ('MACs per image', f"{info.macs / 1e9:.4f} G" + (f" ({info.dense_macs / 1e9:.4f} G for the dense twin)"
                                                              if info.dense_macs else "")),
            ('classes', f"{len(class_names)}" if class_names else "-"),
        ]),
        "",
        "## MoE options",
        "",
        *_moe_section(info, config.get('moe') or {}),
        "",
        "## Data",
        "",
        *_table([
            ('dataset', str(config.get('dataset') or data_config.get('dataset') or '-')),
            ('image size', f"{data_config.get('img_size', config.get('img_size'))} px"),
            ('channels', str(data_config.get('in_chans', config.get('in_chans')))),
            ('mean / std', f"{_numbers(data_config.get('mean'))} / {_numbers(data_config.get('std'))}"),
            ('interpolation, crop', f"{data_config.get('interpolation', '-')}, crop_pct "
                                    f"{data_config.get('crop_pct', '-')}"),
            ('labels', ', '.join(class_names[:20]) + (' ...' if len(class_names) > 20 else '') or '-'),
        ]),
        "",
        "## Training recipe",
        "",
        *_table([(key, f"`{config[key]}`") for key in RECIPE_KEYS if key in config and config[key] not in ('', None)]),
        "",
        "## Results (from the run's summary.csv)",
        "",
        "| epoch | eval top-1 (%) | eval top-5 (%) | eval loss | train loss | dropped tokens |",
        "|---|---|---|---|---|---|",
        *(_result_row(label, row) for label, row in (('best', best), ('last', last))),
        "",
        "## Intended use",
        "",
        "Image classification into the labels above, at the input size and preprocessing above, and as a starting "
        "point for fine-tuning (`gcvimoe train --initial-checkpoint hf-hub:...`). It was trained on the data named "
        "above only: check it on your own data before relying on it.",
        "",
        "## How to load",
        "",
        "```python",
        "import timm",
        "import gcvimoe  # registers the gcvimoe_* models with timm",
        "",
        f"model = timm.create_model('hf-hub:{repo_hint}', pretrained=True)  # or 'local-dir:PATH' for this folder",
        "model.eval()",
        "config = timm.data.resolve_data_config({}, model=model)",
        "transform = timm.data.create_transform(**config)",
        "```",
        "",
        "A training loop outside gcvimoe must add the MoE aux loss: `loss + gcvimoe.moe.collect_aux_loss(model)`.",
    ]
    return ModelCard(f"---\n{card_data.to_yaml()}\n---\n\n" + "\n".join(sections) + "\n")


def _moe_section(info: ModelInfo, moe: Dict[str, Any]) -> List[str]:
    if not info.num_moe_layers:
        return ["None: a dense model."]
    return _table([
        ('experts per MoE layer', str(info.num_experts)),
        ('top-k', str(info.top_k)),
        ('capacity factor (train / eval)', f"{moe.get('capacity_factor', '-')} / "
                                           f"{moe.get('eval_capacity_factor', '-')} (0 = dropless)"),
        ('router, balance loss', f"{moe.get('router', '-')}, {moe.get('balance_loss', '-')} (weight "
                                 f"{moe.get('aux_loss_weight', '-')})"),
        ('MoE blocks', f"{info.num_moe_layers}: " + ', '.join(f"`{name.removesuffix('.mlp')}`"
                                                              for name in info.moe_layers)),
    ])


def _result_row(label: str, row: Dict[str, float]) -> str:
    dropped = row.get('dropped_fraction')
    return (f"| {row['epoch']:.0f} ({label}) | {row['eval_top1']:.2f} | {row['eval_top5']:.2f} | "
            f"{row['eval_loss']:.4f} | {row['train_loss']:.4f} | "
            f"{'-' if dropped is None else f'{100 * dropped:.1f} %'} |")


def _table(rows) -> List[str]:
    return ["| | |", "|---|---|", *(f"| {key} | {value} |" for key, value in rows)]


def _numbers(values: Optional[List[float]]) -> str:
    return '-' if not values else '(' + ', '.join(f"{v:.4f}" for v in values) + ')'


def push_hub_folder(folder: PathLike, repo_id: str, private: bool = False) -> str:
    """Upload ``folder`` to the Hub repository ``repo_id`` (created if missing); returns its URL. A missing token or
    network is one line."""
    from huggingface_hub import create_repo, get_token, upload_folder

    if get_token() is None:
        raise GcvimoeError(f"--push-to-hub {repo_id}: no Hugging Face token; run `hf auth login` or set HF_TOKEN, "
                           f"or share {folder} by hand")
    try:
        url = create_repo(repo_id, private=private, exist_ok=True)
        upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message='Upload from gcvimoe convert hub')
    except Exception as e:  # network, authentication and repository errors all reach the user as one line
        raise GcvimoeError(f"--push-to-hub {repo_id} failed: {first_line(str(e))}; {folder} is written, push it "
                           f"again when the Hub is reachable") from None
    return str(url)
