"""Expert parallelism: each of ``w`` processes holds ``e / w`` experts, and rows travel to their expert's process by
all-to-all (``torch.distributed``: gloo on CPU, NCCL on GPU, the same code).

Routing, capacity and gates stay on the process that owns the tokens, so every process computes exactly what the
single-process layer computes on its own batch; only the expert GEMMs run elsewhere. The row counts per expert are
exchanged first, so the splits are variable and dropless routing works. Usage, after ``init_process_group``::

    model = shard_experts_(model)                          # keep this process's experts of every MoE layer
    full = gather_expert_state_dict(model.state_dict())    # collective; checkpoints always hold all experts
    model.load_state_dict(shard_expert_state_dict(full, dist.get_rank(), dist.get_world_size()))
    optim_full = gather_expert_optimizer_state(optimizer)  # the same for the optimiser's per-parameter state
    optimizer.load_state_dict(shard_expert_optimizer_state(optim_full, optimizer, rank, world_size))

Expert gradients sum the contributions of every process's tokens. When data parallelism averages the other
gradients over the ``w`` processes, divide the expert gradients (``param.is_expert``) by ``w`` to match.
``gcvimoe train --expert-parallel`` does all of this (:mod:`gcvimoe.train.distributed`).
"""
import copy
import functools
from typing import Any, Dict, List, Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn

from gcvimoe.moe.dispatch import combine
from gcvimoe.moe.experts import Experts
from gcvimoe.moe.layer import moe_layers

EXPERT_PARAM_NAMES = ('fc1_weight', 'fc1_bias', 'fc2_weight', 'fc2_bias')


class _AllToAll(torch.autograd.Function):
    """``dist.all_to_all_single`` on rows with variable splits; the backward sends the gradients back the same way."""

    @staticmethod
    def forward(ctx, rows, output_splits, input_splits, group):
        ctx.splits, ctx.group = (input_splits, output_splits), group
        out = rows.new_empty(sum(output_splits), *rows.shape[1:])
        dist.all_to_all_single(out, rows.contiguous(), output_splits, input_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        output_splits, input_splits = ctx.splits
        return _AllToAll.apply(grad_out, output_splits, input_splits, ctx.group), None, None, None


def all_to_all(rows: Tensor, output_splits: List[int], input_splits: List[int], group=None) -> Tensor:
    """Differentiable all-to-all: ``input_splits[i]`` rows go to process ``i``, ``output_splits[i]`` come from it."""
    return _AllToAll.apply(rows, output_splits, input_splits, group)


class ExpertParallelExperts(Experts):
    """This process's share of ``e`` experts, called like :class:`Experts` with rows for all ``e`` experts.

    The parameters hold the local experts only (``fc1_weight [e / w, d, h]``) under the usual names; ``num_experts``
    is the local count, ``num_global_experts`` the total.

    Args:
        num_experts: Experts over all processes, divisible by the group size.
        group: Process group of the expert-parallel processes (default: the world).
        Other arguments: as :class:`Experts`.
    """

    def __init__(self, num_experts: int, in_features: int, hidden_features: int, out_features: int, *args,
                 group: Optional[dist.ProcessGroup] = None, **kwargs):
        world_size = dist.get_world_size(group)
        if num_experts % world_size:
            raise ValueError(f"num_experts={num_experts} must be divisible by the {world_size} expert-parallel "
                             f"processes")
        super().__init__(num_experts // world_size, in_features, hidden_features, out_features, *args, **kwargs)
        self.num_global_experts = num_experts
        self.world_size = world_size
        self.first_expert = dist.get_rank(group) * self.num_experts
        self.group = group

    @classmethod
    def from_experts(cls, experts: Experts, group: Optional[dist.ProcessGroup] = None) -> 'ExpertParallelExperts':
        """This process's share of a full :class:`Experts` module (same weights, activation and dropout)."""
        weight = experts.fc1_weight
        shard = cls(
            experts.num_experts, experts.in_features, experts.hidden_features, experts.out_features,
            act_layer=functools.partial(copy.deepcopy, experts.act),
            drop=(experts.drop1.p, experts.drop2.p),
            bias=(experts.fc1_bias is not None, experts.fc2_bias is not None),
            group=group, device=weight.device, dtype=weight.dtype,
        )
        local = slice(shard.first_expert, shard.first_expert + shard.num_experts)
        with torch.no_grad():
            for name in EXPERT_PARAM_NAMES:
                if getattr(shard, name) is not None:
                    getattr(shard, name).copy_(getattr(experts, name)[local])
        return shard

    def extra_repr(self) -> str:
        return (f"num_global_experts={self.num_global_experts}, first_expert={self.first_expert}, "
                + super().extra_repr())

    local_experts_only = False

    def forward(self, x: Tensor, tokens_per_expert: Tensor, token_index: Tensor, gates: Optional[Tensor] = None,
                kernel: Optional[bool] = None) -> Tensor:
        """Send every row to its expert's process, run the local experts there, and combine the outputs at home.

        Args:
            x: Tokens ``[t, d]``.
            tokens_per_expert: Rows per expert over all ``e`` experts ``[e]``.
            token_index: Token each row reads and writes ``[n]``, grouped by expert.
            gates: Weight of each row's output ``[n]``, or None for 1.

        Returns:
            ``[t, d_out]``, as :meth:`Experts.forward` with all experts.
        """
        # only the kept rows travel: the all-to-all's sizes are read on the host anyway (it runs outside a graph)
        num_kept = int(tokens_per_expert.sum())
        token_index = token_index[:num_kept]
        gates = None if gates is None else gates[:num_kept]
        rows = x.index_select(0, token_index)
        send_counts = tokens_per_expert.reshape(self.world_size, self.num_experts)  # [w, e_local]
        recv_counts = torch.empty_like(send_counts)  # row s: what process s sends to each local expert
        dist.all_to_all_single(recv_counts, send_counts, group=self.group)
        send_splits, recv_splits = send_counts.sum(1).tolist(), recv_counts.sum(1).tolist()
        received = all_to_all(rows, recv_splits, send_splits, self.group)  # grouped by (source, local expert)
        local_expert = torch.arange(self.num_experts, device=x.device).repeat(self.world_size)
        local_expert = local_expert.repeat_interleave(recv_counts.reshape(-1))
        by_expert = torch.argsort(local_expert, stable=True)  # row order grouped by (local expert, source)
        # each received row is read and written once through by_expert, so the output keeps the received order
        out = super().forward(received, recv_counts.sum(0), by_expert, kernel=kernel)
        out = all_to_all(out, send_splits, recv_splits, self.group)
        if gates is not None:
            out = out * gates.to(out.dtype).unsqueeze(1)
        return combine(out, token_index, x.shape[0])


def is_expert_parallel(model: nn.Module) -> bool:
    """Whether any MoE layer of ``model`` holds a shard of its experts (its forward is then a collective)."""
    return any(isinstance(layer.experts, ExpertParallelExperts) for _, layer in moe_layers(model))


def whole_model_parameters(model: nn.Module) -> int:
    """Parameters of the whole model, however its experts are sharded: each process holds ``e / w`` experts of a
    layer, so its own count would leave out the other processes' experts."""
    total = sum(p.numel() for p in model.parameters())
    for _, layer in moe_layers(model):
        if isinstance(layer.experts, ExpertParallelExperts):
            local = sum(p.numel() for p in layer.experts.parameters())
            total += local * (layer.experts.num_global_experts // layer.experts.num_experts - 1)
    return total


def shard_experts_(model: nn.Module, group: Optional[dist.ProcessGroup] = None) -> nn.Module:
    """Replace the experts of every MoE layer of ``model`` by this process's share of them, in place.

    Every process must hold the same full weights beforehand (same seed or same checkpoint).
    """
    for _, layer in moe_layers(model):
        if not isinstance(layer.experts, ExpertParallelExperts):
            layer.experts = ExpertParallelExperts.from_experts(layer.experts, group)
    return model


def _is_expert_key(key: str) -> bool:
    return any(key.endswith(f'experts.{name}') for name in EXPERT_PARAM_NAMES)


def _gather_experts(value: Tensor, group: Optional[dist.ProcessGroup]) -> Tensor:
    """Every process's experts of ``value`` (experts first), concatenated in rank order; a collective."""
    parts = [torch.empty_like(value) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, value.contiguous(), group=group)
    return torch.cat(parts)


def _local_experts(value: Tensor, rank: int, local: int) -> Tensor:
    """Process ``rank``'s ``local`` experts of a tensor holding every expert (experts first)."""
    return value[rank * local:(rank + 1) * local]


def shard_expert_state_dict(state_dict: Dict[str, Tensor], rank: int, world_size: int) -> Dict[str, Tensor]:
    """The part of a full state dict that process ``rank`` of ``world_size`` expert-parallel processes loads.

    Expert tensors (``...experts.fc1_weight`` etc., experts first) are sliced; everything else is kept whole.
    """
    shard = {}
    for key, value in state_dict.items():
        if _is_expert_key(key):
            if value.shape[0] % world_size:
                raise ValueError(f"{key} holds {value.shape[0]} experts, not divisible by {world_size} processes")
            value = _local_experts(value, rank, value.shape[0] // world_size)
        shard[key] = value
    return shard


def gather_expert_state_dict(state_dict: Dict[str, Tensor], group: Optional[dist.ProcessGroup] = None
                             ) -> Dict[str, Tensor]:
    """The full state dict of an expert-parallel model: every process's experts, concatenated in rank order.

    A collective: every process of ``group`` must call it, with the same keys.
    """
    return {key: _gather_experts(value, group) if _is_expert_key(key) else value for key, value in state_dict.items()}


def _expert_params_by_index(optimizer: torch.optim.Optimizer) -> Dict[int, Tensor]:
    """The expert parameters of ``optimizer`` under their index in its state dict (parameter order over groups)."""
    params = [param for group in optimizer.param_groups for param in group['params']]
    return {index: param for index, param in enumerate(params) if getattr(param, 'is_expert', False)}


def _check_per_expert(name: str, value: Tensor, num_experts: int) -> None:
    if value.shape[0] != num_experts:
        raise ValueError(f"optimiser state '{name}' of an expert parameter has shape {tuple(value.shape)}, not one "
                         f"row per expert ({num_experts}): the optimiser mixes experts in its statistics (as "
                         f"Adafactor does for stacked biases) and cannot be split over expert-parallel processes")


def gather_expert_optimizer_state(optimizer: torch.optim.Optimizer, group: Optional[dist.ProcessGroup] = None
                                  ) -> Dict[str, Any]:
    """``optimizer.state_dict()`` with every expert parameter's state (Adam's moments, momentum buffers) gathered from
    all processes, as if one process held every expert.

    A collective: every process of ``group`` must call it. A state tensor with the parameter's experts as its
    leading dimension (moments shaped like the parameter, factored row or column statistics of one expert) is
    concatenated over the processes in rank order; scalars (``step``) are the same everywhere and kept. Any other
    tensor mixes the experts (Adafactor's column statistics of a ``[e, h]`` bias) and raises a ValueError.
    """
    state = optimizer.state_dict()
    packed = dict(state['state'])  # the per-parameter dicts are the optimiser's live state: copy before replacing
    for index, param in _expert_params_by_index(optimizer).items():
        full = dict(packed.get(index, {}))
        for name, value in full.items():
            if torch.is_tensor(value) and value.dim():
                _check_per_expert(name, value, param.shape[0])
                full[name] = _gather_experts(value, group)
        if index in packed:
            packed[index] = full
    return dict(state, state=packed)


def shard_expert_optimizer_state(state_dict: Dict[str, Any], optimizer: torch.optim.Optimizer, rank: int,
                                 world_size: int) -> Dict[str, Any]:
    """The part of a full optimiser state dict (one process held every expert) that process ``rank`` loads into
    ``optimizer``, whose expert parameters are this process's shard."""
    packed = dict(state_dict['state'])
    for index, param in _expert_params_by_index(optimizer).items():
        if index not in packed:
            continue
        local = {}
        for name, value in packed[index].items():
            if torch.is_tensor(value) and value.dim():
                _check_per_expert(name, value, param.shape[0] * world_size)
                value = _local_experts(value, rank, param.shape[0])
            local[name] = value
        packed[index] = local
    return dict(state_dict, state=packed)
