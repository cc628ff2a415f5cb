"""Errors a user can cause, and the one helper that suggests the name they probably meant.

The CLI prints a :class:`GcvimoeError` as one ``error:`` line and exits 2 (a subclass may say otherwise: 3 for a
lost process of a distributed job), without a traceback; any other exception is a bug and stays visible as one.
"""
import difflib
from typing import Iterable, Optional


class GcvimoeError(ValueError):
    """A problem with user input (a path, a config key, a checkpoint, a model name).

    The message names the problem and the fix in one line. ``exit_code`` is the command line's exit status for it.
    """
    exit_code = 2


def first_line(error: BaseException, limit: Optional[int] = None) -> str:
    """The first line of ``error``'s message (at most ``limit`` characters), or its type's name when it has none: for
    a one-line error that quotes a library's."""
    text = str(error).strip()
    return text.splitlines()[0][:limit] if text else type(error).__name__


def nearest(name: str, choices: Iterable[str]) -> Optional[str]:
    """The choice nearest to ``name`` (dashes read as underscores), or None when none is close."""
    choices = list(choices)
    for candidate in dict.fromkeys((name, name.replace("-", "_"))):
        close = difflib.get_close_matches(candidate, choices, n=1, cutoff=0.6)
        if close:
            return close[0]
    return None


def did_you_mean(name: str, choices: Iterable[str], fallback: str = "") -> str:
    """``"did you mean 'x'?"`` for the choice nearest to ``name``, else ``fallback`` (for the end of a message)."""
    close = nearest(name, choices)
    return f"did you mean '{close}'?" if close else fallback
