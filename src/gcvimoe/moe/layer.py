"""The MoE layer, a drop-in for timm's ``Mlp``, and the helpers that find MoE layers in a model.

One forward pass: router logits (fp32) -> routing rule -> capacity and grouping by expert (dispatch) -> experts on
their own tokens, gated and summed back per token. After it, the layer holds its auxiliary losses and routing
statistics::

    moe = MoE(384, 768, num_experts=8, top_k=2, normalize_gates=True)
    y = moe(x)                                  # x [..., 384] -> y [..., 384]
    loss = task_loss + collect_aux_loss(model)  # weighted router losses of every MoE layer
    print(collect_moe_report(model).summary())  # {'aux_loss': ..., 'dropped_fraction': ..., ...}
"""
from typing import Callable, Dict, Iterator, Optional, Tuple, Union

import torch
from timm.layers import Mlp
from torch import Tensor, nn

from gcvimoe.errors import GcvimoeError
from gcvimoe.moe.config import MoEConfig
from gcvimoe.moe.dispatch import DispatchPlan, combine, expert_capacity, plan_dispatch
from gcvimoe.moe.experts import Experts
from gcvimoe.moe.losses import gshard_balance_loss, importance_loss, load_loss, z_loss
from gcvimoe.moe.router import (
    CosineRouter, LinearRouter, Routing, expert_choice_routing, expert_probs, top_k_routing,
)
from gcvimoe.moe.stats import MoEReport, RoutingStats, routing_stats
from gcvimoe.tracing import exporting


class MoE(nn.Module):
    """Sparse Mixture-of-Experts MLP with the routing semantics of Tutel, V-MoE and DeepSpeed-MoE.

    Tokens are routed by a router that runs in fp32; each expert computes only the tokens routed to it and kept by
    its capacity. A dropped token's MoE output is zero (the block's residual carries it), or the shared expert's
    output when there is one.

    Args:
        in_features: Input width ``d``.
        hidden_features: Hidden width of every expert (default ``in_features``).
        out_features: Output width (default ``in_features``).
        act_layer: Activation module class of the experts.
        drop: Dropout after the activation and after fc2, as in timm's ``Mlp`` (a float or a pair).
        bias: Biases in fc1 and fc2 (a bool or a pair; Swin-MoE uses ``(True, False)``).
        config: The MoE options (:class:`gcvimoe.moe.MoEConfig`; default: its generic defaults).
        **options: MoE options by name, over ``config`` (``num_experts=8, top_k=2``); the placement ``moe_blocks``
            is the model's business and ignored here.

    Read after a forward pass (a pass without autograd computes them when first read, so inference that never
    reads them does not pay for them):
        aux_loss: Weighted sum of the router losses, a differentiable 0-dim tensor (0 when no loss applies).
        losses: Unweighted losses for logging, detached: ``'balance'`` or ``'importance'`` and ``'load'``, and ``'z'``.
        stats: :class:`RoutingStats` of the pass.
    """

    def __init__(  # noqa: PLR0913  (flat keywords, as timm's Mlp)
            self,
            in_features: int,
            hidden_features: Optional[int] = None,
            out_features: Optional[int] = None,
            act_layer: Callable[[], nn.Module] = nn.GELU,
            drop: Union[float, Tuple[float, float]] = 0.,
            bias: Union[bool, Tuple[bool, bool]] = True,
            *,
            config: Optional[MoEConfig] = None,
            device=None,
            dtype=None,
            **options,
    ):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        config = MoEConfig.resolve(config, base=MoEConfig(), **options)
        if config.num_experts < 1:
            raise GcvimoeError(f"num_experts must be an integer >= 1, got {config.num_experts} (an MoE layer needs "
                               f"experts)")
        hidden_features = hidden_features or in_features
        out_features = out_features or in_features
        self.config = config
        self.in_features = in_features
        self.hidden_features = hidden_features
        self.out_features = out_features
        self.num_experts = config.num_experts
        self.top_k = config.top_k
        self.capacity_factor = config.capacity_factor
        self.eval_capacity_factor = config.eval_capacity_factor
        self.router_type = router = config.router
        self.normalize_gates = config.normalize_gates
        self.batch_priority = config.batch_priority
        self.gate_noise = config.gate_noise
        self.balance_loss = config.balance_loss
        self.aux_loss_weight = config.aux_loss_weight
        self.z_loss_weight = config.z_loss_weight
        expert_dropout, shared_expert = config.expert_dropout, config.shared_expert

        router_class = CosineRouter if router == 'cosine' else LinearRouter
        self.router = router_class(in_features, self.num_experts, **dd)
        self.experts = Experts(self.num_experts, in_features, hidden_features, out_features, act_layer=act_layer,
                               drop=drop, expert_dropout=expert_dropout, bias=bias, **dd)
        if shared_expert:
            self.shared_expert = Mlp(in_features, hidden_features, out_features, act_layer=act_layer, bias=bias,
                                     drop=drop, **dd)
            self.shared_expert_gate = nn.Linear(in_features, 2, **dd)
        else:
            self.shared_expert = self.shared_expert_gate = None

        self._aux_loss: Optional[Tensor] = None
        self._losses: Dict[str, Tensor] = {}
        self._stats: Optional[RoutingStats] = None
        # without autograd, the last forward's routing: its losses and statistics are computed when first read
        self._pending: Optional[Tuple[Routing, DispatchPlan, torch.Size]] = None

    def __getstate__(self):
        # the last forward's losses hold its autograd graph, which neither deepcopy (EMA) nor pickle can take
        state = super().__getstate__()
        state.update(_aux_loss=None, _losses={}, _stats=None, _pending=None)
        return state

    @property
    def aux_loss(self) -> Optional[Tensor]:
        """Weighted sum of the last forward's router losses (0-dim; differentiable when it ran with autograd)."""
        self._resolve_pending()
        return self._aux_loss

    @property
    def losses(self) -> Dict[str, Tensor]:
        """The last forward's unweighted router losses, detached, for logging."""
        self._resolve_pending()
        return self._losses

    @property
    def stats(self) -> Optional[RoutingStats]:
        """The last forward's routing statistics."""
        self._resolve_pending()
        return self._stats

    def extra_repr(self) -> str:
        capacity = f"capacity_factor={self.capacity_factor}, eval_capacity_factor={self.eval_capacity_factor}"
        return f"num_experts={self.num_experts}, top_k={self.top_k}, router={self.router_type!r}, {capacity}"

    def capacity(self, num_tokens: int) -> Optional[int]:
        """Slots per expert for a batch of ``num_tokens`` in the current mode; None for dropless."""
        factor = self.capacity_factor if self.training else self.eval_capacity_factor
        if self.router_type == 'expert_choice':
            factor = factor or 1.0
        return expert_capacity(num_tokens, self.num_experts, self.top_k, factor)

    def forward(self, x: Tensor) -> Tensor:
        """Route every token of ``x`` ``[..., d]`` to its experts; returns ``[..., d_out]``."""
        if x.shape[-1] != self.in_features:
            raise ValueError(f"MoE input must have last dimension in_features={self.in_features}, got shape "
                             f"{tuple(x.shape)}")
        input_shape = x.shape[:-1]
        tokens = x.reshape(-1, self.in_features)
        num_tokens = tokens.shape[0]
        logits = self.router(tokens)
        capacity = self.capacity(num_tokens)
        if self.router_type == 'expert_choice':
            routing = expert_choice_routing(logits, capacity)
            capacity = None  # experts took at most their capacity already
        else:
            noise_std = self.gate_noise / self.num_experts if self.training else 0.
            routing = top_k_routing(logits, self.top_k, normalize_gates=self.normalize_gates, noise_std=noise_std)
        if exporting():
            return self._exported_forward(tokens, routing).reshape(*input_shape, self.out_features)
        plan = plan_dispatch(routing, self.num_experts, capacity, batch_priority=self.batch_priority)
        out = self._add_shared_expert(tokens, self.experts(tokens, plan.tokens_per_expert, plan.token_index,
                                                           gates=plan.gates))
        if torch.is_grad_enabled():
            self._pending = None
            self._record_outcome(routing, plan, input_shape)
        else:  # nothing needs the losses for a backward: inference pays for them only when someone reads them
            self._pending = (routing, plan, input_shape)
        return out.reshape(*input_shape, self.out_features)

    def _add_shared_expert(self, tokens: Tensor, out: Tensor) -> Tensor:
        if self.shared_expert is None:
            return out
        mix = expert_probs(self.shared_expert_gate(tokens))  # [t, 2]: the routed experts' share, the shared one's
        return out * mix[:, :1] + self.shared_expert(tokens) * mix[:, 1:]

    def _exported_forward(self, tokens: Tensor, routing: Routing) -> Tensor:
        """The dropless layer for ``torch.export`` and ONNX: every expert runs on every token (``e`` times the expert
        FLOPs) and each assignment picks its expert's row, so no shape depends on the routing. No statistics."""
        every_expert = self.experts.forward_all(tokens)  # [e, t, d_out]
        rows = every_expert[routing.expert_index, routing.token_index] * routing.gates.to(every_expert.dtype)[:, None]
        return self._add_shared_expert(tokens, combine(rows, routing.token_index, tokens.shape[0]))

    def _record_outcome(self, routing: Routing, plan: DispatchPlan, input_shape: torch.Size) -> None:
        losses = self._router_losses(routing) if input_shape.numel() else {}  # means over no tokens would be NaN
        self._aux_loss = self._weighted_loss(losses, routing.logits)
        self._losses = {name: loss.detach() for name, loss in losses.items()}
        self._stats = routing_stats(routing, plan, input_shape)

    def _resolve_pending(self) -> None:
        if self._pending is not None:
            pending, self._pending = self._pending, None
            with torch.no_grad():
                self._record_outcome(*pending)

    def _router_losses(self, routing: Routing) -> Dict[str, Tensor]:
        losses = {}
        if self.balance_loss == 'gshard':
            losses['balance'] = gshard_balance_loss(routing.probs, routing.top1_expert)
        elif self.balance_loss == 'importance_load':
            clean_probs = routing.probs if routing.noisy_logits is None else expert_probs(routing.logits)
            losses['importance'] = importance_loss(clean_probs)
            if routing.noisy_logits is not None:
                losses['load'] = load_loss(routing.logits, routing.noisy_logits, routing.noise_std, self.top_k)
        losses['z'] = z_loss(routing.logits)
        return losses

    def _weighted_loss(self, losses: Dict[str, Tensor], logits: Tensor) -> Tensor:
        aux_loss = logits.new_zeros(())
        balance_terms = [losses[name] for name in ('balance', 'importance', 'load') if name in losses]
        if balance_terms and self.aux_loss_weight > 0:
            aux_loss = aux_loss + self.aux_loss_weight * sum(balance_terms) / len(balance_terms)
        if 'z' in losses and self.z_loss_weight > 0:
            aux_loss = aux_loss + self.z_loss_weight * losses['z']
        return aux_loss

    def load_from_mlp(self, mlp: Mlp, noise_std: float = 0.0) -> None:
        """Sparse upcycling: copy a dense timm ``Mlp`` into every expert (and the shared expert); the router is kept.

        Args:
            mlp: The dense MLP this layer replaces, with the same widths and biases.
            noise_std: Standard deviation of Gaussian noise added to each expert's copy, to break the symmetry.
        """
        expected = (self.hidden_features, self.in_features), (self.out_features, self.hidden_features)
        found = tuple(mlp.fc1.weight.shape), tuple(mlp.fc2.weight.shape)
        if found != expected:
            raise ValueError(f"load_from_mlp: the MLP's fc1/fc2 weights are {found[0]}/{found[1]} but this MoE layer "
                             f"needs {expected[0]}/{expected[1]}")
        for layer, expert_bias in ((mlp.fc1, self.experts.fc1_bias), (mlp.fc2, self.experts.fc2_bias)):
            if (layer.bias is None) != (expert_bias is None):
                raise ValueError(f"load_from_mlp: the MLP's biases (fc1 {mlp.fc1.bias is not None}, fc2 "
                                 f"{mlp.fc2.bias is not None}) differ from the experts' (fc1 "
                                 f"{self.experts.fc1_bias is not None}, fc2 {self.experts.fc2_bias is not None})")
        self.experts.load_from_mlp(mlp, noise_std=noise_std)
        if self.shared_expert is not None:
            self.shared_expert.load_state_dict(mlp.state_dict())

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        key = prefix + 'experts.fc1_weight'
        if key in state_dict and state_dict[key].shape[0] != self.experts.num_experts:
            found = state_dict[key].shape[0]
            raise GcvimoeError(
                f"MoE layer {prefix.rstrip('.') or '(root)'}: the checkpoint has {found} experts but the model has "
                f"{self.experts.num_experts}; build the model with num_experts={found}, or shard/gather the experts "
                f"with gcvimoe.moe.parallel")
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def moe_layers(model: nn.Module) -> Iterator[Tuple[str, MoE]]:
    """Yield ``(qualified_name, layer)`` for every :class:`MoE` in ``model`` (the model itself included)."""
    for name, module in model.named_modules():
        if isinstance(module, MoE):
            yield name, module


def collect_aux_loss(model: nn.Module) -> Tensor:
    """Sum of the weighted auxiliary losses of the last forward pass of every MoE layer; 0 if there are none."""
    losses = [layer.aux_loss for _, layer in moe_layers(model) if layer.aux_loss is not None]
    if losses:
        return torch.stack(losses).sum()
    param = next(model.parameters(), None)
    return torch.zeros((), device=None if param is None else param.device)


def collect_moe_report(model: nn.Module) -> MoEReport:
    """Losses and routing statistics of the last forward pass of every MoE layer in ``model``."""
    layers = [(name, layer) for name, layer in moe_layers(model) if layer.stats is not None]
    return MoEReport(
        aux_loss=collect_aux_loss(model),
        losses={name: dict(layer.losses) for name, layer in layers},
        stats={name: layer.stats for name, layer in layers},
    )
