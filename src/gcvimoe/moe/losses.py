"""Auxiliary router losses: load balance (GShard/Switch, V-MoE importance and load) and the ST-MoE z-loss.

All take fp32 router tensors over ``t`` tokens and ``e`` experts and return an unweighted 0-dim loss.
"""
import math
from typing import Optional

import torch
from torch import Tensor

from gcvimoe.moe.dispatch import count_per_expert


def gshard_balance_loss(probs: Tensor, top1_expert: Tensor, first_choices: Optional[Tensor] = None,
                        weight: float = 1.0) -> Tensor:
    """GShard / Switch balance loss ``e * sum_e mean_t(p_te) * f_e``, where ``f_e`` is the fraction of tokens whose
    first choice is ``e``; 1.0 for a perfectly balanced router.

    Args:
        probs: Routing probabilities ``[t, e]``.
        top1_expert: First choice of every token ``[t]``.
        first_choices: Tokens whose first choice is each expert ``[e]``, when the caller has them (counted from
            ``top1_expert`` otherwise).
        weight: A factor folded into the loss's own scaling (one product fewer for a weighted loss).
    """
    num_tokens, num_experts = probs.shape
    if first_choices is None:
        first_choices = count_per_expert(top1_expert, num_experts)
    return (probs.mean(dim=0) * first_choices).sum() * (weight * num_experts / num_tokens)


def _squared_coefficient_of_variation(values: Tensor) -> Tensor:
    return values.var(correction=0) / values.mean().square()


def importance_loss(probs: Tensor) -> Tensor:
    """V-MoE importance loss: squared coefficient of variation over experts of ``sum_t p_te``.

    Args:
        probs: Clean (noise-free) routing probabilities ``[t, e]``.
    """
    return _squared_coefficient_of_variation(probs.sum(dim=0))


def load_loss(logits: Tensor, noisy_logits: Tensor, noise_std: float, top_k: int) -> Tensor:
    """V-MoE load loss: squared coefficient of variation over experts of the expected load under re-drawn noise.

    An expert is chosen for a token when its noisy logit reaches the token's ``k``-th largest noisy logit, which
    happens with probability ``1 - Phi((threshold - logit) / noise_std)`` if the noise were drawn again.

    Args:
        logits: Clean router logits ``[t, e]``.
        noisy_logits: ``logits`` plus the gate noise that made the routing decision ``[t, e]``.
        noise_std: Standard deviation of that noise (must be positive).
        top_k: Experts per token ``k``.
    """
    threshold = noisy_logits.topk(top_k, dim=-1).values[:, -1:]
    noise_to_win = (threshold - logits) / noise_std
    chosen_probability = 0.5 * torch.erfc(noise_to_win / math.sqrt(2.0))  # 1 - Phi(z)
    return _squared_coefficient_of_variation(chosen_probability.mean(dim=0))


def z_loss(logits: Tensor) -> Tensor:
    """ST-MoE router z-loss ``mean_t(logsumexp_e(logits_te)^2)``, keeping router logits small.

    Args:
        logits: Router logits ``[t, e]``.
    """
    return torch.logsumexp(logits, dim=-1).square().mean()
