"""Durations in a config: ``dist_timeout`` (seconds, or ``90s``, ``10m``, ``1.5h``) and ``save_interval`` (optimiser
steps, or a duration with its unit), read by one parser."""
import math
from typing import Tuple

from gcvimoe.errors import GcvimoeError

_SECONDS_PER_UNIT = {"": 1, "s": 1, "m": 60, "h": 3600}


def parse_duration(name: str, text: str) -> float:
    """Seconds of a duration written as ``600``, ``90s``, ``10m``, ``1.5h``; a one-line error naming key ``name``."""
    number, unit = str(text).strip(), ""
    if number[-1:].lower() in ("s", "m", "h"):
        number, unit = number[:-1], number[-1].lower()
    try:
        seconds = float(number) * _SECONDS_PER_UNIT[unit]
    except ValueError:
        raise GcvimoeError(f"config key '{name}' must be a duration such as 600, 90s, 10m or 1h, got {text!r}") \
            from None
    if not math.isfinite(seconds):
        raise GcvimoeError(f"config key '{name}' must be a finite duration, got {text!r}")
    return seconds


def parse_save_interval(text: str) -> Tuple[int, float]:
    """``"500"`` -> (500 steps, 0 s); ``"10m"``, ``"90s"``, ``"2h"`` -> (0, seconds) as :func:`parse_duration` reads
    them; ``""`` or ``"0"`` -> (0, 0). A bare number counts optimiser steps, so a duration needs its unit."""
    number = str(text or "0").strip()
    if number.isdecimal():
        return int(number), 0.0
    seconds = -1.0
    if number[-1:] in ("s", "m", "h"):
        try:
            seconds = parse_duration("save_interval", number)
        except GcvimoeError:
            pass
    if seconds < 0:
        raise GcvimoeError(f"--save-interval {text!r} is neither a number of optimiser steps (500) nor a duration "
                           f"(90s, 10m, 2h)")
    return 0, seconds
