"""Errors a user can cause. The CLI prints them as one line and exits non-zero, without a traceback."""


class GcvimoeError(Exception):
    """A problem with user input (a path, a config key, a checkpoint, a model name).

    The message names the problem and the fix in one line.
    """
