"""The training configuration: one typed, flat dataclass, loaded from YAML and overridden from the command line.

Precedence, lowest first: the dataclass defaults, the checkpoint's config when resuming, the ``-c/--config`` YAML
file, then ``--key value`` options. Every key is checked: an unknown key names the nearest valid one, a value of the
wrong type names the expected type.

The learning rate follows the global batch (``batch_size * grad_accum_steps * world_size``): when
``lr_batch_size`` is set, the LR used is ``lr * global_batch / lr_batch_size`` (``lr_scale: linear``) or
``lr * sqrt(global_batch / lr_batch_size)`` (``lr_scale: sqrt``); when it is null, ``lr`` is used as given.
"""
import dataclasses
import importlib.resources
import warnings
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

import yaml

from gcvimoe.data.sources import default_dataset
from gcvimoe.errors import GcvimoeError, did_you_mean
from gcvimoe.fields import AT_LEAST_1, NOT_NEGATIVE, Check, Fields, option
from gcvimoe.files import write_text
from gcvimoe.moe import GCVIMOE, MoEConfig
from gcvimoe.moe import config as moe_config
from gcvimoe.train.durations import parse_duration, parse_save_interval


_LOW_HIGH = Check(lambda pair, config: len(pair) == 2 and pair[0] <= pair[1], "must be [low, high] with low <= high")
_POSITIVE_DURATION = Check(lambda text, config: parse_duration("dist_timeout", text) > 0, "must be positive")
# parse_save_interval raises its own one-line error naming the forms it reads
_STEPS_OR_DURATION = Check(lambda text, config: bool(parse_save_interval(text)), "must be steps or a duration")


@dataclass
class TrainConfig:
    """Every setting of a training run. YAML files and ``--key value`` options use these names.

    The defaults train a small model (gcvimoe_nano) on the embedded digits in a few minutes on a CPU; the demo's
    tuned recipe is the built-in ``-c digits``; the other built-in configs (:func:`builtin_configs`) hold the
    Fashion-MNIST and ImageNet recipes of the original GCViMoE project. The MoE options live in the ``moe`` section,
    a :class:`gcvimoe.moe.MoEConfig` whose defaults are the GCViMoE recipe.
    """
    # model
    model: str = option("gcvimoe_pico", "registered model name (gcvimoe_pico, gcvimoe_nano, gcvimoe_xxtiny ... "
                                        "gcvimoe_large)")
    drop_path_rate: Optional[float] = option(None, "stochastic depth rate (null = from the data: 0.1 for 5,000 "
                                                   "training images or fewer, 0 from 50,000, log-linear between)")
    moe: MoEConfig = option(GCVIMOE, "the MoE options (an moe: section in YAML; flags --num-experts, --top-k, ...); "
                                     "see gcvimoe.moe.MoEConfig")
    model_kwargs: Dict[str, Any] = option({}, "extra keyword arguments for the model constructor")
    grad_checkpointing: bool = option(False, "recompute activations in backward to save memory")
    initial_checkpoint: str = option("", "start from these weights: a timm gcvit_* or gcvimoe file, a model folder, "
                                         "local-dir:DIR or hf-hub:NAME; dense weights into a MoE model are upcycled")
    noise_std: float = option(0.0, "noise added to each expert copy when upcycling dense initial weights")
    # data
    dataset: str = option("", "digits, fashion-mnist, folder, wds (tar shards) or hfds:NAME (a saved Hugging Face "
                              "dataset) ('' = from data_dir: shards or a folder; digits without one)")
    data_dir: str = option("", "ImageNet-style folder with train/ and val/ class folders, tar shards (a folder or "
                               "'DIR/train-{000000..000127}.tar'), or the Fashion-MNIST files")
    img_size: Optional[int] = option(None, "input image size in pixels (null = from the data: a folder's median image "
                                           "side rounded up to a multiple of 32, at most 224; 32 for digits and "
                                           "Fashion-MNIST)", check=AT_LEAST_1)
    in_chans: Optional[int] = option(None, "input channels, 1 = grayscale, 3 = RGB (null = from the data: 1 when every "
                                           "sampled image of a folder is grey)",
                                     check=Check(lambda n, config: n in (1, 3), "must be 1 or 3"))
    workers: Optional[int] = option(None, "data loading processes per training process (0 = load in the main "
                                          "process; null = from the machine: 0 for the in-memory digits and "
                                          "Fashion-MNIST, else the CPU cores per process less one, at most 8)",
                                    check=NOT_NEGATIVE)
    check_data: bool = option(False, "decode every image of a folder before training and list the unreadable ones")
    strict_data: bool = option(False, "stop at the first unreadable image (default: skip it, count it in the epoch "
                                      "line and list it in bad_files.txt)")
    max_bad_fraction: float = option(0.01, "stop when more than this share of a split's images is unreadable",
                                     check=Check(lambda share, config: 0 <= share <= 1, "must be in [0, 1]"))
    # augmentation (timm transforms, Mixup/CutMix)
    scale: Optional[List[float]] = option(None, "random-resized-crop area range (null = from the data: stronger crops "
                                                "for fewer or larger images, see gcvimoe.train.recipe)",
                                          check=_LOW_HIGH)
    ratio: List[float] = option([0.8, 1.25], "random-resized-crop aspect-ratio range", check=_LOW_HIGH)
    hflip: Optional[float] = option(None, "horizontal flip probability (null = decided from the training images: 0 "
                                          "when mirroring them costs a probe its accuracy, as for text and digits, "
                                          "else 0.5)", check=NOT_NEGATIVE)
    color_jitter: float = option(0.0, "colour jitter strength (0 = off)", check=NOT_NEGATIVE)
    auto_augment: Optional[str] = option(None, "timm auto-augment policy, e.g. rand-m9-mstd0.5-inc1 (null = off)")
    reprob: float = option(0.0, "random erasing probability", check=NOT_NEGATIVE)
    interpolation: str = option("bicubic", "resize interpolation", choices=("bicubic", "bilinear", "nearest"))
    crop_pct: float = option(1.0, "evaluation centre-crop fraction")
    mixup: float = option(0.0, "mixup alpha (0 = off)", check=NOT_NEGATIVE)
    cutmix: float = option(0.0, "cutmix alpha (0 = off)", check=NOT_NEGATIVE)
    mixup_prob: float = option(1.0, "probability of applying mixup or cutmix to a batch")
    mixup_switch_prob: float = option(0.5, "probability of cutmix instead of mixup when both are on")
    mixup_mode: str = option("batch", "mixup granularity", choices=("batch", "pair", "elem"))
    smoothing: float = option(0.1, "label smoothing",
                              check=(NOT_NEGATIVE, Check(lambda eps, config: eps < 1, "must be in [0, 1)")))
    # optimisation (timm optimiser and scheduler factories)
    epochs: int = option(16, "epochs of the LR schedule (cooldown epochs come after, as in timm)", check=AT_LEAST_1)
    batch_size: int = option(128, "images per process per step", check=AT_LEAST_1)
    eval_batch_size: Optional[int] = option(None, "images per evaluation batch (null = batch_size)", check=AT_LEAST_1)
    grad_accum_steps: int = option(1, "micro-batches accumulated per optimiser step", check=AT_LEAST_1)
    opt: str = option("adamw", "timm optimiser name")
    lr: float = option(2e-3, "peak learning rate (for a global batch of lr_batch_size when that is set)",
                       check=NOT_NEGATIVE)
    lr_batch_size: Optional[int] = option(None, "global batch that lr is given for; null = use lr as given")
    lr_scale: str = option("linear", "how the LR follows the global batch", choices=("linear", "sqrt"))
    layer_decay: Optional[float] = option(None, "layer-wise LR decay, as timm's --layer-decay: each block group "
                                                "nearer the input gets this factor more of the LR (null = off; "
                                                "fine-tuning uses 0.75)",
                                          check=Check(lambda decay, config: 0 < decay <= 1, "must be in (0, 1]"))
    weight_decay: float = option(0.05, "weight decay (not applied to norms, biases and no_weight_decay params)",
                                 check=NOT_NEGATIVE)
    momentum: float = option(0.9, "momentum (SGD-style optimisers)")
    opt_eps: Optional[float] = option(None, "optimiser epsilon (null = optimiser default)")
    opt_betas: Optional[List[float]] = option(None, "optimiser betas (null = optimiser default)")
    clip_grad: Optional[float] = option(5.0, "gradient clipping threshold (null = off)")
    clip_mode: str = option("norm", "gradient clipping mode", choices=("norm", "value", "agc"))
    sched: str = option("cosine", "timm LR schedule", choices=("cosine", "tanh", "step", "multistep", "poly",
                                                                "constant", "none"))
    warmup_epochs: Optional[float] = option(None, "epochs of linear LR warmup, fractions too (null = from the data: "
                                                  "about 500 updates, at most a quarter of the epochs)",
                                            check=NOT_NEGATIVE)
    warmup_lr: float = option(1e-5, "LR at the start of warmup")
    min_lr: float = option(1e-5, "LR at the end of the schedule")
    cooldown_epochs: int = option(0, "epochs at min_lr after the schedule", check=NOT_NEGATIVE)
    sched_on_updates: bool = option(True, "step the schedule every optimiser update rather than every epoch")
    # model averaging
    ema: bool = option(False, "keep an exponential moving average of the weights (evaluated each epoch)")
    ema_decay: float = option(0.9998, "EMA decay")
    ema_warmup: bool = option(False, "ramp the EMA decay up over the first steps")
    # runtime
    device: str = option("auto", "auto, cpu, cuda or cuda:N")
    amp: bool = option(False, "mixed precision on GPU (ignored on CPU)")
    amp_dtype: str = option("bfloat16", "mixed precision type (float16 uses a GradScaler)",
                            choices=("bfloat16", "float16"))
    channels_last: bool = option(False, "channels-last memory layout")
    compile: Union[bool, str] = option(False, "torch.compile the model: true (one graph), or regional (each block its "
                                              "own graph: a fraction of the compile time, for big models)",
                                       choices=(False, True, "regional"))
    expert_parallel: bool = option(False, "with several processes, shard every MoE layer's experts over them (expert "
                                          "parallelism: num_experts / processes experts each, all-to-all)")
    dist_timeout: str = option("10m", "with several processes, how long one may wait for the others (in a collective, "
                                      "or without a heartbeat) before the job ends naming the process that stopped: "
                                      "seconds, or 90s, 10m, 1h",
                               check=_POSITIVE_DURATION)
    threads: Optional[int] = option(None, "CPU threads per process (null = from the machine: the cores per process "
                                          "less the loader processes, at least 1)", check=AT_LEAST_1)
    seed: int = option(42, "random seed (each process adds its rank)")
    # output
    output: str = option("", "output folder ('' = output/train/<time>-<model>-<dataset>)")
    checkpoint_format: str = option("auto", "file (one .pth holding every expert) or sharded (a folder per checkpoint, "
                                            "each process writing its own experts; resumes on any process count); "
                                            "auto = sharded under expert parallelism, else file",
                                    choices=("auto", "file", "sharded"))
    checkpoint_every: int = option(0, "also keep checkpoint-<epoch>.pth every N epochs (0 = off)", check=NOT_NEGATIVE)
    save_interval: str = option("", "also save last.pth inside epochs: every N optimiser steps (500) or minutes (10m, "
                                    "90s, 2h); '' = at epoch ends only. SIGTERM, SIGINT and SIGUSR1 always save",
                                check=_STEPS_OR_DURATION)
    keep_last: int = option(3, "how many checkpoint-<epoch>.pth files to keep, newest first (0 = all)",
                            check=NOT_NEGATIVE)
    overwrite: bool = option(False, "replace a previous run in the output folder (refused otherwise, unless resuming)")
    log_interval: int = option(0, "training micro-batches between step lines and TensorBoard points (0 = about 5 "
                                  "per epoch)", check=NOT_NEGATIVE)
    tensorboard: bool = option(True, "log scalars to TensorBoard in <output>/tensorboard when tensorboard is installed")
    log_wandb: bool = option(False, "also log to Weights & Biases when wandb is installed (WANDB_MODE=offline works "
                                    "without a network)")

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    def model_args(self) -> Dict[str, Any]:
        """Constructor arguments the config decides (the data adds classes, channels and size)."""
        args: Dict[str, Any] = {"moe": self.moe.to_dict()}
        if self.drop_path_rate is not None:
            args["drop_path_rate"] = self.drop_path_rate
        args.update(self.model_kwargs)
        return args

    @property
    def resolved_dataset(self) -> str:
        """The dataset name with the default applied: what ``data_dir`` holds (shards, a folder), else digits."""
        return self.dataset or default_dataset(self.data_dir)


FIELDS = Fields(TrainConfig, finite=True)
"""The config keys by name, with their types, coercion, checks and ``--flags`` (see :class:`gcvimoe.fields.Fields`);
the MoE options are :data:`gcvimoe.moe.config.FIELDS`."""


def suggest_key(name: str) -> str:
    """The end of an unknown-key message: the nearest valid key, or where to find them all."""
    hint = did_you_mean(name.replace("-", "_"), [*FIELDS, *moe_config.FIELDS])
    return f"; {hint}" if hint else "; run `gcvimoe train --help` for the keys"


def apply_overrides(cfg: TrainConfig, overrides: Mapping[str, Any], source: str, flat_moe_ok: bool = True
                    ) -> TrainConfig:
    """Return a copy of ``cfg`` with ``overrides`` applied, each key and value checked.

    Args:
        cfg: The config to start from.
        overrides: Key to value; keys may use dashes or underscores. MoE options go in an ``moe`` mapping; given flat
            (``top_k: 2``, the form of gcvimoe 0.1 files) they are taken as MoE options too.
        source: Where the overrides come from, named in error messages.
        flat_moe_ok: Take flat MoE options silently (command-line flags, old checkpoints); otherwise warn that the
            flat form in a file is deprecated.
    """
    values, moe_values = {}, {}
    for raw_key, value in overrides.items():
        key = str(raw_key).replace("-", "_")
        if key == "moe":
            if not isinstance(value, Mapping):
                raise GcvimoeError(f"config key 'moe' in {source} must be a mapping of MoE options, got {value!r}")
            for moe_key, moe_value in value.items():
                moe_key = str(moe_key).replace("-", "_")
                if moe_key not in moe_config.FIELDS:
                    hint = did_you_mean(moe_key, moe_config.FIELDS, "see gcvimoe.moe.MoEConfig")
                    raise GcvimoeError(f"unknown MoE option 'moe.{moe_key}' in {source}; {hint}")
                moe_values[moe_key] = moe_config.FIELDS.coerce(moe_key, moe_value)
        elif key in moe_config.FIELDS:
            if value is None:  # gcvimoe 0.1 wrote null for "the model's default", which the moe section now holds
                continue
            if not flat_moe_ok:
                warnings.warn(f"{source}: the MoE option '{key}' at the top level is deprecated; put it under 'moe:'",
                              FutureWarning, stacklevel=2)
            moe_values[key] = moe_config.FIELDS.coerce(key, value)
        elif key not in FIELDS:
            raise GcvimoeError(f"unknown config key '{raw_key}' in {source}{suggest_key(key)}")
        else:
            values[key] = FIELDS.coerce(key, value)
    if moe_values:
        values["moe"] = cfg.moe.replace(**moe_values)
    return dataclasses.replace(cfg, **values)


def builtin_configs() -> Dict[str, Path]:
    """The configs shipped inside the package, by name (``digits``, ``fashion_mnist``, ``gcvimoe_tiny``, ...)."""
    root = importlib.resources.files("gcvimoe") / "configs"
    return {Path(entry.name).stem: Path(str(entry)) for entry in root.iterdir() if entry.name.endswith(".yaml")}


FINETUNE_CONFIG = "finetune"
"""The built-in recipe a run starting from weights (``initial_checkpoint``) uses when no ``-c`` names one."""

CONFIG_ALIASES = {"imagenet": "gcvimoe_tiny"}
"""Recipe names for built-in configs: ``-c imagenet`` is GCViMoE-T's ImageNet-1K recipe, the default ImageNet run."""


def find_config(name_or_path) -> Path:
    """A YAML file path, or the built-in config of that name (``-c fashion_mnist`` works from any folder)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    if path.suffix in (".yaml", ".yml") and len(path.parts) > 1:
        raise GcvimoeError(f"config file {path} not found; pass -c with the path of a YAML file or a built-in name "
                           f"({', '.join(sorted(builtin_configs()))})")
    builtins = builtin_configs()
    key = path.stem if path.suffix in (".yaml", ".yml") and len(path.parts) == 1 else str(name_or_path)
    key = key.replace("-", "_")
    key = CONFIG_ALIASES.get(key, key)
    if key in builtins:
        return builtins[key]
    names = sorted([*builtins, *CONFIG_ALIASES])
    hint = did_you_mean(key, names, fallback="pass the path of a YAML file")
    raise GcvimoeError(f"config {str(name_or_path)!r} is neither a file nor a built-in config ({', '.join(names)}); "
                       f"{hint}")


def load_yaml(path) -> Dict[str, Any]:
    """Read a YAML config file (or a built-in config by name) into a dict, with one-line errors."""
    path = find_config(path)
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise GcvimoeError(f"config file {path} is not valid YAML{where}; fix the syntax") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise GcvimoeError(f"config file {path} must hold a mapping of key: value lines")
    return data


def parse_cli_value(name: str, text: str) -> Any:
    """Turn a command-line string into the type of key ``name`` (lists as ``a,b`` or YAML, null as ``null``)."""
    return (moe_config.FIELDS if name in moe_config.FIELDS else FIELDS).parse_text(name, text)


def scaled_lr(cfg: TrainConfig, global_batch: int) -> float:
    """The peak LR for ``global_batch`` images per optimiser step (see the module docstring)."""
    if not cfg.lr_batch_size:
        return cfg.lr
    ratio = global_batch / cfg.lr_batch_size
    return cfg.lr * (ratio if cfg.lr_scale == "linear" else math.sqrt(ratio))


def build_config(
        config_file: Optional[str] = None,
        cli_overrides: Optional[Mapping[str, Any]] = None,
        base: Optional[Mapping[str, Any]] = None,
        origins: Optional[Dict[str, str]] = None,
) -> TrainConfig:
    """Build the effective config: defaults, then ``base`` (a resumed run's config), the YAML file, the CLI.

    Args:
        config_file: Path of a YAML file or the name of a built-in config, or None.
        cli_overrides: Already-typed values from the command line.
        base: A saved config dict (from a checkpoint) applied before the file.
        origins: When given, filled with where each value that differs from the default came from:
            ``{"epochs": "the command line", "moe.top_k": "config digits", ...}``, for the run's header.
    """
    layers = (
        (base, "the checkpoint's config", "the resumed run", True),
        (load_yaml(config_file) if config_file else None, str(config_file), f"config {config_file}", False),
        (cli_overrides, "the command line", "the command line", True),
    )
    cfg = TrainConfig()
    found: Dict[str, str] = {}
    for values, source, label, flat_moe_ok in layers:
        if values:
            before = _flat(cfg)
            cfg = apply_overrides(cfg, values, source, flat_moe_ok=flat_moe_ok)
            found.update({key: label for key, value in _flat(cfg).items() if value != before[key]})
    FIELDS.check(cfg)
    if origins is not None:
        final, default = _flat(cfg), _flat(TrainConfig())
        origins.update({key: label for key, label in found.items() if final[key] != default[key]})
    return cfg


def _flat(cfg: TrainConfig) -> Dict[str, Any]:
    values = cfg.to_dict()
    moe = values.pop("moe")
    return {**values, **{f"moe.{key}": value for key, value in moe.items()}}


# null in a config: decided by the data and the machine at start (gcvimoe.train.recipe for the last four)
DATA_DERIVED = ("img_size", "in_chans", "workers", "threads", "warmup_epochs", "scale", "hflip", "drop_path_rate")


def config_yaml(cfg: TrainConfig, derived: Optional[TrainConfig] = None, notes: Sequence[str] = ()) -> str:
    """The config as YAML, in the form ``-c`` reads back. The keys the data decides (:data:`DATA_DERIVED`) that
    ``cfg`` leaves null carry a comment: their values from ``derived`` (the config with the data read) and the reason
    its header line gives (``notes``: ``"KEY VALUE (why)"``), or, without ``derived``, that the data decides them at
    start."""
    reasons = {note.split(" ", 1)[0]: note[note.index("(") + 1:-1] for note in notes
               if "(" in note and note.endswith(")")}
    lines = yaml.safe_dump(cfg.to_dict(), sort_keys=False).splitlines()
    for i, line in enumerate(lines):
        key = line.split(":", 1)[0]
        if key in DATA_DERIVED and getattr(cfg, key) is None:
            value = getattr(derived, key) if derived is not None else None
            why = reasons.get(key, "from the data")
            lines[i] = f"{key}: {value}  # {why}" if value is not None else f"{line}  # from the data at start"
    return "\n".join(lines) + "\n"


def save_config(cfg: TrainConfig, path) -> None:
    write_text(path, config_yaml(cfg))
