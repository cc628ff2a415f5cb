"""Routing statistics of an MoE layer and the report that gathers them over a model.

The statistics are detached tensors computed with a few O(t * k) reductions, when first read after a forward (a
step that never reads them does not compute them); nothing is copied to the host until :meth:`RoutingStats.summary` or :meth:`MoEReport.summary` is called.
"""
from dataclasses import dataclass, field
from typing import Dict, Union

import torch
from torch import Tensor

from gcvimoe.moe.dispatch import DispatchPlan, SortedPlan
from gcvimoe.moe.router import Routing


@dataclass
class RoutingStats:
    """How one forward pass of an MoE layer routed its tokens.

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
    tokens_per_expert: Tensor
    kept_tokens_per_expert: Tensor
    dropped_fraction: Tensor
    unrouted_fraction: Tensor
    router_entropy: Tensor
    top1_expert: Tensor
    unrouted: Tensor

    def summary(self) -> Dict[str, float]:
        """Scalar statistics as floats for logging, with ``load_cv``: the coefficient of variation of the kept load."""
        kept = self.kept_tokens_per_expert.float()
        return {
            'dropped_fraction': self.dropped_fraction.item(),
            'unrouted_fraction': self.unrouted_fraction.item(),
            'router_entropy': self.router_entropy.item(),
            'load_cv': (kept.std(correction=0) / kept.mean().clamp(min=1.)).item(),
        }


@torch.no_grad()
def routing_stats(routing: Routing, plan: Union[DispatchPlan, SortedPlan], input_shape: torch.Size) -> RoutingStats:
    """Statistics of one routing decision.

    Args:
        routing: The assignments before capacity.
        plan: The assignments after capacity.
        input_shape: Shape of the layer input without its last dimension (``t`` tokens in all).
    """
    num_tokens = routing.probs.shape[0]
    requested = plan.requested_per_expert
    kept = plan.tokens_per_expert
    rows_per_token = plan.kept_per_token(num_tokens)
    return RoutingStats(
        tokens_per_expert=requested,
        kept_tokens_per_expert=kept,
        dropped_fraction=(requested.sum() - kept.sum()) / requested.sum().clamp(min=1),
        unrouted_fraction=(rows_per_token == 0).sum() / max(num_tokens, 1),  # 0, not NaN, for an empty batch
        router_entropy=torch.special.entr(routing.probs).sum() / max(num_tokens, 1),
        top1_expert=routing.top1_expert.reshape(input_shape),
        unrouted=(rows_per_token == 0).reshape(input_shape),
    )


@dataclass
class MoEReport:
    """Losses and routing statistics of every MoE layer of a model after a forward pass.

    Attributes:
        aux_loss: Sum of the layers' weighted auxiliary losses (differentiable), to add to the task loss.
        losses: Layer name -> {loss name -> unweighted loss}.
        stats: Layer name -> routing statistics.
    """
    aux_loss: Tensor
    losses: Dict[str, Dict[str, Tensor]] = field(default_factory=dict)
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
