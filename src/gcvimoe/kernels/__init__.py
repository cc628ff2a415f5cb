"""Opt-in fast paths for CPU training and inference, each beside the plain PyTorch path of the layer that calls it.

Every kernel here is a hand-differentiated ``autograd.Function`` or a special-cased path. The layer that could use
one asks :func:`enabled` and otherwise runs its plain PyTorch path (autograd over SDPA, ``nn.Conv2d``, a per-expert
loop); the tests check every kernel against that path. ``benchmarks/kernels.py`` measures what each one buys end to
end, and only kernels that buy at least 5 % stay on by default.

One switch::

    import gcvimoe.kernels
    gcvimoe.kernels.set_enabled(False)            # plain PyTorch everywhere
    gcvimoe.kernels.set_enabled({'expert_mlp'})   # just this kernel
    with gcvimoe.kernels.enabled_only(()):        # temporarily
        ...
"""
from contextlib import contextmanager
from typing import FrozenSet, Iterable, Iterator, Union

KERNELS = ('attention', 'inplace_residual', 'expert_mlp', 'dropout_bits')
DEFAULT_ENABLED = frozenset(KERNELS)

_enabled: FrozenSet[str] = DEFAULT_ENABLED


def enabled(name: str) -> bool:
    """Whether the kernel ``name`` may run (its own conditions, e.g. CPU training, still apply)."""
    return name in _enabled


def set_enabled(kernels: Union[bool, Iterable[str]]) -> FrozenSet[str]:
    """Turn kernels on: ``True`` for the defaults, ``False`` for none, or a set of names. Returns the previous set."""
    global _enabled
    previous = _enabled
    if kernels is True:
        chosen = DEFAULT_ENABLED
    elif kernels is False:
        chosen = frozenset()
    else:
        chosen = frozenset(kernels)
        unknown = sorted(chosen - set(KERNELS))
        if unknown:
            raise ValueError(f"unknown kernels {unknown}; choose from {list(KERNELS)}")
    _enabled = chosen
    return previous


@contextmanager
def enabled_only(kernels: Union[bool, Iterable[str]]) -> Iterator[None]:
    """:func:`set_enabled` inside a ``with`` block."""
    previous = set_enabled(kernels)
    try:
        yield
    finally:
        set_enabled(previous)
