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
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Union

import yaml

from gcvimoe.data.sources import default_dataset
from gcvimoe.errors import GcvimoeError, did_you_mean
from gcvimoe.files import write_text
from gcvimoe.moe import GCVIMOE, MoEConfig
from gcvimoe.moe import config as moe_config
from gcvimoe.train.durations import parse_duration, parse_save_interval


def _key(default, help: str, choices=None):
    metadata = {"help": help}
    if choices is not None:
        metadata["choices"] = choices
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class TrainConfig:
    """Every setting of a training run. YAML files and ``--key value`` options use these names.

    The defaults train a small model (gcvimoe_nano) on the embedded digits in a few minutes on a CPU; the demo's
    tuned recipe is the built-in ``-c digits``; the other built-in configs (:func:`builtin_configs`) hold the
    Fashion-MNIST and ImageNet recipes of the original GCViMoE project. The MoE options live in the ``moe`` section,
    a :class:`gcvimoe.moe.MoEConfig` whose defaults are the GCViMoE recipe.
    """
    # model
    model: str = _key("gcvimoe_pico", "registered model name (gcvimoe_pico, gcvimoe_nano, gcvimoe_xxtiny ... "
                                      "gcvimoe_large)")
    drop_path_rate: Optional[float] = _key(None, "stochastic depth rate (null = from the data: 0.1 for 5,000 "
                                                 "training images or fewer, 0 from 50,000, log-linear between)")
    moe: MoEConfig = field(default_factory=lambda: GCVIMOE, metadata={
        "help": "the MoE options (an moe: section in YAML; flags --num-experts, --top-k, ...); see gcvimoe.moe.MoEConfig"})
    model_kwargs: Dict[str, Any] = _key({}, "extra keyword arguments for the model constructor")
    grad_checkpointing: bool = _key(False, "recompute activations in backward to save memory")
    initial_checkpoint: str = _key("", "start from these weights: a timm gcvit_* or gcvimoe file, a model folder, "
                                       "local-dir:DIR or hf-hub:NAME; dense weights into a MoE model are upcycled")
    noise_std: float = _key(0.0, "noise added to each expert copy when upcycling dense initial weights")
    # data
    dataset: str = _key("", "digits, fashion-mnist, folder, wds (tar shards) or hfds:NAME (a saved Hugging Face "
                            "dataset) ('' = from data_dir: shards or a folder; digits without one)")
    data_dir: str = _key("", "ImageNet-style folder with train/ and val/ class folders, tar shards (a folder or "
                             "'DIR/train-{000000..000127}.tar'), or the Fashion-MNIST files")
    img_size: Optional[int] = _key(None, "input image size in pixels (null = from the data: a folder's median image "
                                         "side rounded up to a multiple of 32, at most 224; 32 for digits and "
                                         "Fashion-MNIST)")
    in_chans: Optional[int] = _key(None, "input channels, 1 = grayscale, 3 = RGB (null = from the data: 1 when every "
                                         "sampled image of a folder is grey)")
    workers: Optional[int] = _key(None, "data loading processes per training process (0 = load in the main "
                                        "process; null = from the machine: 0 for the in-memory digits and "
                                        "Fashion-MNIST, else the CPU cores per process less one, at most 8)")
    check_data: bool = _key(False, "decode every image of a folder before training and list the unreadable ones")
    strict_data: bool = _key(False, "stop at the first unreadable image (default: skip it, count it in the epoch "
                                    "line and list it in bad_files.txt)")
    max_bad_fraction: float = _key(0.01, "stop when more than this share of a split's images is unreadable")
    # augmentation (timm transforms, Mixup/CutMix)
    scale: Optional[List[float]] = _key(None, "random-resized-crop area range (null = from the data: stronger crops "
                                              "for fewer or larger images, see gcvimoe.train.recipe)")
    ratio: List[float] = _key([0.8, 1.25], "random-resized-crop aspect-ratio range")
    hflip: Optional[float] = _key(None, "horizontal flip probability (null = 0.5 for folders and Fashion-MNIST, 0 "
                                        "for the digits)")
    color_jitter: float = _key(0.0, "colour jitter strength (0 = off)")
    auto_augment: Optional[str] = _key(None, "timm auto-augment policy, e.g. rand-m9-mstd0.5-inc1 (null = off)")
    reprob: float = _key(0.0, "random erasing probability")
    interpolation: str = _key("bicubic", "resize interpolation", choices=("bicubic", "bilinear", "nearest"))
    crop_pct: float = _key(1.0, "evaluation centre-crop fraction")
    mixup: float = _key(0.0, "mixup alpha (0 = off)")
    cutmix: float = _key(0.0, "cutmix alpha (0 = off)")
    mixup_prob: float = _key(1.0, "probability of applying mixup or cutmix to a batch")
    mixup_switch_prob: float = _key(0.5, "probability of cutmix instead of mixup when both are on")
    mixup_mode: str = _key("batch", "mixup granularity", choices=("batch", "pair", "elem"))
    smoothing: float = _key(0.1, "label smoothing")
    # optimisation (timm optimiser and scheduler factories)
    epochs: int = _key(16, "epochs of the LR schedule (cooldown epochs come after, as in timm)")
    batch_size: int = _key(128, "images per process per step")
    eval_batch_size: Optional[int] = _key(None, "images per evaluation batch (null = batch_size)")
    grad_accum_steps: int = _key(1, "micro-batches accumulated per optimiser step")
    opt: str = _key("adamw", "timm optimiser name")
    lr: float = _key(2e-3, "peak learning rate (for a global batch of lr_batch_size when that is set)")
    lr_batch_size: Optional[int] = _key(None, "global batch that lr is given for; null = use lr as given")
    lr_scale: str = _key("linear", "how the LR follows the global batch", choices=("linear", "sqrt"))
    weight_decay: float = _key(0.05, "weight decay (not applied to norms, biases and no_weight_decay params)")
    momentum: float = _key(0.9, "momentum (SGD-style optimisers)")
    opt_eps: Optional[float] = _key(None, "optimiser epsilon (null = optimiser default)")
    opt_betas: Optional[List[float]] = _key(None, "optimiser betas (null = optimiser default)")
    clip_grad: Optional[float] = _key(5.0, "gradient clipping threshold (null = off)")
    clip_mode: str = _key("norm", "gradient clipping mode", choices=("norm", "value", "agc"))
    sched: str = _key("cosine", "timm LR schedule", choices=("cosine", "tanh", "step", "multistep", "poly",
                                                              "constant", "none"))
    warmup_epochs: Optional[float] = _key(None, "epochs of linear LR warmup, fractions too (null = from the data: "
                                                "about 500 updates, at most a quarter of the epochs)")
    warmup_lr: float = _key(1e-5, "LR at the start of warmup")
    min_lr: float = _key(1e-5, "LR at the end of the schedule")
    cooldown_epochs: int = _key(0, "epochs at min_lr after the schedule")
    sched_on_updates: bool = _key(True, "step the schedule every optimiser update rather than every epoch")
    # model averaging
    ema: bool = _key(False, "keep an exponential moving average of the weights (evaluated each epoch)")
    ema_decay: float = _key(0.9998, "EMA decay")
    ema_warmup: bool = _key(False, "ramp the EMA decay up over the first steps")
    # runtime
    device: str = _key("auto", "auto, cpu, cuda or cuda:N")
    amp: bool = _key(False, "mixed precision on GPU (ignored on CPU)")
    amp_dtype: str = _key("bfloat16", "mixed precision type (float16 uses a GradScaler)",
                          choices=("bfloat16", "float16"))
    channels_last: bool = _key(False, "channels-last memory layout")
    compile: Union[bool, str] = _key(False, "torch.compile the model: true (one graph), or regional (each block its "
                                            "own graph: a fraction of the compile time, for big models)",
                                     choices=(False, True, "regional"))
    expert_parallel: bool = _key(False, "with several processes, shard every MoE layer's experts over them (expert "
                                        "parallelism: num_experts / processes experts each, all-to-all)")
    dist_timeout: str = _key("10m", "with several processes, how long one may wait for the others (in a collective, "
                                    "or without a heartbeat) before the job ends naming the process that stopped: "
                                    "seconds, or 90s, 10m, 1h")
    threads: Optional[int] = _key(None, "CPU threads per process (null = from the machine: the cores per process "
                                        "less the loader processes, at least 1)")
    seed: int = _key(42, "random seed (each process adds its rank)")
    # output
    output: str = _key("", "output folder ('' = output/train/<time>-<model>-<dataset>)")
    checkpoint_format: str = _key("auto", "file (one .pth holding every expert) or sharded (a folder per checkpoint, "
                                          "each process writing its own experts; resumes on any process count); "
                                          "auto = sharded under expert parallelism, else file",
                                  choices=("auto", "file", "sharded"))
    checkpoint_every: int = _key(0, "also keep checkpoint-<epoch>.pth every N epochs (0 = off)")
    save_interval: str = _key("", "also save last.pth inside epochs: every N optimiser steps (500) or minutes (10m, "
                                  "90s, 2h); '' = at epoch ends only. SIGTERM, SIGINT and SIGUSR1 always save")
    keep_last: int = _key(3, "how many checkpoint-<epoch>.pth files to keep, newest first (0 = all)")
    overwrite: bool = _key(False, "replace a previous run in the output folder (refused otherwise, unless resuming)")
    log_interval: int = _key(0, "training micro-batches between step lines and TensorBoard points (0 = about 5 "
                                "per epoch)")
    tensorboard: bool = _key(True, "log scalars to TensorBoard in <output>/tensorboard when tensorboard is installed")
    log_wandb: bool = _key(False, "also log to Weights & Biases when wandb is installed (WANDB_MODE=offline works "
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


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
FIELD_TYPES = typing.get_type_hints(TrainConfig)


_PLURALS = {int: "integers", float: "numbers", str: "strings", bool: "booleans"}


def _type_name(tp) -> str:
    if typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if type(None) not in typing.get_args(tp):
            return " or ".join(_type_name(a) for a in args)
        return f"{_type_name(args[0])} or null"
    origin = typing.get_origin(tp)
    if origin in (list, List):
        return f"a list of {_PLURALS[typing.get_args(tp)[0]]}"
    if origin in (dict, Dict):
        return "a mapping"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(tp, str(tp))


def _field_type(name: str):
    return moe_config.FIELD_TYPES[name] if name in moe_config.FIELDS else FIELD_TYPES[name]


_NOT_A_MATCH = object()


def _as_float(value: Any):
    # PyYAML reads 5e-3 (no dot) as a string, so numbers written that way are accepted too
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            return _NOT_A_MATCH
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return _NOT_A_MATCH


_SCALARS = {
    bool: lambda v: v if isinstance(v, bool) else _NOT_A_MATCH,
    int: lambda v: v if isinstance(v, int) and not isinstance(v, bool) else _NOT_A_MATCH,
    float: _as_float,
    str: lambda v: v if isinstance(v, str) else _NOT_A_MATCH,
}


def _coerce_value(name: str, value: Any, tp):
    """``value`` in type ``tp``, or ``_NOT_A_MATCH``."""
    if tp in _SCALARS:
        return _SCALARS[tp](value)
    origin = typing.get_origin(tp)
    if origin in (list, List):
        if not isinstance(value, (list, tuple)):
            return _NOT_A_MATCH
        return [_coerce(name, v, typing.get_args(tp)[0]) for v in value]
    if origin in (dict, Dict):
        return value if isinstance(value, dict) else _NOT_A_MATCH
    return value


def _coerce(name: str, value: Any, tp=None):
    """Check ``value`` against the type of key ``name`` and return it in that type, or raise a one-line error."""
    tp = tp or _field_type(name)
    coerced = _NOT_A_MATCH
    if typing.get_origin(tp) is typing.Union:
        if value is None:
            return None
        for option in (a for a in typing.get_args(tp) if a is not type(None)):  # the first type that takes it
            coerced = _coerce_value(name, value, option)
            if coerced is not _NOT_A_MATCH:
                break
    else:
        coerced = _coerce_value(name, value, tp)
    if coerced is _NOT_A_MATCH:
        raise GcvimoeError(f"config key '{name}' must be {_type_name(_field_type(name))}, got {value!r}")
    choices = (moe_config.FIELDS.get(name) or FIELDS[name]).metadata.get("choices")
    if choices is not None and coerced not in choices:
        shown = ", ".join(repr(c) if c == "" else str(c).lower() if isinstance(c, bool) else c for c in choices)
        raise GcvimoeError(f"config key '{name}' must be one of {shown}, got {coerced!r}")
    return coerced


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
                moe_values[moe_key] = _coerce(moe_key, moe_value)
        elif key in moe_config.FIELDS:
            if value is None:  # gcvimoe 0.1 wrote null for "the model's default", which the moe section now holds
                continue
            if not flat_moe_ok:
                warnings.warn(f"{source}: the MoE option '{key}' at the top level is deprecated; put it under 'moe:'",
                              FutureWarning, stacklevel=2)
            moe_values[key] = _coerce(key, value)
        elif key not in FIELDS:
            raise GcvimoeError(f"unknown config key '{raw_key}' in {source}{suggest_key(key)}")
        else:
            values[key] = _coerce(key, value)
    if moe_values:
        values["moe"] = cfg.moe.replace(**moe_values)
    return dataclasses.replace(cfg, **values)


def builtin_configs() -> Dict[str, Path]:
    """The configs shipped inside the package, by name (``digits``, ``fashion_mnist``, ``gcvimoe_tiny``, ...)."""
    root = importlib.resources.files("gcvimoe") / "configs"
    return {Path(entry.name).stem: Path(str(entry)) for entry in root.iterdir() if entry.name.endswith(".yaml")}


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
    tp = _field_type(name)
    if typing.get_origin(tp) is typing.Union:
        if text.lower() in ("null", "none", "~"):
            return None
        options = [a for a in typing.get_args(tp) if a is not type(None)]
        if options[:2] == [bool, str]:  # a switch with named modes (compile: true or regional)
            return parse_cli_value_as(name, text, bool) if text.lower() in _BOOL_WORDS else text
        tp = options[0]
    return parse_cli_value_as(name, text, tp)


_BOOL_WORDS = ("true", "yes", "on", "1", "false", "no", "off", "0")


def parse_cli_value_as(name: str, text: str, tp) -> Any:
    """``text`` as a value of type ``tp`` for key ``name``."""
    try:
        if tp is bool:
            lowered = text.lower()
            if lowered in ("true", "yes", "on", "1"):
                return True
            if lowered in ("false", "no", "off", "0"):
                return False
            raise ValueError(text)
        if tp is int:
            return int(text)
        if tp is float:
            return float(text)
        if tp is str:
            return text
        if typing.get_origin(tp) in (list, List):
            items = yaml.safe_load(text) if text.strip().startswith("[") else text.split(",")
            item_type = typing.get_args(tp)[0]
            return [item_type(item) if isinstance(item, str) else item for item in items]
        return yaml.safe_load(text)
    except (ValueError, TypeError, yaml.YAMLError):
        option = "--" + name.replace("_", "-")
        raise GcvimoeError(f"{option} must be {_type_name(tp)}, got {text!r}") from None


def _check_numbers(cfg: TrainConfig) -> None:
    """Every number of the config, list items included, is finite (``nan`` and ``inf`` pass a type check), and
    ``max_bad_fraction`` is a fraction."""
    for name, value in cfg.to_dict().items():
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, float) and not math.isfinite(item):
                raise GcvimoeError(f"config key '{name}' must be a finite number, got {item}")
    if not 0.0 <= cfg.max_bad_fraction <= 1.0:
        raise GcvimoeError(f"config key 'max_bad_fraction' must be in [0, 1], got {cfg.max_bad_fraction}")


def check_values(cfg: TrainConfig) -> None:
    """Range checks that a type alone cannot express."""
    if parse_duration("dist_timeout", cfg.dist_timeout) <= 0:
        raise GcvimoeError(f"config key 'dist_timeout' must be positive, got {cfg.dist_timeout!r}")
    _check_numbers(cfg)
    parse_save_interval(cfg.save_interval)
    positive = ("epochs", "batch_size", "grad_accum_steps", "img_size")
    for name in positive:
        if getattr(cfg, name) is not None and getattr(cfg, name) < 1:
            raise GcvimoeError(f"config key '{name}' must be at least 1, got {getattr(cfg, name)}")
    non_negative = ("workers", "warmup_epochs", "cooldown_epochs", "checkpoint_every", "lr", "weight_decay",
                    "smoothing", "mixup", "cutmix", "reprob", "color_jitter", "hflip", "log_interval")
    for name in non_negative:
        if getattr(cfg, name) is not None and getattr(cfg, name) < 0:
            raise GcvimoeError(f"config key '{name}' must not be negative, got {getattr(cfg, name)}")
    if cfg.eval_batch_size is not None and cfg.eval_batch_size < 1:
        raise GcvimoeError(f"config key 'eval_batch_size' must be at least 1, got {cfg.eval_batch_size}")
    if cfg.threads is not None and cfg.threads < 1:
        raise GcvimoeError(f"config key 'threads' must be at least 1, got {cfg.threads}")
    if cfg.in_chans is not None and cfg.in_chans not in (1, 3):
        raise GcvimoeError(f"config key 'in_chans' must be 1 or 3, got {cfg.in_chans}")
    for name in ("scale", "ratio"):
        value = getattr(cfg, name)
        if value is not None and (len(value) != 2 or value[0] > value[1]):
            raise GcvimoeError(f"config key '{name}' must be [low, high] with low <= high, got {value}")
    if not 0.0 <= cfg.smoothing < 1.0:
        raise GcvimoeError(f"config key 'smoothing' must be in [0, 1), got {cfg.smoothing}")


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
    check_values(cfg)
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


def config_yaml(cfg: TrainConfig, derived: Optional[TrainConfig] = None) -> str:
    """The config as YAML, in the form ``-c`` reads back. The keys the data decides (:data:`DATA_DERIVED`) that
    ``cfg`` leaves null carry a comment: their values from ``derived`` (the config with the data read), or, without
    it, that the data decides them at start."""
    lines = yaml.safe_dump(cfg.to_dict(), sort_keys=False).splitlines()
    for i, line in enumerate(lines):
        key = line.split(":", 1)[0]
        if key in DATA_DERIVED and getattr(cfg, key) is None:
            value = getattr(derived, key) if derived is not None else None
            lines[i] = f"{key}: {value}  # from the data" if value is not None else f"{line}  # from the data at start"
    return "\n".join(lines) + "\n"


def save_config(cfg: TrainConfig, path) -> None:
    write_text(path, config_yaml(cfg))
