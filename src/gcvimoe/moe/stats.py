"""Routing statistics of an MoE layer and the report that gathers them over a model.

The statistics are detached tensors computed with a few O(t * k) reductions, when first read after a forward (a
step that never reads them does not compute them); nothing is copied to the host until :meth:`RoutingStats.summary` or :meth:`MoEReport.summary` is called.
"""
import functools
from dataclasses import dataclass, field
from typing import Dict, Mapping, Union

import torch
from torch import Tensor

from gcvimoe.moe.dispatch import DispatchPlan, SortedPlan
from gcvimoe.moe.router import Routing


class RoutingStats:
    """How one forward pass of an MoE layer routed its tokens; each statistic is computed when first read (the
    expert counts a training log reads every step cost a subtraction, the rest nothing until asked for).

    Attributes:
        tokens_per_expert: Assignments each expert was asked to take, before capacity ``[e]`` (sums to ``t * k`` for
            token choice).
        kept_tokens_per_expert: Assignments each expert computed, after capacity ``[e]``.
        dropped_fraction: Share of assignments dropped by capacity (0-dim).
        unrouted_fraction: Share of tokens that no expert computed, whose MoE output is zero (0-dim). Equal to
            ``dropped_fraction`` for top-1 routing; for expert choice, the tokens no expert picked.
        router_entropy: Mean entropy in nats of the tokens' routing distributions (0-dim); ``log(e)`` is uniform.
        top1_expert: Most probable expert of every token, shaped as the input without its last dimension.
        unrouted: Whether no expert computed each token (capacity dropped it, or no expert chose it), shaped as
            ``top1_expert``.
    """

    def __init__(self, routing: Routing, plan: Union[DispatchPlan, SortedPlan], input_shape: torch.Size):
        self._routing, self._plan, self._input_shape = routing, plan, input_shape
        self._num_tokens = routing.probs.shape[0]

    @functools.cached_property
    def tokens_per_expert(self) -> Tensor:
        return self._plan.requested_per_expert.detach()

    @functools.cached_property
    def kept_tokens_per_expert(self) -> Tensor:
        return self._plan.tokens_per_expert.detach()

    @functools.cached_property
    def dropped_fraction(self) -> Tensor:
        requested = self.tokens_per_expert.sum()
        return (requested - self.kept_tokens_per_expert.sum()) / requested.clamp(min=1)

    @functools.cached_property
    def unrouted(self) -> Tensor:
        with torch.no_grad():
            return (self._plan.kept_per_token(self._num_tokens) == 0).reshape(self._input_shape)

    @functools.cached_property
    def unrouted_fraction(self) -> Tensor:
        return self.unrouted.sum() / max(self._num_tokens, 1)  # 0, not NaN, for an empty batch

    @functools.cached_property
    def router_entropy(self) -> Tensor:
        with torch.no_grad():
            return torch.special.entr(self._routing.probs.detach()).sum() / max(self._num_tokens, 1)

    @functools.cached_property
    def top1_expert(self) -> Tensor:
        return self._routing.top1_expert.detach().reshape(self._input_shape)

    def summary(self) -> Dict[str, float]:
        """Scalar statistics as floats for logging, with ``load_cv``: the coefficient of variation of the kept load."""
        kept = self.kept_tokens_per_expert.float()
        return {
            'dropped_fraction': self.dropped_fraction.item(),
            'unrouted_fraction': self.unrouted_fraction.item(),
            'router_entropy': self.router_entropy.item(),
            'load_cv': (kept.std(correction=0) / kept.mean().clamp(min=1.)).item(),
        }


def routing_stats(routing: Routing, plan: Union[DispatchPlan, SortedPlan], input_shape: torch.Size) -> RoutingStats:
    """Statistics of one routing decision (computed as they are read).

    Args:
        routing: The assignments before capacity.
        plan: The assignments after capacity.
        input_shape: Shape of the layer input without its last dimension (``t`` tokens in all).
    """
    return RoutingStats(routing, plan, input_shape)


@dataclass
class MoEReport:
    """Losses and routing statistics of every MoE layer of a model after a forward pass.

    Attributes:
        aux_loss: Sum of the layers' weighted auxiliary losses (differentiable), to add to the task loss.
        losses: Layer name -> {loss name -> unweighted loss}.
        stats: Layer name -> routing statistics.
    """
    aux_loss: Tensor
    losses: Mapping[str, Dict[str, Tensor]] = field(default_factory=dict)
    stats: Dict[str, RoutingStats] = field(default_factory=dict)

    def summary(self, per_layer: bool = False) -> Dict[str, float]:
        """Floats for logging: the aux loss, and each loss and statistic averaged over layers (``max_dropped_fraction``
        too); with ``per_layer`` also every layer's own values under ``<layer>/<name>``.
        """
        out = {'aux_loss': float(self.aux_loss.detach())}
        layer_values = {name: {**{f'loss_{key}': float(value.detach()) for key, value in self.losses[name].items()},
                               **stats.summary()}
                        for name, stats in self.stats.items()}
        if not layer_values:
            return out
        for key in dict.fromkeys(key for values in layer_values.values() for key in values):
            present = [values[key] for values in layer_values.values() if key in values]
            out[key] = sum(present) / len(present)
        out['max_dropped_fraction'] = max(values['dropped_fraction'] for values in layer_values.values())
        if per_layer:
            out.update({f"{name}/{key}": value
                        for name, values in layer_values.items() for key, value in values.items()})
        return out
