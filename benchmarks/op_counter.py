"""Count what a step asks of a device, without the device: aten ops (one kernel launch each on a GPU) and the bytes
they read and write, from a ``TorchDispatchMode`` that sees every op below autograd.

    with OpCounter() as counter:
        y = layer(x)
    counter.launches, counter.bytes, counter.top(10)

Rules, so that a count means what a GPU would do:
- a view (``view``, ``t``, ``expand``, ``select``, ... any op whose output aliases its input without writing) launches
  nothing and moves nothing; it is listed apart (``views``);
- an allocation without a fill (``empty``, ``empty_strided``, ``new_empty``) launches nothing; ``zeros`` does (a fill);
  so does an op that makes no tensor (``promote_types``) or hands an input back unchanged (``dropout`` in eval);
- every other op is one launch; its bytes are those of its tensor inputs and outputs, each tensor counted as the
  memory it spans (an expanded tensor's stride-0 dimensions count once), an in-place output not counted twice.
- ops that read a value back to the host (``item``, ``tolist``, ``nonzero``) are counted as syncs.

Written by hand because torch's ``FlopCounterMode`` counts FLOPs of matrix products only, and the profiler needs
the device to exist.
"""
from collections import Counter, defaultdict
from typing import Dict, List, Tuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

_NO_LAUNCH = {'empty', 'empty_strided', 'new_empty', 'new_empty_strided', 'empty_like', 'lift_fresh',
              'sym_size', 'sym_stride', 'sym_numel', 'sym_storage_offset', 'is_same_size', 'set_'}
_SYNCS = {'_local_scalar_dense', 'nonzero', 'item', 'equal', 'is_nonzero', 'unique', '_unique2',
          'repeat_interleave.Tensor'}


def _is_view(func) -> bool:
    returns = func._schema.returns
    if not returns:
        return False
    info = returns[0].alias_info
    return info is not None and not info.is_write


def tensor_bytes(tensor: torch.Tensor) -> int:
    """Memory a tensor spans: its element size times the product of its non-broadcast dimensions."""
    if tensor.numel() == 0:
        return 0
    elements = 1
    for size, stride in zip(tensor.shape, tensor.stride(), strict=True):
        if stride != 0:
            elements *= size
    return elements * tensor.element_size()


class OpCounter(TorchDispatchMode):
    """Counts kernel launches, bytes and host syncs of every aten op run inside it.

    Attributes:
        launches: Ops that launch a kernel.
        views: Ops that only make a view.
        bytes: Bytes read and written by the launching ops.
        syncs: Ops that read a value on the host.
        by_op: ``op name -> (launches, bytes)``.
    """

    def __init__(self):
        super().__init__()
        self.launches = 0
        self.views = 0
        self.bytes = 0
        self.syncs = 0
        self.by_op: Dict[str, List[int]] = defaultdict(lambda: [0, 0])
        self.sequence: List[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        overload = f"{name}.{func._overloadname}"
        if name in _SYNCS or overload in _SYNCS:
            self.syncs += 1
        if _is_view(func):
            self.views += 1
            return out
        if name in _NO_LAUNCH:
            return out
        inputs = [a for a in tree_flatten((args, kwargs or {}))[0] if isinstance(a, torch.Tensor)]
        outputs = [o for o in tree_flatten(out)[0] if isinstance(o, torch.Tensor)]
        if not outputs or (all(any(o is i for i in inputs) for o in outputs) and not func._schema.is_mutable):
            return out  # no tensor made (promote_types), or an input handed back unchanged (dropout in eval)
        seen = {id(t) for t in inputs}
        moved = sum(tensor_bytes(t) for t in inputs) + sum(tensor_bytes(o) for o in outputs if id(o) not in seen)
        self.launches += 1
        self.bytes += moved
        self.by_op[name][0] += 1
        self.by_op[name][1] += moved
        self.sequence.append(name)
        return out

    def top(self, n: int = 10) -> List[Tuple[str, int, int]]:
        """The ``n`` ops that move the most bytes: ``(name, launches, bytes)``."""
        ranked = sorted(self.by_op.items(), key=lambda item: -item[1][1])[:n]
        return [(name, count, moved) for name, (count, moved) in ranked]

    def counts(self) -> Counter:
        """Launches per op name."""
        return Counter({name: count for name, (count, _) in self.by_op.items()})
