"""Flags that several subcommands share, so that each has one name and one meaning, and the plotting callback."""
import argparse
from pathlib import Path

from gcvimoe.moe import config as moe_config
from gcvimoe.moe import moe_layers
from gcvimoe.train import Callback

DEVICE_HELP = "auto (the GPU when there is one), cpu, cuda or cuda:N"


def add_device(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", help=DEVICE_HELP)


CHECKPOINT_HELP = ("a training checkpoint (last.pth, best.pth), a .safetensors export, a model folder (RUN/model), "
                   "local-dir:DIR or hf-hub:NAME (local cache only)")


def add_checkpoint(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, metavar="CKPT", help=CHECKPOINT_HELP)


def add_use_ema(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--use-ema", action="store_true", help="use the EMA weights of a training checkpoint")


def add_json(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON instead of the report")


INTERPOLATIONS = ("bilinear", "bicubic", "nearest", "lanczos", "box", "hamming")


def add_preprocessing(parser: argparse.ArgumentParser) -> None:
    """timm validate.py's preprocessing flags, absent unless given (the file's own preprocessing applies); read them
    back with :func:`preprocessing_overrides`."""
    group = parser.add_argument_group("preprocessing (timm's flags; default: what the checkpoint records)")
    group.add_argument("--img-size", type=int, metavar="N", help="input height and width")
    group.add_argument("--input-size", type=int, nargs=3, metavar=("C", "H", "W"),
                       help="input channels, height and width (square; C as the model's)")
    group.add_argument("--crop-pct", type=float, metavar="PCT", help="centre-crop fraction (1.0: resize only)")
    group.add_argument("--mean", type=float, nargs="+", metavar="MEAN", help="per-channel mean (one value: all)")
    group.add_argument("--std", type=float, nargs="+", metavar="STD", help="per-channel std (one value: all)")
    group.add_argument("--interpolation", choices=INTERPOLATIONS, help="resize interpolation")


def preprocessing_overrides(args: argparse.Namespace) -> dict:
    """The flags of :func:`add_preprocessing` under timm's ``args`` names, None where not given."""
    return {key: getattr(args, key) for key in ("img_size", "input_size", "crop_pct", "mean", "std", "interpolation")}


def add_moe_options(parser: argparse.ArgumentParser, title: str = "MoE options") -> None:
    """``--num-experts``, ``--top-k``, ... generated from :class:`gcvimoe.moe.MoEConfig`, absent unless given (read
    them back with ``gcvimoe.moe.config.FIELDS.from_args``); ``--help`` shows the GCViMoE recipe's defaults."""
    moe_config.FIELDS.add_flags(parser, moe_config.GCVIMOE.to_dict(), title=title)


class PlotCallback(Callback):
    """Redraws ``curves.png`` and ``expert_usage.png`` (the latest epoch's evaluation) in the run folder after every
    epoch, from the records the loop hands over (the loop never draws).

    Steps are kept as at most ``POINTS_PER_EPOCH`` averaged points per epoch, so a long run stays small to hold and
    quick to draw.
    """

    POINTS_PER_EPOCH = 200

    def __init__(self):
        self.steps = {"epoch": [], "loss": [], "aux_loss": [], "lr": []}
        self._bucket = []
        self._drawn_epoch = None

    def on_step_end(self, run, epoch, batch_idx, record) -> None:
        num_batches = max(len(run.train_loader), 1)
        self._bucket.append((record["loss"], record["aux_loss"], record["lr"]))
        bucket_size = -(-num_batches // self.POINTS_PER_EPOCH)
        if len(self._bucket) == bucket_size or batch_idx == num_batches - 1:
            losses, aux_losses, lrs = zip(*self._bucket)
            self.steps["epoch"].append(epoch + (batch_idx + 1) / num_batches)
            self.steps["loss"].append(sum(losses) / len(losses))
            self.steps["aux_loss"].append(sum(aux_losses) / len(aux_losses))
            self.steps["lr"].append(lrs[-1])
            self._bucket = []

    def on_epoch_end(self, run, state, eval_result) -> None:
        self._draw(run, state, eval_result)

    def on_train_end(self, run, state, eval_result) -> None:
        if self._drawn_epoch != state.history[-1]["epoch"]:  # a resumed run with no epoch left to train
            self._draw(run, state, eval_result)

    def _draw(self, run, state, eval_result) -> None:
        from gcvimoe.analysis import plot_expert_usage, plot_training_curves
        from gcvimoe.analysis.style import capacity_applies
        output_dir = Path(run.output_dir)
        self._drawn_epoch = state.history[-1]["epoch"]
        plot_training_curves(state.history, output_dir / "curves.png", steps=self.steps,
                             train_loss_label=train_loss_label(run.cfg))
        if eval_result and eval_result.get("experts"):
            epoch = state.history[-1]["epoch"]
            show_dropped = any(capacity_applies(layer) for _, layer in moe_layers(run.model))
            plot_expert_usage(eval_result["experts"], output_dir / "expert_usage.png", show_dropped=show_dropped,
                              title=f"expert usage on the val set after epoch {epoch} of {run.total_epochs}")


def train_loss_label(cfg) -> str:
    """What the training loss is, in the words a legend needs (see the trainer's loss choice)."""
    if cfg.mixup > 0 or cfg.cutmix > 0:
        return "train loss (soft-target CE, Mixup/CutMix)"
    if cfg.smoothing > 0:
        return f"train loss (label-smoothed CE, smoothing {cfg.smoothing:g})"
    return "train loss (CE)"
