"""Experts: ``e`` MLPs with stacked weights, each computed only on the tokens routed to it.

The weights are stacked tensors (``fc1_weight [e, d, h]``, ``fc2_weight [e, h, d]``) laid out so that
``fc1_weight[i] = mlp.fc1.weight.T`` for a timm ``Mlp``. The experts take the dispatch plan (token indices grouped
by expert) and return the gated, combined output per token, so no padding slot is ever computed.

Paths, in order of preference: two ``F.grouped_mm`` calls (CUDA, bf16), biases folded into matrix products; the
CPU expert kernel when :mod:`gcvimoe.kernels` has it on (eager CPU); otherwise the plain path, grouped GEMMs as
custom operators (:mod:`gcvimoe.moe.grouped`) that autograd differentiates and ``torch.compile`` keeps in one graph.
Rows after the last expert's (assignments dropped by capacity) produce nothing on every path.
"""
import functools
import math
from typing import Callable, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from timm.layers import to_2tuple

from gcvimoe import kernels
from gcvimoe.kernels.dropout import dropout_bits
from gcvimoe.kernels.experts import expert_mlp
from gcvimoe.moe.dispatch import SortedPlan, combine
from gcvimoe.moe.gather import CombineRows, GatherRows
from gcvimoe.moe.grouped import group_of_rows, grouped_mm, rows_in_groups
from gcvimoe.moe.router import autocast_dtype, autocast_off

BIAS_COLUMNS = 8  # a bias folded into a grouped GEMM is one weight row, padded to keep rows 16-byte aligned


def _grouped_mm_supported(x: Tensor, weight: Tensor) -> bool:
    """torch's grouped GEMM kernel can multiply ``x`` by ``weight``: CUDA, bf16, SM 8.0+, 16-byte aligned rows."""
    return (x.is_cuda and x.dtype == torch.bfloat16 and weight.shape[-2] % 8 == 0 and weight.shape[-1] % 8 == 0
            and torch.cuda.get_device_capability(x.device) >= (8, 0))


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

    def __init__(  # noqa: PLR0913  (flat keywords, as timm's Mlp)
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

    local_experts_only = True  # every expert lives in this process (the sorted path needs that)

    def forward(self, x: Tensor, tokens_per_expert: Tensor, token_index: Tensor, gates: Optional[Tensor] = None,
                kernel: Optional[bool] = None) -> Tensor:
        """Run every expert on its tokens and sum the gated outputs back per token.

        Args:
            x: Tokens ``[t, d]``.
            tokens_per_expert: Rows per expert ``[e]``; expert ``i``'s rows follow expert ``i - 1``'s.
            token_index: Token each row reads and writes ``[n]``, grouped by expert.
            gates: Weight of each row's output ``[n]``, or None for 1.
            kernel: Run the CPU expert kernel (True), the plain path (False), or decide by device (None).

        Returns:
            ``[t, d_out]``: per token, the gated sum of its rows' expert outputs (zeros for a token without rows), in
            the autocast dtype when autocast is on.
        """
        x, params = self._cast(x)
        gates = None if gates is None else gates.to(x.dtype)
        with autocast_off(x):
            if self._use_kernel(x) if kernel is None else kernel:
                out = expert_mlp(x, tuple(params), gates, token_index, tokens_per_expert, self.act,
                                 self.drop1.p if self.training else 0.)
            else:
                out = self._rows_forward(x, params, tokens_per_expert, token_index, gates)
        return self.drop2(out)

    def forward_sorted(self, x: Tensor, plan: SortedPlan, expert_index: Tensor, gates: Tensor) -> Tensor:
        """The grouped-GEMM path: every expert on its group of the plan's sorted rows, gated and summed per token.

        Two ``F.grouped_mm`` calls between two gathers, and nothing else over the rows: fc1's bias is one more row
        of its weight, met by a column of ones that the gather appends to the rows it writes (its gradient comes out
        of the weight gradient's GEMM); fc2's bias is added per token in the combine, as ``(gates one-hot) @ bias``.
        A dropped assignment is computed in its expert's group and weighted 0.

        Args:
            x: Tokens ``[t, d]``.
            plan: The sorted plan of :func:`gcvimoe.moe.dispatch.plan_sorted`.
            expert_index: Expert of each assignment ``[n]`` (choice-major).
            gates: Weight of each assignment ``[n]`` (choice-major), 0 for a dropped one.

        Returns:
            ``[t, d_out]``, in the autocast dtype when autocast is on.
        """
        x, (fc1_weight, fc1_bias, fc2_weight, fc2_bias) = self._cast(x)
        offsets, gates = plan.bounds[1:], gates.to(x.dtype)
        pad = None if fc1_bias is None else _bias_column(x.dtype, x.device)
        with autocast_off(x):
            if plan.row_token is None:
                rows = GatherRows.apply(x, plan.row_assignment, plan.assignment_row, pad)
            else:  # expert choice: a token may feed any number of rows, so its gradient is a sum (index_add)
                rows = x.index_select(0, plan.row_token)
                rows = rows if pad is None else torch.cat([rows, pad.expand(rows.shape[0], BIAS_COLUMNS)], 1)
            hidden = F.grouped_mm(rows, _with_bias_row(fc1_weight, fc1_bias), offs=offsets)
            out = F.grouped_mm(self._hidden_dropout(self.act(hidden)), fc2_weight, offs=offsets)
            if plan.row_token is None:
                out = CombineRows.apply(out, gates, fc2_bias, expert_index, plan.row_assignment, plan.assignment_row,
                                        x.shape[0])
            else:
                row_gates = gates.index_select(0, plan.row_assignment)
                if fc2_bias is not None:
                    out = out + fc2_bias.index_select(0, expert_index.index_select(0, plan.row_assignment))
                out = combine(out * row_gates.unsqueeze(1), plan.row_token, x.shape[0])
        return self.drop2(out)

    def _cast(self, x: Tensor) -> Tuple[Tensor, list]:
        """``x`` and the weights in the autocast dtype when autocast is on, else as they are."""
        dtype = autocast_dtype(x)
        x = x if dtype is None else x.to(dtype)
        return x, [None if p is None else p.to(x.dtype)
                   for p in (self.fc1_weight, self.fc1_bias, self.fc2_weight, self.fc2_bias)]

    def forward_all(self, x: Tensor) -> Tensor:
        """Every expert on every token ``[t, d]`` -> ``[e, t, d_out]``, ungated (the exported, dropless layer)."""
        fc1_bias = None if self.fc1_bias is None else self.fc1_bias[:, None]
        fc2_bias = None if self.fc2_bias is None else self.fc2_bias[:, None]
        hidden = torch.einsum('td,edh->eth', x, self.fc1_weight.to(x.dtype))
        if fc1_bias is not None:
            hidden = hidden + fc1_bias.to(x.dtype)
        out = torch.einsum('eth,eho->eto', self.drop1(self.act(hidden)), self.fc2_weight.to(x.dtype))
        return self.drop2(out if fc2_bias is None else out + fc2_bias.to(x.dtype))

    def _hidden_dropout(self, hidden: Tensor) -> Tensor:
        if self.training and self.drop1.p > 0 and hidden.device.type == 'cpu' and kernels.enabled('dropout_bits'):
            return dropout_bits(hidden, self.drop1.p)
        return self.drop1(hidden)

    @staticmethod
    def _use_kernel(x: Tensor) -> bool:
        """The CPU kernel chunks by routing-dependent sizes read on the host: eager runs only, no graph capture."""
        return (kernels.enabled('expert_mlp') and x.device.type == 'cpu' and not torch.compiler.is_compiling()
                and not torch.jit.is_tracing())

    def _rows_forward(self, x, params, tokens_per_expert, token_index, gates, use_grouped_mm=None):
        """Gather, grouped GEMMs, activation, dropout, gate, combine; every shape depends on ``x`` and
        ``token_index`` alone, so it compiles into one graph. The GEMMs are two ``F.grouped_mm`` calls on CUDA in bf16
        (:meth:`_grouped_mm_forward`), else the custom operators of :mod:`gcvimoe.moe.grouped`; ``use_grouped_mm``
        overrides that choice (``F.grouped_mm`` also runs eagerly on the CPU in fp32)."""
        if _grouped_mm_supported(x, params[0]) if use_grouped_mm is None else use_grouped_mm:
            return self._grouped_mm_forward(x, params, tokens_per_expert, token_index, gates)
        fc1_weight, fc1_bias, fc2_weight, fc2_bias = params
        hidden = grouped_mm(x.index_select(0, token_index), fc1_weight, tokens_per_expert, fc1_bias)
        # rows past the last expert's (the tail of dropped assignments) come out as zeros
        out = grouped_mm(self._hidden_dropout(self.act(hidden)), fc2_weight, tokens_per_expert, fc2_bias)
        if gates is not None:
            out = out * gates.unsqueeze(1)
        return combine(out, token_index, x.shape[0])

    def _grouped_mm_forward(self, x, params, tokens_per_expert, token_index, gates):
        """Two ``F.grouped_mm`` calls, with the biases folded into matrix products instead of passes over the rows:
        ``[n, h]`` and ``[n, d]`` bias adds would cost more memory traffic than the GEMMs' epilogues a dense ``Linear``
        gets them in.

        - fc1's bias is one more weight row ``[e, d + 8, h]``, met by a column of ones appended to the tokens
          (``+ 8``: grouped GEMM rows must be 16-byte aligned). Its gradient is that row's, summed inside the GEMM
          in fp32.
        - fc2's bias is the same for every row of an expert, so a token's gated share of it is
          ``gates [t, e] @ bias [e, d]``: the combine starts from that instead of from zeros.
        - The tail of dropped rows runs through the last expert with gate 0. ``F.grouped_mm`` leaves rows past the
          last offset unwritten, in its output and in its input gradient; computed rows are finite, and the gate
          zeroes them and their gradients.
        """
        fc1_weight, fc1_bias, fc2_weight, fc2_bias = params
        num_tokens, num_rows = x.shape[0], token_index.shape[0]
        offsets = torch.cat([tokens_per_expert.cumsum(0)[:-1], tokens_per_expert.new_full((1,), num_rows)])
        offsets = offsets.to(torch.int32)
        kept = rows_in_groups(tokens_per_expert, num_rows)
        gates = kept.to(x.dtype) if gates is None else torch.where(kept, gates, 0)
        if fc1_bias is not None:
            ones_column = (torch.arange(8, device=x.device) == 0).to(x.dtype)  # built on the device: no copy to it
            x = torch.cat([x, ones_column.expand(num_tokens, 8)], 1)
            fc1_weight = torch.cat([fc1_weight, fc1_bias[:, None], fc1_weight.new_zeros(self.num_experts, 7,
                                                                                         fc1_weight.shape[-1])], 1)
        hidden = F.grouped_mm(x.index_select(0, token_index), fc1_weight, offs=offsets)
        out = F.grouped_mm(self._hidden_dropout(self.act(hidden)), fc2_weight, offs=offsets) * gates.unsqueeze(1)
        start = None
        if fc2_bias is not None:
            row_expert = group_of_rows(tokens_per_expert, num_rows)
            token_gates = out.new_zeros(num_tokens * self.num_experts).index_add_(
                0, token_index * self.num_experts + row_expert, gates)
            start = token_gates.view(num_tokens, self.num_experts) @ fc2_bias
        return combine(out, token_index, num_tokens, start=start)

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


def _bias_column(dtype: torch.dtype, device: torch.device) -> Tensor:
    """``[1, 0, ..., 0]``: the columns appended to a GEMM's input to meet a bias row (eagerly one tensor per device
    and dtype)."""
    if torch.compiler.is_compiling():  # a graph makes its own constants
        return torch.eye(1, BIAS_COLUMNS, dtype=dtype, device=device)[0]
    return _cached_bias_column(dtype, device)


@functools.lru_cache(maxsize=None)
def _cached_bias_column(dtype: torch.dtype, device: torch.device) -> Tensor:
    with torch.inference_mode(False), torch.no_grad():
        return torch.eye(1, BIAS_COLUMNS, dtype=dtype, device=device)[0]


def _with_bias_row(weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """``[e, a, b]`` weights with the bias as row ``a`` (and copies of it in the padding rows, which meet zeros)."""
    if bias is None:
        return weight
    return torch.cat([weight, bias.unsqueeze(1).expand(-1, BIAS_COLUMNS, -1)], 1)
