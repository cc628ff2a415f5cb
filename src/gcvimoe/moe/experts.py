"""Experts: ``e`` MLPs with stacked weights, each computed only on the tokens routed to it.

The weights are stacked tensors (``fc1_weight [e, d, h]``, ``fc2_weight [e, h, d]``) laid out so that
``fc1_weight[i] = mlp.fc1.weight.T`` for a timm ``Mlp``. The experts take the dispatch plan (token indices grouped
by expert) and return the gated, combined output per token, so no padding slot is ever computed.

On CPU the whole expert MLP runs as one autograd node over chunks of at most ``CHUNK_ROWS`` rows: gather, fc1,
activation, fc2, gate and scatter-add happen while a chunk is in cache, and only the fc1 output is saved for backward
(the activation is recomputed there). A chunk holds the rows of several experts when they are few (small batches),
so the row-wise work runs once per chunk and only the GEMMs once per expert. A dense MLP instead streams its full
``[t, h]`` hidden tensor through memory several times and saves it twice, so this kernel costs a dense MLP's GEMMs
and little else, and holds about half its activation memory. On CUDA in bf16 the experts run as two
``torch.nn.functional.grouped_mm`` calls.
"""
import math
from typing import Callable, Iterator, List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from timm.layers import to_2tuple

from gcvimoe.moe.dispatch import combine

CHUNK_ROWS = 2048  # a chunk's fc1 output (2048 x h floats) stays in L3 between fc1, activation and fc2; GEMMs of
# 1024 rows or more run at the speed of a full-batch GEMM
SHARED_CHUNK_ROWS = 512  # experts with fewer rows share chunks of at most this many; packing 512-row experts
# four to a 2048-row chunk measured 1-2 % slower in inference than one chunk each


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

    16 random bits per element: on the CPU ``bernoulli_`` draws one random number per element and was measured at
    9.7 ms for 1568 x 768, four elements per 64-bit draw at 2.1 ms. ``random_`` over the full int64 range is about
    17 % faster than ``randint`` with the same range (392 x 1536: 1.02 against 1.24 ms).
    """
    count = rows * cols
    words = torch.empty((count + 3) // 4, dtype=torch.int64, device=device).random_(-2 ** 63, None)
    return words.view(torch.int16)[:count].view(rows, cols), round(keep * 65536) - 32768


def _keep_mask(rows: int, cols: int, keep: float, device: torch.device, out: Optional[Tensor] = None) -> Tensor:
    """A dropout mask ``[rows, cols]`` of uint8, 1 where an element is kept (probability ``keep``), 0 where dropped.

    uint8 rather than bool: multiplying by it is about 4x faster than ``masked_fill_`` with a bool mask on the CPU,
    and the comparison writes it 5x faster than a bool.
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
    as :func:`_keep_mask`'s is. Adding rather than overwriting (``masked_fill_``): a chunk's forward dropout took
    209 us against 390 us (435 x 768 rows, GELU included; the masked multiply it replaces took 313 us).
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


def _expert_mlp_forward(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, gates, token_index, chunks, act, hidden_keep,
                        hidden=None, masks=None):
    """Forward of :class:`_ExpertMLP`; fills ``hidden`` (fc1 outputs) when given, one tensor per chunk. Dropout goes
    into ``hidden`` (:func:`_drop_by_pre_activation`) when given without ``masks`` and the activation allows it, else
    into ``masks`` when given."""
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
    def forward(ctx, x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, gates, token_index, chunks, act, hidden_keep):
        # one tensor per chunk rather than one [n, h] tensor: a tensor over glibc's largest mmap threshold (32 MiB,
        # n > 10922 rows at h = 768) is mapped afresh on every step, and its first touch page-faults every 4 KiB
        hidden = [x.new_empty(stop - start, fc1_weight.shape[-1]) for start, stop, _ in chunks]
        masks = []
        if hidden_keep < 1 and not _drops_in_pre_activation(act, x.dtype):
            masks = [torch.empty(h.shape, dtype=torch.uint8, device=x.device) for h in hidden]
        out = _expert_mlp_forward(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, gates, token_index, chunks, act,
                                  hidden_keep, hidden=hidden, masks=masks or None)
        ctx.save_for_backward(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, gates, token_index, *hidden, *masks)
        ctx.chunks, ctx.act, ctx.hidden_keep = chunks, act, hidden_keep
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, gates, token_index, *per_chunk = ctx.saved_tensors
        hidden, masks = per_chunk[:len(ctx.chunks)], per_chunk[len(ctx.chunks):] or None
        keep = ctx.hidden_keep
        need_x, need_w1, need_b1, need_w2, need_b2, need_gates = ctx.needs_input_grad[:6]
        need_pre_act = need_x or need_w1 or need_b1
        grad_x = torch.zeros_like(x) if need_x else None
        # an expert's first rows write its weight gradients, the others add to them: no zero fill but for idle experts
        grad_w1, grad_b1, grad_w2, grad_b2 = (
            torch.empty_like(param) if need else None
            for param, need in ((fc1_weight, need_w1), (fc1_bias, need_b1), (fc2_weight, need_w2), (fc2_bias, need_b2)))
        active = {expert for _, _, segments in ctx.chunks for expert, *_ in segments}
        idle = [expert for expert in range(fc1_weight.shape[0]) if expert not in active]
        for grad in (grad_w1, grad_b1, grad_w2, grad_b2):
            if grad is not None and idle:
                grad[idle] = 0
        grad_gates = torch.empty_like(gates) if need_gates else None
        rows = max((h.shape[0] for h in hidden), default=0)
        act_buffer = x.new_empty(rows, fc1_weight.shape[-1])
        grad_hidden_buffer = x.new_empty(rows, fc1_weight.shape[-1])
        grad_rows_buffer = x.new_empty(rows, x.shape[1])
        for chunk, (start, stop, segments) in enumerate(ctx.chunks):
            index = token_index[start:stop]
            parts = _chunk_parts(start, segments)
            grad_y = grad_out.index_select(0, index)  # [c, d_out], unscaled by the gate
            pre_act = hidden[chunk]
            # fc2's input is fc2_in / keep: act(pre_act) (recomputed, cheaper than saving it) with the dropped zeroed
            fc2_in = activation_into(ctx.act, pre_act, out=act_buffer[:stop - start])
            if masks is not None:
                fc2_in.mul_(masks[chunk])
            gate = None if gates is None else gates[start:stop].unsqueeze(1)
            grad_y_gated = grad_y if gate is None else grad_y * gate
            for expert, part, first in parts:
                if need_w2:
                    _accumulate_mm(grad_w2[expert], fc2_in[part].t(), grad_y_gated[part], first, scale=1. / keep)
                if need_b2:
                    _accumulate_sum(grad_b2[expert], grad_y_gated[part], first)
            if not (need_gates or need_pre_act):
                continue
            # unscaled by the gate: its row-wise dot with fc2's input is the gate's gradient
            grad_fc2_in = grad_hidden_buffer[:stop - start]
            for expert, part, _ in parts:
                torch.mm(grad_y[part], fc2_weight[expert].t(), out=grad_fc2_in[part])
            if need_gates:
                chunk_grad_gates = torch.linalg.vecdot(grad_fc2_in, fc2_in, out=grad_gates[start:stop])
                if keep < 1:
                    chunk_grad_gates /= keep
                if fc2_bias is not None:
                    for expert, part, _ in parts:
                        chunk_grad_gates[part].addmv_(grad_y[part], fc2_bias[expert])
            if not need_pre_act:
                continue
            if masks is not None:
                grad_fc2_in.mul_(masks[chunk])
            scale = 1. / keep if gate is None else gate / keep
            if gate is not None or keep < 1:
                grad_fc2_in.mul_(scale)
            grad_pre_act = _activation_backward(ctx.act, pre_act, grad_fc2_in)
            if need_w1:
                x_rows = x.index_select(0, index)
                for expert, part, first in parts:
                    _accumulate_mm(grad_w1[expert], x_rows[part].t(), grad_pre_act[part], first)
            if need_b1:
                for expert, part, first in parts:
                    _accumulate_sum(grad_b1[expert], grad_pre_act[part], first)
            if need_x:
                grad_rows = grad_rows_buffer[:stop - start]
                for expert, part, _ in parts:
                    torch.mm(grad_pre_act[part], fc1_weight[expert].t(), out=grad_rows[part])
                grad_x.index_add_(0, index, grad_rows)
        return grad_x, grad_w1, grad_b1, grad_w2, grad_b2, grad_gates, None, None, None, None


def _grouped_mm_supported(x: Tensor, weight: Tensor) -> bool:
    """torch's grouped GEMM kernel: CUDA, bf16, SM 8.0+, 16-byte aligned rows."""
    return (x.is_cuda and x.dtype == torch.bfloat16 and weight.shape[-2] % 8 == 0 and weight.shape[-1] % 8 == 0
            and torch.cuda.get_device_capability(x.device) >= (8, 0))


def _grouped_linear(rows: Tensor, weight: Tensor, bias: Optional[Tensor], tokens_per_expert: Tensor,
                    offsets: Tensor) -> Tensor:
    out = F.grouped_mm(rows, weight, offs=offsets)
    if bias is None:
        return out
    # the bias is added in its own (fp32) precision, so its gradient, a sum over every row of an expert, accumulates
    # in fp32 as a dense layer's does; summed in bf16 it was seen 7 % off
    rows_bias = bias.repeat_interleave(tokens_per_expert, dim=0, output_size=rows.shape[0])
    return (out.to(bias.dtype) + rows_bias).to(out.dtype)


class Experts(nn.Module):
    """``e`` two-layer MLPs (fc1, activation, dropout, fc2, dropout), as timm's ``Mlp`` but with stacked weights.

    Args:
        num_experts: Experts ``e``.
        in_features: Input width ``d``.
        hidden_features: Hidden width ``h``.
        out_features: Output width.
        act_layer: Activation module class.
        drop: Dropout after the activation and on the output (a float or a pair), as in timm's ``Mlp``; the output
            dropout acts on the combined output of a token.
        expert_dropout: Extra dropout on the hidden activations (Swin-MoE's ``moe_drop``); it composes with the
            hidden dropout of ``drop`` into one dropout of rate ``1 - (1 - p1) * (1 - p2)``.
        bias: Biases in fc1 and fc2 (a bool or a pair).
    """

    def __init__(
            self,
            num_experts: int,
            in_features: int,
            hidden_features: int,
            out_features: int,
            act_layer: Callable[[], nn.Module] = nn.GELU,
            drop: Union[float, Tuple[float, float]] = 0.,
            expert_dropout: float = 0.,
            bias: Union[bool, Tuple[bool, bool]] = True,
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.num_experts = num_experts
        self.in_features = in_features
        self.hidden_features = hidden_features
        self.out_features = out_features
        bias = to_2tuple(bias)
        drop_probs = to_2tuple(drop)
        self.fc1_weight = nn.Parameter(torch.empty(num_experts, in_features, hidden_features, **dd))
        self.fc1_bias = nn.Parameter(torch.empty(num_experts, hidden_features, **dd)) if bias[0] else None
        self.act = act_layer()
        if getattr(self.act, 'inplace', False):
            raise ValueError(f"act_layer {self.act} works in place, but the experts recompute the activation from its "
                             f"input in backward; use an out-of-place activation")
        self.drop1 = nn.Dropout(1. - (1. - drop_probs[0]) * (1. - expert_dropout))
        self.fc2_weight = nn.Parameter(torch.empty(num_experts, hidden_features, out_features, **dd))
        self.fc2_bias = nn.Parameter(torch.empty(num_experts, out_features, **dd)) if bias[1] else None
        self.drop2 = nn.Dropout(drop_probs[1])
        for param in self.parameters():
            param.is_expert = True  # data-parallel code reduces these over expert replicas only
        self.reset_parameters()

    def reset_parameters(self):
        """Initialise every expert as a fresh ``nn.Linear`` pair: uniform in ``+-1/sqrt(fan_in)``."""
        for weight, bias in ((self.fc1_weight, self.fc1_bias), (self.fc2_weight, self.fc2_bias)):
            bound = 1. / math.sqrt(weight.shape[1])
            nn.init.uniform_(weight, -bound, bound)
            if bias is not None:
                nn.init.uniform_(bias, -bound, bound)

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, in_features={self.in_features}, "
                f"hidden_features={self.hidden_features}, out_features={self.out_features}")

    def forward(self, x: Tensor, tokens_per_expert: Tensor, token_index: Tensor, gates: Optional[Tensor] = None
                ) -> Tensor:
        """Run every expert on its tokens and sum the gated outputs back per token.

        Args:
            x: Tokens ``[t, d]``.
            tokens_per_expert: Rows per expert ``[e]``; expert ``i``'s rows follow expert ``i - 1``'s.
            token_index: Token each row reads and writes ``[n]``, grouped by expert.
            gates: Weight of each row's output ``[n]``, or None for 1.

        Returns:
            ``[t, d_out]``: per token, the gated sum of its rows' expert outputs (zeros for a token without rows), in
            the autocast dtype when autocast is on.
        """
        device_type = x.device.type
        if torch.is_autocast_enabled(device_type):
            x = x.to(torch.get_autocast_dtype(device_type))
        params = [None if p is None else p.to(x.dtype)
                  for p in (self.fc1_weight, self.fc1_bias, self.fc2_weight, self.fc2_bias)]
        gates = None if gates is None else gates.to(x.dtype)
        with torch.autocast(device_type, enabled=False):
            if _grouped_mm_supported(x, params[0]):
                out = self._grouped_mm_forward(x, params, tokens_per_expert, token_index, gates)
            else:
                chunks = list(_expert_chunks(tokens_per_expert.tolist()))
                hidden_keep = dropout_keep(self.drop1.p) if self.training else 1.
                args = (x, *params, gates, token_index, chunks, self.act, hidden_keep)
                if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, *params, gates)):
                    out = _ExpertMLP.apply(*args)
                else:
                    out = _expert_mlp_forward(*args)
        return self.drop2(out)

    def _grouped_mm_forward(self, x, params, tokens_per_expert, token_index, gates):
        """The experts as two grouped GEMMs over all rows (CUDA), differentiated by autograd."""
        fc1_weight, _, fc2_weight, _ = params
        fc1_bias, fc2_bias = self.fc1_bias, self.fc2_bias  # kept in the parameters' dtype, see _grouped_linear
        offsets = tokens_per_expert.cumsum(0).to(torch.int32)
        hidden = _grouped_linear(x.index_select(0, token_index), fc1_weight, fc1_bias, tokens_per_expert, offsets)
        out = _grouped_linear(self.drop1(self.act(hidden)), fc2_weight, fc2_bias, tokens_per_expert, offsets)
        if gates is not None:
            out = out * gates.unsqueeze(1)
        return combine(out, token_index, x.shape[0])

    def load_from_mlp(self, mlp: nn.Module, noise_std: float = 0.) -> None:
        """Copy a timm ``Mlp`` into every expert (sparse upcycling): ``fc1_weight[i] = mlp.fc1.weight.T`` etc.

        Args:
            mlp: A module with ``fc1`` and ``fc2`` linear layers of matching shapes and bias presence.
            noise_std: Standard deviation of Gaussian noise added to each expert's copy, to break the symmetry.
        """
        pairs = ((self.fc1_weight, mlp.fc1.weight.t()), (self.fc1_bias, mlp.fc1.bias),
                 (self.fc2_weight, mlp.fc2.weight.t()), (self.fc2_bias, mlp.fc2.bias))
        with torch.no_grad():
            for target, source in pairs:
                if target is None:
                    continue
                target.copy_(source.unsqueeze(0).expand_as(target))
                if noise_std > 0:
                    target.add_(torch.randn_like(target), alpha=noise_std)
