"""The CPU expert kernel: every expert's MLP on its own rows, gated and summed back per token, as one autograd node.

It runs over chunks of at most ``CHUNK_ROWS`` rows: gather, fc1, activation, fc2, gate and scatter-add happen while
a chunk is in cache, and only the fc1 output is saved for backward (the activation is recomputed there). A chunk
holds the rows of several experts when they are few (small batches), so the row-wise work runs once per chunk and
only the GEMMs once per expert. Dropout is drawn from 16-bit random numbers and, for exact GELU, carried by the saved
fc1 output (a dropped element is pushed to where GELU and its derivative are exactly 0), so no mask is saved.

The plain path it replaces is the per-expert loop in :class:`gcvimoe.moe.experts.Experts`, which the tests compare
it with. The chunking depends on the routing (host-side sizes), so this kernel is for eager CPU runs only.
"""
import math
from typing import Iterator, List, Optional, Tuple

import torch
from torch import Tensor, nn

CHUNK_ROWS = 2048  # a chunk's fc1 output (2048 x h floats) stays in L3 between fc1, activation and fc2, and its
# GEMMs are still long enough to run at full speed
SHARED_CHUNK_ROWS = 512  # experts with fewer rows share chunks of at most this many; larger experts gain nothing
# from sharing


Segment = Tuple[int, int, int, bool]  # (expert, start, stop, first): rows of one expert, first marks its first rows


def _expert_chunks(tokens_per_expert: List[int]) -> Iterator[Tuple[int, int, Tuple[Segment, ...]]]:
    """``(start, stop, segments)`` row ranges in expert order.

    Experts with few rows share chunks of at most ``SHARED_CHUNK_ROWS`` rows, each expert one segment of its chunk;
    an expert with more rows has chunks of its own, cut into equal parts of at most ``CHUNK_ROWS`` rows (no small
    remainder chunk, whose GEMM would be inefficient). Segment bounds are absolute rows.
    """
    segments: List[Segment] = []
    start = 0
    for expert, size in enumerate(tokens_per_expert):
        if not size:
            continue
        if segments and start + size - segments[0][1] > SHARED_CHUNK_ROWS:  # the open chunk cannot take this expert
            yield segments[0][1], start, tuple(segments)
            segments = []
        if size <= SHARED_CHUNK_ROWS:
            segments.append((expert, start, start + size, True))
        else:  # (the open chunk, if any, was closed above)
            piece = math.ceil(size / math.ceil(size / CHUNK_ROWS))
            for piece_start in range(start, start + size, piece):
                piece_stop = min(piece_start + piece, start + size)
                yield piece_start, piece_stop, ((expert, piece_start, piece_stop, piece_start == start),)
        start += size
    if segments:
        yield segments[0][1], start, tuple(segments)


def _linear(rows: Tensor, weight: Tensor, bias: Optional[Tensor], out: Optional[Tensor] = None,
            scale: float = 1.) -> Tensor:
    """``scale * rows @ weight + bias``, written into ``out`` when given."""
    if bias is not None:
        return torch.addmm(bias, rows, weight, alpha=scale, out=out)
    if scale == 1:
        return torch.mm(rows, weight, out=out)
    if out is None:
        out = rows.new_empty(rows.shape[0], weight.shape[1])
    return out.addmm_(rows, weight, beta=0, alpha=scale)  # beta = 0 ignores out's old content, NaN included


def _accumulate_mm(out: Tensor, a: Tensor, b: Tensor, first: bool, scale: float = 1.) -> None:
    """``out = scale * a @ b`` for an expert's first chunk, ``out += scale * a @ b`` for the others."""
    if first:
        _linear(a, b, None, out=out, scale=scale)
    else:
        out.addmm_(a, b, alpha=scale)


def _accumulate_sum(out: Tensor, rows: Tensor, first: bool) -> None:
    if first:
        torch.sum(rows, dim=0, out=out)
    else:
        out += rows.sum(dim=0)


def dropout_keep(p: float) -> float:
    """The keep probability the kernel's dropout realises for a dropout rate ``p``: ``1 - p`` rounded to a multiple of
    2^-16 (0.9 becomes 0.899994), its 16-bit random numbers' resolution; 1 (no dropout) when ``p < 2^-17``."""
    return round((1. - p) * 65536) / 65536


def _random_bits(rows: int, cols: int, keep: float, device: torch.device) -> Tuple[Tensor, int]:
    """Random int16 values ``[rows, cols]`` and the threshold below which a share ``keep`` of them lies (``keep`` a
    multiple of 2^-16 below 1, see :func:`dropout_keep`).

    16 random bits per element: on the CPU ``bernoulli_`` draws one random number per element, while one 64-bit draw
    serves four elements here; ``random_`` over the full int64 range is cheaper than ``randint`` with the same range.
    """
    count = rows * cols
    words = torch.empty((count + 3) // 4, dtype=torch.int64, device=device).random_(-2 ** 63, None)
    return words.view(torch.int16)[:count].view(rows, cols), round(keep * 65536) - 32768


def _keep_mask(rows: int, cols: int, keep: float, device: torch.device, out: Optional[Tensor] = None) -> Tensor:
    """A dropout mask ``[rows, cols]`` of uint8, 1 where an element is kept (probability ``keep``), 0 where dropped.

    uint8 rather than bool: on the CPU, multiplying by it is cheaper than ``masked_fill_`` with a bool mask, and the
    comparison writes it faster.
    """
    bits, threshold = _random_bits(rows, cols, keep, device)
    if out is None:
        out = torch.empty(rows, cols, dtype=torch.uint8, device=device)
    return torch.lt(bits, threshold, out=out)


def _drops_in_pre_activation(act: nn.Module, dtype: torch.dtype) -> bool:
    """Whether dropout can live in the saved input of ``act`` (see :func:`_drop_by_pre_activation`): exact GELU is
    exactly 0, with a derivative of exactly 0, at ``-max / 2`` of a float dtype (tested). Other activations keep a
    mask (tanh-GELU's derivative is NaN there, Tanh is -1, and hooks on an activation called as a module would see
    the sentinel), and so does float16, whose ``max / 2`` (32752) is within reach of real pre-activations."""
    return type(act) is nn.GELU and act.approximate == 'none' and torch.finfo(dtype).max > 1e30


def _drop_by_pre_activation(pre_act: Tensor, keep: float, scratch: Tensor) -> None:
    """Dropout of ``gelu(pre_act)`` applied to ``pre_act`` itself: ``-max / 2`` of its dtype is added to a dropped
    element, which puts any finite pre-activation short of ``max / 2`` (about 1.7e38 in float32 and bfloat16) where
    GELU and its derivative are exactly 0. A kept element gains exactly 0.

    The saved fc1 output then carries the dropout: backward recomputes the activation and its gradient with the
    dropped elements already 0, so no mask is saved or multiplied (a uint8 mask cost a conversion per multiply, three
    per chunk). ``scratch`` (``pre_act``'s shape and dtype) receives the drop mask, drawn from :func:`_random_bits`
    as :func:`_keep_mask`'s is. Adding is cheaper than overwriting with ``masked_fill_``.
    """
    bits, threshold = _random_bits(*pre_act.shape, keep, pre_act.device)
    drop = torch.ge(bits, threshold, out=scratch)
    pre_act.add_(drop, alpha=-torch.finfo(pre_act.dtype).max / 2)


def _activation_backward(act: nn.Module, pre_act: Tensor, grad: Tensor) -> Tensor:
    """Gradient of ``act`` at ``pre_act``: a direct kernel call for GELU, autograd for any other activation."""
    if type(act) is nn.GELU:
        return torch.ops.aten.gelu_backward(grad, pre_act, approximate=act.approximate)
    with torch.enable_grad():
        pre_act = pre_act.detach().requires_grad_()
        return torch.autograd.grad(act(pre_act), pre_act, grad)[0]


def activation_into(act: nn.Module, pre_act: Tensor, out: Tensor) -> Tensor:
    """``act(pre_act)``, for GELU written into the scratch tensor ``out`` (which may be ``pre_act`` itself): a fresh
    tensor per chunk costs an allocation and a second chunk-sized area of cache."""
    if type(act) is not nn.GELU:
        return act(pre_act)
    if out.data_ptr() == pre_act.data_ptr():
        return torch.ops.aten.gelu_(pre_act, approximate=act.approximate)
    return torch.ops.aten.gelu.out(pre_act, approximate=act.approximate, out=out)


def _chunk_parts(start: int, segments: Tuple[Segment, ...]) -> List[Tuple[int, slice, bool]]:
    """``(expert, rows, first)`` per segment of a chunk starting at row ``start``, ``rows`` relative to the chunk."""
    return [(expert, slice(first_row - start, last_row - start), first)
            for expert, first_row, last_row, first in segments]


def _bias(bias: Optional[Tensor], expert: int) -> Optional[Tensor]:
    return None if bias is None else bias[expert]


Weights = Tuple[Tensor, Optional[Tensor], Tensor, Optional[Tensor]]  # fc1_weight, fc1_bias, fc2_weight, fc2_bias
Route = Tuple[Optional[Tensor], Tensor, list]  # gates [n], token_index [n], chunks of _expert_chunks


def _expert_mlp_forward(x: Tensor, weights: Weights, route: Route, act: nn.Module, hidden_keep: float,
                        hidden=None, masks=None) -> Tensor:
    """Forward of :class:`_ExpertMLP`; fills ``hidden`` (fc1 outputs) when given, one tensor per chunk. Dropout goes
    into ``hidden`` (:func:`_drop_by_pre_activation`) when given without ``masks`` and the activation allows it, else
    into ``masks`` when given."""
    fc1_weight, fc1_bias, fc2_weight, fc2_bias = weights
    gates, token_index, chunks = route
    out = x.new_zeros(x.shape[0], fc2_weight.shape[-1])
    # chunk-sized scratch buffers, reused so that every chunk's temporaries stay in cache and cost no page faults
    rows_buffer = x.new_empty(CHUNK_ROWS, x.shape[1])
    # inference: the fc1 output, which the activation then overwrites; training (fc1 output saved in ``hidden``):
    # the activation's output
    hidden_buffer = x.new_empty(CHUNK_ROWS, fc1_weight.shape[-1])
    out_buffer = x.new_empty(CHUNK_ROWS, fc2_weight.shape[-1])
    drop_in_pre_act = (hidden_keep < 1 and hidden is not None and masks is None
                       and _drops_in_pre_activation(act, x.dtype))
    for chunk, (start, stop, segments) in enumerate(chunks):
        index = token_index[start:stop]
        rows = torch.index_select(x, 0, index, out=rows_buffer[:stop - start])
        pre_act = hidden_buffer[:stop - start] if hidden is None else hidden[chunk]
        parts = _chunk_parts(start, segments)
        for expert, part, _ in parts:
            _linear(rows[part], fc1_weight[expert], _bias(fc1_bias, expert), out=pre_act[part])
        # inverted dropout: the 1 / keep scale rides on the fc2 GEMM
        if drop_in_pre_act:
            _drop_by_pre_activation(pre_act, hidden_keep, scratch=hidden_buffer[:stop - start])
        act_out = activation_into(act, pre_act, out=hidden_buffer[:stop - start])
        if hidden_keep < 1 and not drop_in_pre_act:
            act_out.mul_(_keep_mask(*act_out.shape, hidden_keep, x.device, out=None if masks is None else masks[chunk]))
        y = out_buffer[:stop - start]
        for expert, part, _ in parts:
            _linear(act_out[part], fc2_weight[expert], _bias(fc2_bias, expert), out=y[part], scale=1. / hidden_keep)
        if gates is not None:
            y.mul_(gates[start:stop].unsqueeze(1))
        out.index_add_(0, index, y)
    return out


class _ExpertMLP(torch.autograd.Function):
    """``out[t] = sum over rows r of token t: gate_r * fc2_e(drop(act(fc1_e(x[t]))))``, chunk by chunk.

    Saved for backward: the input (not a gathered copy), the weights and the fc1 outputs, which carry the dropout (for
    activations other than exact GELU, and in float16, dropout keep-masks beside them). The gate's gradient comes from
    the fc2 input-gradient GEMM, so no output is saved either.
    """

    @staticmethod
    def forward(ctx, x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, gates, token_index, chunks, act,  # noqa: PLR0913
                hidden_keep):
        # (every tensor autograd differentiates is its own argument)
        # one tensor per chunk rather than one [n, h] tensor: a tensor over glibc's largest mmap threshold
        # is mapped afresh on every step, and its first touch page-faults every page
        hidden = [x.new_empty(stop - start, fc1_weight.shape[-1]) for start, stop, _ in chunks]
        masks = []
        if hidden_keep < 1 and not _drops_in_pre_activation(act, x.dtype):
            masks = [torch.empty(h.shape, dtype=torch.uint8, device=x.device) for h in hidden]
        out = _expert_mlp_forward(x, (fc1_weight, fc1_bias, fc2_weight, fc2_bias), (gates, token_index, chunks), act,
                                  hidden_keep, hidden=hidden, masks=masks or None)
        ctx.save_for_backward(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, gates, token_index, *hidden, *masks)
        ctx.chunks, ctx.act, ctx.hidden_keep = chunks, act, hidden_keep
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        backward = _Backward(ctx, grad_out)
        for chunk in range(len(ctx.chunks)):
            backward.chunk(chunk)
        return (*backward.gradients(), None, None, None, None)


class _Backward:
    """The backward of :class:`_ExpertMLP`, chunk by chunk; an expert's first rows write its weight gradients and
    the others add to them, so only idle experts' gradients are zero-filled."""

    def __init__(self, ctx, grad_out: Tensor):
        x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, gates, token_index, *per_chunk = ctx.saved_tensors
        self.x, self.gates, self.token_index, self.grad_out = x, gates, token_index, grad_out
        self.weights = (fc1_weight, fc1_bias, fc2_weight, fc2_bias)
        self.chunks, self.act, self.keep = ctx.chunks, ctx.act, ctx.hidden_keep
        self.hidden, self.masks = per_chunk[:len(ctx.chunks)], per_chunk[len(ctx.chunks):] or None
        self.need = ctx.needs_input_grad[:6]  # x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, gates
        self.need_pre_act = any(self.need[:3])
        self.grad_x = torch.zeros_like(x) if self.need[0] else None
        self.grad_params = [torch.empty_like(param) if need else None
                            for param, need in zip(self.weights, self.need[1:5], strict=True)]
        active = {expert for _, _, segments in self.chunks for expert, *_ in segments}
        idle = [expert for expert in range(fc1_weight.shape[0]) if expert not in active]
        for grad in self.grad_params:
            if grad is not None and idle:
                grad[idle] = 0
        self.grad_gates = torch.empty_like(gates) if self.need[5] else None
        rows = max((h.shape[0] for h in self.hidden), default=0)
        self.act_buffer = x.new_empty(rows, fc1_weight.shape[-1])
        self.grad_hidden_buffer = x.new_empty(rows, fc1_weight.shape[-1])
        self.grad_rows_buffer = x.new_empty(rows, x.shape[1])

    def gradients(self):
        return (self.grad_x, *self.grad_params, self.grad_gates)

    def chunk(self, chunk: int) -> None:
        start, stop, segments = self.chunks[chunk]
        index = self.token_index[start:stop]
        parts = _chunk_parts(start, segments)
        grad_y = self.grad_out.index_select(0, index)  # [c, d_out], unscaled by the gate
        # fc2's input is fc2_in / keep: act(pre_act) (recomputed, cheaper than saving it) with the dropped zeroed
        fc2_in = activation_into(self.act, self.hidden[chunk], out=self.act_buffer[:stop - start])
        if self.masks is not None:
            fc2_in.mul_(self.masks[chunk])
        gate = None if self.gates is None else self.gates[start:stop].unsqueeze(1)
        self._fc2_params(parts, fc2_in, grad_y if gate is None else grad_y * gate)
        if not (self.need[5] or self.need_pre_act):
            return
        # unscaled by the gate: its row-wise dot with fc2's input is the gate's gradient
        grad_fc2_in = self.grad_hidden_buffer[:stop - start]
        for expert, part, _ in parts:
            torch.mm(grad_y[part], self.weights[2][expert].t(), out=grad_fc2_in[part])
        if self.need[5]:
            self._gates(parts, grad_y, grad_fc2_in, fc2_in, start, stop)
        if self.need_pre_act:
            if self.masks is not None:
                grad_fc2_in.mul_(self.masks[chunk])
            if gate is not None or self.keep < 1:
                grad_fc2_in.mul_(1. / self.keep if gate is None else gate / self.keep)
            grad_pre_act = _activation_backward(self.act, self.hidden[chunk], grad_fc2_in)
            self._fc1(parts, index, grad_pre_act)

    def _fc2_params(self, parts, fc2_in: Tensor, grad_y_gated: Tensor) -> None:
        _, _, grad_w2, grad_b2 = self.grad_params
        for expert, part, first in parts:
            if grad_w2 is not None:
                _accumulate_mm(grad_w2[expert], fc2_in[part].t(), grad_y_gated[part], first, scale=1. / self.keep)
            if grad_b2 is not None:
                _accumulate_sum(grad_b2[expert], grad_y_gated[part], first)

    def _gates(self, parts, grad_y: Tensor, grad_fc2_in: Tensor, fc2_in: Tensor, start: int, stop: int) -> None:
        chunk_grad_gates = torch.linalg.vecdot(grad_fc2_in, fc2_in, out=self.grad_gates[start:stop])
        if self.keep < 1:
            chunk_grad_gates /= self.keep
        fc2_bias = self.weights[3]
        if fc2_bias is not None:
            for expert, part, _ in parts:
                chunk_grad_gates[part].addmv_(grad_y[part], fc2_bias[expert])

    def _fc1(self, parts, index: Tensor, grad_pre_act: Tensor) -> None:
        grad_w1, grad_b1, _, _ = self.grad_params
        if grad_w1 is not None:
            x_rows = self.x.index_select(0, index)
            for expert, part, first in parts:
                _accumulate_mm(grad_w1[expert], x_rows[part].t(), grad_pre_act[part], first)
        if grad_b1 is not None:
            for expert, part, first in parts:
                _accumulate_sum(grad_b1[expert], grad_pre_act[part], first)
        if self.grad_x is not None:
            grad_rows = self.grad_rows_buffer[:index.shape[0]]
            for expert, part, _ in parts:
                torch.mm(grad_pre_act[part], self.weights[0][expert].t(), out=grad_rows[part])
            self.grad_x.index_add_(0, index, grad_rows)


def expert_mlp(x: Tensor, weights: Weights, gates: Optional[Tensor], token_index: Tensor, tokens_per_expert: Tensor,
               act: nn.Module, dropout: float) -> Tensor:
    """``out[t] = sum over rows r of token t: gate_r * fc2_e(drop(act(fc1_e(x[t]))))`` with the kernel above.

    Args:
        x: Tokens ``[t, d]``.
        weights: ``fc1_weight [e, d, h]``, ``fc1_bias [e, h]`` or None, ``fc2_weight [e, h, d_out]``, ``fc2_bias
            [e, d_out]`` or None.
        gates: Weight of each row ``[n]`` or None.
        token_index: Token of each row ``[n]``, grouped by expert.
        tokens_per_expert: Rows per expert ``[e]``.
        act: The activation module.
        dropout: Dropout rate on the hidden activations (0 in eval).

    Returns:
        ``[t, d_out]``.
    """
    chunks = list(_expert_chunks(tokens_per_expert.tolist()))
    keep = dropout_keep(dropout)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, *weights, gates)):
        return _ExpertMLP.apply(x, *weights, gates, token_index, chunks, act, keep)
    return _expert_mlp_forward(x, weights, (gates, token_index, chunks), act, keep)
