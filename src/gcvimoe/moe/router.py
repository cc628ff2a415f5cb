"""Routers: score tokens against experts and decide which (token, expert) pairs are computed.

A router module maps tokens to fp32 logits ``[t, e]``. A routing rule turns the logits into a :class:`Routing`: the
(token, expert, gate) assignments in the order they claim expert slots. Capacity is applied afterwards by the
dispatcher (:mod:`gcvimoe.moe.dispatch`), so the routing rule and the capacity rule stay independent.

- :func:`top_k_routing`: token choice (GShard, Switch, V-MoE, Tutel), optionally noisy and normalised.
- :func:`expert_choice_routing`: every expert picks its ``c`` best tokens (Zhou et al. 2022), balanced by construction.
"""
import contextlib
import functools
import math
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class Routing:
    """The routing decision for ``t`` tokens, as ``n`` (token, expert, gate) assignments.

    Attributes:
        logits: Clean router logits ``[t, e]``, fp32 or wider.
        probs: Softmax over experts of the logits the decision was made from (noisy in training when gate noise is
            on) ``[t, e]``.
        expert_index: Expert of each assignment ``[n]``, in the order assignments claim expert slots.
        gates: Weight of each assignment's expert output in its token's output ``[n]``.
        top1_expert: Most probable expert of every token ``[t]``.
        top1_prob: Its probability ``[t]`` (detached), the priority of batch-priority routing.
        noisy_logits: ``logits`` plus the gate noise, or None when no noise was added.
        noise_std: Standard deviation of the gate noise, 0 without noise.
        explicit_token_index: Token of each assignment ``[n]`` when it is not choice-major (expert choice); None
            for token choice, where :attr:`token_index` derives it when asked.
    """
    logits: Tensor
    probs: Tensor
    expert_index: Tensor
    gates: Tensor
    top1_expert: Tensor
    top1_prob: Tensor
    noisy_logits: Optional[Tensor] = None
    noise_std: float = 0.0
    explicit_token_index: Optional[Tensor] = field(default=None)

    @property
    def token_index(self) -> Tensor:
        """Token of each assignment ``[n]``: ``a % t`` for the choice-major layout of token choice."""
        if self.explicit_token_index is not None:
            return self.explicit_token_index
        num_tokens = self.top1_prob.shape[0]
        return torch.arange(num_tokens, device=self.expert_index.device).repeat(self.expert_index.numel() // num_tokens
                                                                                 if num_tokens else 0)

    def detach(self) -> 'Routing':
        """The same routing without its autograd graph (views, no copies)."""
        def cut(value):
            return value.detach() if isinstance(value, Tensor) else value
        return Routing(**{name: cut(getattr(self, name)) for name in self.__dataclass_fields__})


def autocast_dtype(x: Tensor) -> Optional[torch.dtype]:
    """The dtype autocast gives ``x``'s device, or None when it is off (or the device has no autocast, as ``meta``)."""
    device_type = x.device.type
    if device_type == 'meta' or not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def autocast_off(x: Tensor):
    """A context without autocast on ``x``'s device (a no-op where the device has none)."""
    return contextlib.nullcontext() if x.device.type == 'meta' else torch.autocast(x.device.type, enabled=False)


def _router_dtype(x: Tensor) -> torch.dtype:
    """fp32 for half-precision inputs, the input's own dtype when it is wider (fp64 for gradcheck)."""
    return torch.promote_types(x.dtype, torch.float32)


class _HalfInputLogits(torch.autograd.Function):
    """``x @ W^T`` of half-precision tokens as one GEMM with an fp32 result (``mm`` with ``out_dtype``): no fp32 copy
    of the tokens, and their gradient comes back in their own dtype (no fp32 ``[t, d]`` gradient)."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor) -> Tensor:
        ctx.save_for_backward(x, weight)
        return torch.mm(x, weight.to(x.dtype).t(), out_dtype=torch.float32)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, weight = ctx.saved_tensors
        grad_half = grad.to(x.dtype)
        grad_x = grad_half.mm(weight.to(x.dtype)) if ctx.needs_input_grad[0] else None
        grad_weight = None
        if ctx.needs_input_grad[1]:
            grad_weight = torch.mm(grad_half.t(), x, out_dtype=torch.float32).to(weight.dtype)
        return grad_x, grad_weight


def _half_input_gemm(x: Tensor) -> bool:
    """Whether torch has the fp32-result GEMM for these tokens (CUDA, where this build runs it, and shape-only runs)."""
    if x.dtype not in (torch.float16, torch.bfloat16) or x.dim() != 2:
        return False
    return x.device.type == 'meta' or (x.device.type == 'cuda' and _fp32_result_gemm_runs(x.device, x.dtype))


@functools.lru_cache(maxsize=None)
def _fp32_result_gemm_runs(device: torch.device, dtype: torch.dtype) -> bool:
    """``mm(out_dtype=float32)`` of half-precision inputs exists on this device (asked once; else the fp32 copy)."""
    try:
        probe = torch.ones(8, 8, device=device, dtype=dtype)
        return torch.mm(probe, probe, out_dtype=torch.float32).dtype == torch.float32
    except (RuntimeError, TypeError, NotImplementedError):
        return False


class LinearRouter(nn.Module):
    """Linear router: ``logits = x @ W^T`` without bias, computed in fp32 or wider (also under autocast); on a GPU
    half-precision tokens meet the weight in one GEMM with an fp32 result."""

    def __init__(self, in_features: int, num_experts: int, device=None, dtype=None):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, in_features, device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self):
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))  # as nn.Linear, so fresh routers start diverse

    def forward(self, x: Tensor) -> Tensor:
        """Score tokens ``[t, d]`` against experts, returning fp32 logits ``[t, e]``."""
        dtype = autocast_dtype(x)
        x = x if dtype is None else x.to(dtype)
        with autocast_off(x):
            if _half_input_gemm(x):
                return _HalfInputLogits.apply(x, self.weight)
            dtype = _router_dtype(x)
            return F.linear(x.to(dtype), self.weight.to(dtype))


class CosineRouter(nn.Module):
    """Cosine router (Swin-MoE): ``logits = s * cos(x, w_e)`` with a learned scale ``s`` clamped at 100.

    Unlike Tutel's cosine gate there is no extra projection: the expert embeddings live in the model dimension, so
    ``weight`` has the same ``[e, d]`` shape as the linear router's.
    """

    def __init__(self, in_features: int, num_experts: int, init_temperature: float = 0.5, device=None, dtype=None):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, in_features, device=device, dtype=dtype))
        self.logit_scale = nn.Parameter(torch.empty((), device=device, dtype=dtype))
        self.init_temperature = init_temperature
        self.max_logit_scale = math.log(100.0)
        self.reset_parameters()

    def reset_parameters(self):
        nn.init.normal_(self.weight, std=0.01)
        nn.init.constant_(self.logit_scale, math.log(1.0 / self.init_temperature))

    def forward(self, x: Tensor) -> Tensor:
        """Score tokens ``[t, d]`` against experts, returning fp32 logits ``[t, e]``."""
        dtype = _router_dtype(x)
        with autocast_off(x):
            cosine = F.linear(F.normalize(x.to(dtype), dim=-1), F.normalize(self.weight.to(dtype), dim=-1))
            return cosine * self.logit_scale.to(dtype).clamp(max=self.max_logit_scale).exp()


def expert_probs(logits: Tensor) -> Tensor:
    """Softmax over the experts of logits ``[t, e]``."""
    return torch.softmax(logits, dim=-1)


def top_k_routing(
        logits: Tensor,
        top_k: int,
        *,
        normalize_gates: bool = False,
        noise_std: float = 0.0,
) -> Routing:
    """Token choice: every token picks its ``k`` most probable experts.

    The softmax runs over all experts before the top-k, so a gate is the expert's probability (Tutel, GShard). The
    assignments are laid out choice-major, ``a = choice * t + token``, the order in which GShard claims slots: every
    token's first choice, then every second choice, and so on (batch-priority routing reorders the tokens inside each
    choice, see :func:`gcvimoe.moe.dispatch.plan_dispatch`).

    Args:
        logits: Router logits ``[t, e]`` (fp32 or wider).
        top_k: Experts per token ``k``.
        normalize_gates: Divide each token's ``k`` gates by their sum (before any capacity drop). With ``k = 1`` the
            gate's value becomes 1 while it keeps the probability's gradient (``p / p.detach()``), so the router still
            learns from the task loss; an upcycled model then starts with its dense model's outputs.
        noise_std: Standard deviation of Gaussian noise added to the logits before the choice; 0 for none.

    Returns:
        The routing with ``n = t * k`` assignments.
    """
    noisy_logits = logits + noise_std * torch.randn_like(logits) if noise_std > 0 else None
    probs = expert_probs(logits if noisy_logits is None else noisy_logits)
    if top_k == 1:  # max is several times cheaper than topk on CPU
        top_probs, top_experts = probs.max(dim=-1, keepdim=True)
    else:
        top_probs, top_experts = probs.topk(top_k, dim=-1)  # [t, k], column 0 is each token's first choice
    gates = top_probs
    if normalize_gates:
        total = top_probs.sum(dim=-1, keepdim=True)
        # p / p is the constant 1 and would leave the router only the aux loss: divide by the detached sum instead
        gates = top_probs / (total.detach() if top_k == 1 else total)
    return Routing(
        logits=logits,
        probs=probs,
        expert_index=top_experts.t().reshape(-1),
        gates=gates.t().reshape(-1),
        top1_expert=top_experts[:, 0],
        top1_prob=top_probs[:, 0].detach(),
        noisy_logits=noisy_logits,
        noise_std=noise_std,
    )


def expert_choice_routing(logits: Tensor, capacity: int) -> Routing:
    """Expert choice: every expert takes the ``c`` tokens that give it the highest probability.

    Each expert computes exactly ``c = min(capacity, t)`` tokens, so the load is balanced by construction; a token
    may be picked by several experts or by none (its MoE output is then zero).

    Args:
        logits: Router logits ``[t, e]`` (fp32 or wider).
        capacity: Tokens per expert.

    Returns:
        The routing with ``n = e * c`` assignments, already grouped by expert.
    """
    num_tokens, num_experts = logits.shape
    probs = expert_probs(logits)
    picks = min(capacity, num_tokens)
    gates, token_index = probs.t().topk(picks, dim=-1)  # [e, c]
    expert_index = torch.arange(num_experts, device=logits.device).repeat_interleave(picks)
    top1_prob, top1_expert = probs.detach().max(dim=-1)
    return Routing(logits=logits, probs=probs, expert_index=expert_index, gates=gates.reshape(-1),
                   top1_expert=top1_expert, top1_prob=top1_prob, explicit_token_index=token_index.reshape(-1))


@dataclass(frozen=True)
class RouterSpec:
    """A router as :class:`gcvimoe.moe.MoE` builds and calls it, registered by name in :data:`ROUTERS`.

    Attributes:
        module: Builds the scoring module: ``module(in_features, num_experts, device=, dtype=)``, whose forward maps
            tokens ``[t, d]`` to fp32 logits ``[t, e]``.
        route: The routing rule: ``route(logits, options, capacity, training) -> Routing``, where ``options`` is the
            layer's :class:`~gcvimoe.moe.MoEConfig`.
        chooses_tokens: Experts pick tokens (expert choice): the rule applies the capacity itself, which then has a
            floor of factor 1, and the dispatcher applies none.
    """
    module: Callable[..., nn.Module]
    route: Callable[..., Routing]
    chooses_tokens: bool = False


def _token_choice(logits: Tensor, options, capacity: Optional[int], training: bool) -> Routing:
    noise_std = options.gate_noise / options.num_experts if training else 0.
    return top_k_routing(logits, options.top_k, normalize_gates=options.normalize_gates, noise_std=noise_std)


def _expert_choice(logits: Tensor, options, capacity: Optional[int], training: bool) -> Routing:
    return expert_choice_routing(logits, capacity)


ROUTERS: Dict[str, RouterSpec] = {}
"""Router name (``MoEConfig.router``) -> :class:`RouterSpec`; :func:`register_router` adds one."""


def register_router(name: str, spec: RouterSpec) -> RouterSpec:
    """Make ``name`` a valid ``router`` option of every MoE layer built afterwards."""
    ROUTERS[name] = spec
    return spec


register_router('linear', RouterSpec(LinearRouter, _token_choice))
register_router('cosine', RouterSpec(CosineRouter, _token_choice))
register_router('expert_choice', RouterSpec(LinearRouter, _expert_choice, chooses_tokens=True))
