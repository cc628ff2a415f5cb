"""The device a command runs on: ``auto`` or a name, checked against this machine."""
import torch

from gcvimoe.errors import GcvimoeError


def resolve_device(name: str) -> torch.device:
    """'auto' is the GPU when there is one, else the CPU; an unknown or absent device is a one-line error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    available = ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    try:
        device = torch.device(name)
    except RuntimeError:
        raise GcvimoeError(f"unknown device {name!r}; available here: auto, {', '.join(available)}") from None
    if device.type not in ("cpu", "cuda"):
        raise GcvimoeError(f"device {name!r} is not supported; available here: auto, {', '.join(available)}")
    if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
        raise GcvimoeError(f"device {name!r} is not available on this machine; available here: auto, "
                           f"{', '.join(available)}")
    return device
