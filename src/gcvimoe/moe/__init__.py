"""Mixture-of-Experts in pure PyTorch: router, dispatch/combine, experts, losses, statistics, expert parallelism.

``MoE`` is a drop-in for timm's ``Mlp``; see :mod:`gcvimoe.moe.layer` for a usage example. Extension points:
:func:`register_router` (a router and its routing rule) and :func:`register_expert_backend` (how experts run);
:func:`set_expert_path` (or ``GCVIMOE_EXPERT_PATH``) pins the experts' path.
"""
from gcvimoe.moe.backends import ExpertBackend, register_expert_backend, set_expert_path
from gcvimoe.moe.config import GCVIMOE, MoEConfig
from gcvimoe.moe.dispatch import DispatchPlan, SortedPlan, combine, expert_capacity, plan_dispatch, plan_sorted
from gcvimoe.moe.experts import Experts
from gcvimoe.moe.layer import MoE, collect_aux_loss, collect_moe_report, moe_layers
from gcvimoe.moe.losses import gshard_balance_loss, importance_loss, load_loss, z_loss
from gcvimoe.moe.router import (
    CosineRouter, LinearRouter, RouterSpec, Routing, expert_choice_routing, register_router, top_k_routing,
)
from gcvimoe.moe.stats import MoEReport, RoutingStats, routing_stats

__all__ = [
    'MoEConfig', 'GCVIMOE', 'MoE', 'moe_layers', 'collect_aux_loss', 'collect_moe_report', 'MoEReport',
    'RoutingStats', 'routing_stats', 'Experts', 'LinearRouter', 'CosineRouter', 'Routing', 'top_k_routing',
    'expert_choice_routing', 'RouterSpec', 'register_router', 'ExpertBackend', 'register_expert_backend',
    'set_expert_path', 'DispatchPlan', 'plan_dispatch', 'SortedPlan', 'plan_sorted', 'combine', 'expert_capacity',
    'gshard_balance_loss', 'importance_loss', 'load_loss', 'z_loss',
]
