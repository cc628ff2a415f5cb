"""The MoE layer, a drop-in for timm's ``Mlp``, and the helpers that find MoE layers in a model.

One forward pass: router logits (fp32) -> routing rule -> capacity and grouping by expert (dispatch) -> experts on
their own tokens, gated and summed back per token. After it, the layer holds its auxiliary losses and routing
statistics::

    moe = MoE(384, 768, num_experts=8, top_k=2, normalize_gates=True)
    y = moe(x)                                  # x [..., 384] -> y [..., 384]
    loss = task_loss + collect_aux_loss(model)  # weighted router losses of every MoE layer
    print(collect_moe_report(model).summary())  # {'aux_loss': ..., 'dropped_fraction': ..., ...}
"""
import functools
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, Mapping, Optional, Tuple, Union

import torch
from timm.layers import Mlp
from torch import Tensor, nn

from gcvimoe.errors import GcvimoeError
from gcvimoe.moe.backends import Plan, choose_expert_backend
from gcvimoe.moe.config import MoEConfig
from gcvimoe.moe.dispatch import combine, expert_capacity
from gcvimoe.moe.experts import Experts
from gcvimoe.moe.losses import gshard_balance_loss, importance_loss, load_loss, z_loss
from gcvimoe.moe.router import ROUTERS, Routing, expert_probs
from gcvimoe.moe.stats import MoEReport, RoutingStats, routing_stats
from gcvimoe.tracing import exporting

BALANCE_TERMS = ('balance', 'importance', 'load')


@dataclass
class _Outcome:
    """What the last forward decided, kept (without autograd) for the losses and statistics read after it."""
    routing: Routing
    plan: Plan
    input_shape: torch.Size


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
        config: The MoE options (:class:`gcvimoe.moe.MoEConfig`; default: its generic defaults), kept as
            ``self.config``.
        **options: MoE options by name, over ``config`` (``num_experts=8, top_k=2``); the placement ``moe_blocks``
            is the model's business and ignored here.

    Read after a forward pass; each is computed when first read, so a step that never reads one does not pay for it
    (``aux_loss`` of a pass with autograd is the exception: the backward needs it, so it is computed in the pass):
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

        self.router = ROUTERS[config.router].module(in_features, config.num_experts, **dd)
        self.experts = Experts(config.num_experts, in_features, hidden_features, out_features, act_layer=act_layer,
                               drop=drop, expert_dropout=config.expert_dropout, bias=bias, **dd)
        if config.shared_expert:
            self.shared_expert = Mlp(in_features, hidden_features, out_features, act_layer=act_layer, bias=bias,
                                     drop=drop, **dd)
            self.shared_expert_gate = nn.Linear(in_features, 2, **dd)
        else:
            self.shared_expert = self.shared_expert_gate = None

        self._aux_loss: Optional[Tensor] = None
        self._losses: Optional[Dict[str, Tensor]] = None
        self._stats: Optional[RoutingStats] = None
        self._outcome: Optional[_Outcome] = None

    def __getstate__(self):
        # the last forward's aux loss holds its autograd graph, which neither deepcopy (EMA) nor pickle can take
        state = super().__getstate__()
        state.update(_aux_loss=None, _losses=None, _stats=None, _outcome=None)
        return state

    @property
    def num_experts(self) -> int:
        return self.config.num_experts

    @property
    def top_k(self) -> int:
        return self.config.top_k

    @property
    def aux_loss(self) -> Optional[Tensor]:
        """Weighted sum of the last forward's router losses (0-dim; differentiable when it ran with autograd)."""
        if self._aux_loss is None and self._outcome is not None:
            with torch.no_grad():
                self._aux_loss = self._weighted_loss(self._outcome)
        return self._aux_loss

    @property
    def losses(self) -> Dict[str, Tensor]:
        """The last forward's unweighted router losses, detached, for logging."""
        if self._losses is None:
            with torch.no_grad():
                self._losses = {} if self._outcome is None else self._router_losses(self._outcome, needed=None)
        return self._losses

    @property
    def stats(self) -> Optional[RoutingStats]:
        """The last forward's routing statistics."""
        if self._stats is None and self._outcome is not None:
            outcome = self._outcome
            self._stats = routing_stats(outcome.routing, outcome.plan, outcome.input_shape)
        return self._stats

    def extra_repr(self) -> str:
        cfg = self.config
        capacity = f"capacity_factor={cfg.capacity_factor}, eval_capacity_factor={cfg.eval_capacity_factor}"
        return f"num_experts={cfg.num_experts}, top_k={cfg.top_k}, router={cfg.router!r}, {capacity}"

    def capacity(self, num_tokens: int) -> Optional[int]:
        """Slots per expert for a batch of ``num_tokens`` in the current mode; None for dropless."""
        cfg = self.config
        factor = cfg.capacity_factor if self.training else cfg.eval_capacity_factor
        if ROUTERS[cfg.router].chooses_tokens:
            factor = factor or 1.0
        return expert_capacity(num_tokens, cfg.num_experts, cfg.top_k, factor)

    def forward(self, x: Tensor) -> Tensor:
        """Route every token of ``x`` ``[..., d]`` to its experts; returns ``[..., d_out]``."""
        if x.shape[-1] != self.in_features:
            raise ValueError(f"MoE input must have last dimension in_features={self.in_features}, got shape "
                             f"{tuple(x.shape)}")
        cfg = self.config
        input_shape = x.shape[:-1]
        tokens = x.reshape(-1, self.in_features)
        capacity = self.capacity(tokens.shape[0])
        router = ROUTERS[cfg.router]
        routing = router.route(self.router(tokens), cfg, capacity, self.training)
        if exporting():
            return self._exported_forward(tokens, routing).reshape(*input_shape, self.out_features)
        backend = choose_expert_backend(tokens, self.experts)
        out, plan = backend.run(self.experts, tokens, routing, cfg.num_experts,
                                None if router.chooses_tokens else capacity, cfg.batch_priority)
        out = self._add_shared_expert(tokens, out)
        outcome = _Outcome(routing, plan, input_shape)
        self._outcome, self._losses, self._stats = _Outcome(routing.detach(), plan, input_shape), None, None
        # a pass with autograd computes the weighted losses its backward needs; the rest waits until read
        self._aux_loss = self._weighted_loss(outcome) if torch.is_grad_enabled() else None
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
        token_index = routing.token_index
        rows = every_expert[routing.expert_index, token_index] * routing.gates.to(every_expert.dtype)[:, None]
        return self._add_shared_expert(tokens, combine(rows, token_index, tokens.shape[0]))

    def _router_losses(self, outcome: _Outcome, needed: Optional[Tuple[str, ...]],
                       gshard_weight: float = 1.0) -> Dict[str, Tensor]:
        """The unweighted losses named in ``needed`` (None: every one that applies), computed from the outcome (the
        GShard loss times ``gshard_weight``)."""
        cfg, routing = self.config, outcome.routing
        if not outcome.input_shape.numel():  # means over no tokens would be NaN
            return {}
        losses = {}

        def wanted(name: str) -> bool:
            return needed is None or name in needed

        if cfg.balance_loss == 'gshard' and wanted('balance'):
            one_choice = cfg.top_k == 1 and not ROUTERS[cfg.router].chooses_tokens
            first_choices = outcome.plan.first_choices() if one_choice else None  # the plan counted them already
            losses['balance'] = gshard_balance_loss(routing.probs, routing.top1_expert, first_choices, gshard_weight)
        elif cfg.balance_loss == 'importance_load':
            if wanted('importance'):
                clean_probs = routing.probs if routing.noisy_logits is None else expert_probs(routing.logits)
                losses['importance'] = importance_loss(clean_probs)
            if routing.noisy_logits is not None and wanted('load'):
                losses['load'] = load_loss(routing.logits, routing.noisy_logits, routing.noise_std, cfg.top_k)
        if wanted('z'):
            losses['z'] = z_loss(routing.logits)
        return losses

    def _weighted_loss(self, outcome: _Outcome) -> Tensor:
        """``aux_loss_weight`` x the mean of the balance terms + ``z_loss_weight`` x the z-loss, computing only the
        terms whose weight is not 0."""
        cfg = self.config
        needed = (BALANCE_TERMS if cfg.aux_loss_weight > 0 else ()) + (('z',) if cfg.z_loss_weight > 0 else ())
        losses = self._router_losses(outcome, needed, gshard_weight=cfg.aux_loss_weight) if needed else {}
        balance_terms = [losses[name] for name in BALANCE_TERMS if name in losses]
        weighted = []
        if 'balance' in losses:  # the GShard loss, weighted already
            weighted.append(losses['balance'])
        elif balance_terms:
            weighted.append(functools.reduce(torch.add, balance_terms) * (cfg.aux_loss_weight / len(balance_terms)))
        if 'z' in losses:
            weighted.append(losses['z'] * cfg.z_loss_weight)
        return functools.reduce(torch.add, weighted) if weighted else outcome.routing.logits.new_zeros(())

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
        losses=_LayerLosses(dict(layers)),
        stats={name: layer.stats for name, layer in layers},
    )


class _LayerLosses(Mapping):
    """Layer name -> its unweighted losses, computed when a layer's entry is read (a training step that logs only
    the expert counts computes none)."""

    def __init__(self, layers: Dict[str, 'MoE']):
        self._layers = layers

    def __getitem__(self, name: str) -> Dict[str, Tensor]:
        return dict(self._layers[name].losses)

    def __iter__(self):
        return iter(self._layers)

    def __len__(self) -> int:
        return len(self._layers)
