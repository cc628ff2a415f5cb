"""The preprocessing that validate and predict apply, and where each value came from.

A training checkpoint, an export or a model folder records the preprocessing it was trained with; a plain state dict
has only its model's timm ``pretrained_cfg``, its weights (the stem's input channels) and the data named with it.
timm's flags (``--img-size``, ``--input-size``, ``--crop-pct``, ``--mean``, ``--std``, ``--interpolation``) override
either, resolved by timm's own :func:`timm.data.resolve_data_config`, so a value means what it means to timm.
"""
import dataclasses
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional

from timm.data import resolve_data_config as timm_data_config

from gcvimoe.data import DataConfig
from gcvimoe.errors import GcvimoeError

FLAGS = {"img_size": "--img-size", "input_size": "--input-size", "crop_pct": "--crop-pct", "mean": "--mean",
         "std": "--std", "interpolation": "--interpolation"}
"""The override keys (timm's ``args`` names) and the flag that sets each."""

SHOWN = ("input_size", "crop_pct", "interpolation", "mean", "std")


@dataclass
class Preprocessing:
    """An evaluation's preprocessing and, per value of :data:`SHOWN`, where it came from ('the checkpoint',
    "the model's pretrained_cfg", 'the weights', 'the data (NAME)', or a flag)."""
    data_cfg: DataConfig
    sources: Dict[str, str]

    @property
    def input_size(self) -> tuple:
        return self.data_cfg.in_chans, self.data_cfg.img_size, self.data_cfg.img_size

    def values(self) -> Dict[str, Any]:
        cfg = self.data_cfg
        return {"input_size": list(self.input_size), "crop_pct": cfg.crop_pct, "interpolation": cfg.interpolation,
                "mean": list(cfg.mean), "std": list(cfg.std)}

    def to_dict(self) -> Dict[str, Any]:
        return {**self.values(), "sources": dict(self.sources)}

    def lines(self) -> List[str]:
        return preprocessing_lines(self.to_dict())


def _shown(value) -> str:
    if isinstance(value, list):
        return " ".join(_shown(v) for v in value)
    return f"{value:g}" if isinstance(value, float) else str(value)


def preprocessing_lines(preprocessing: Mapping[str, Any]) -> List[str]:
    """``preprocessing:`` and a line per value with its origin, from :meth:`Preprocessing.to_dict`, for a report."""
    shown = {key: _shown(preprocessing[key]) for key in SHOWN}
    shown["input_size"] = "x".join(str(v) for v in preprocessing["input_size"])
    key_width, value_width = max(map(len, shown)), max(map(len, shown.values()))
    return ["preprocessing:"] + [f"  {key:<{key_width}}  {value:<{value_width}}  from {preprocessing['sources'][key]}"
                                 for key, value in shown.items()]


def _check(base: DataConfig, given: Mapping[str, Any]) -> None:
    """One-line errors for overrides timm would assert on or gcvimoe's square inputs cannot take."""
    input_size = given.get("input_size")
    if input_size is not None:
        chans, height, width = input_size
        if height != width:
            raise GcvimoeError(f"--input-size {chans} {height} {width} is not square; gcvimoe evaluates square "
                               f"inputs, so give equal H and W (or --img-size N)")
        if chans != base.in_chans:
            raise GcvimoeError(f"--input-size {chans} {height} {width} has {chans} channels but the model takes "
                               f"{base.in_chans}; use --input-size {base.in_chans} {height} {width}")
    for key in ("mean", "std"):
        values = given.get(key)
        if values is not None and len(values) not in (1, base.in_chans):
            raise GcvimoeError(f"--{key} has {len(values)} values but the model takes {base.in_chans} channels; give "
                               f"one value or {base.in_chans}")
    for key in ("img_size", "crop_pct"):
        if given.get(key) is not None and given[key] <= 0:
            raise GcvimoeError(f"{FLAGS[key]} must be positive, got {given[key]}")


def resolve_preprocessing(base: DataConfig, sources: Mapping[str, str],
                          overrides: Optional[Mapping[str, Any]] = None) -> Preprocessing:
    """``base`` (whose values came from ``sources``) with timm's flag values ``overrides`` applied.

    Args:
        base: The preprocessing the file or model implies.
        sources: Where each value of :data:`SHOWN` in ``base`` came from.
        overrides: timm's ``args`` keys (:data:`FLAGS`); None values are not given.
    """
    given = {key: value for key, value in (overrides or {}).items() if value is not None}
    unknown = set(given) - set(FLAGS)
    if unknown:
        raise ValueError(f"unknown preprocessing overrides {sorted(unknown)}; use {sorted(FLAGS)}")
    if not given:
        return Preprocessing(base, dict(sources))
    _check(base, given)
    pretrained_cfg = {"input_size": (base.in_chans, base.img_size, base.img_size), "crop_pct": base.crop_pct,
                      "interpolation": base.interpolation, "mean": base.mean, "std": base.std}
    resolved = timm_data_config({**given, "in_chans": base.in_chans}, pretrained_cfg=pretrained_cfg)
    data_cfg = dataclasses.replace(base, img_size=resolved["input_size"][-1], crop_pct=resolved["crop_pct"],
                                   interpolation=resolved["interpolation"], mean=tuple(resolved["mean"]),
                                   std=tuple(resolved["std"]))
    sources = dict(sources)
    for key in given:
        sources["input_size" if key == "img_size" else key] = FLAGS[key]
    return Preprocessing(data_cfg, sources)


def recorded_sources(what: str = "the checkpoint") -> Dict[str, str]:
    """Every shown value from the file's own record."""
    return dict.fromkeys(SHOWN, what)
