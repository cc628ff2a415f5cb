"""The data config: what a model needs to know about its input, saved in every checkpoint.

Evaluation and prediction rebuild from it exactly the preprocessing the model was trained with.
"""
import os
from dataclasses import asdict, dataclass
from typing import Any, Dict, List, Tuple


@dataclass
class DataConfig:
    """What a model needs to know about its input: saved in checkpoints, used by validate and predict.

    ``dataset`` names the data source (see :mod:`gcvimoe.data.sources`), ``data_dir`` where it reads from, made
    absolute so that a checkpoint or model folder finds its data from any working folder, and
    ``data_dir_as_typed`` the path as the user gave it.
    """
    dataset: str
    data_dir: str
    img_size: int
    in_chans: int
    mean: Tuple[float, ...]
    std: Tuple[float, ...]
    interpolation: str
    crop_pct: float
    class_names: List[str]
    data_dir_as_typed: str = ""

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def to_dict(self) -> Dict[str, Any]:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "DataConfig":
        d = dict(d)
        d["mean"], d["std"] = tuple(d["mean"]), tuple(d["std"])
        return cls(**d)


def absolute_data_dir(data_dir: str) -> str:
    """``data_dir`` made absolute when it is a local path or shard pattern; URLs, pipes and '' as they are."""
    if not data_dir or "://" in data_dir or data_dir.startswith(("pipe:", "hfds:")):
        return data_dir
    return os.path.abspath(os.path.expanduser(data_dir))


SMALL_DATASETS_SIZE = 32  # the embedded digits and Fashion-MNIST are read at 32 px (a multiple of GC ViT's 32)
MAX_DERIVED_SIZE = 224


def derived_img_size(median_side: int) -> int:
    """The input size a folder's images suggest: their median shorter side rounded up to GC ViT's multiple of 32,
    at most 224 (ImageNet's; larger images are downscaled as timm's recipes do)."""
    return min(max(32, -(-median_side // 32) * 32), MAX_DERIVED_SIZE)
