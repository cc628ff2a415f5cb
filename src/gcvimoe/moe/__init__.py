"""Mixture-of-Experts in pure PyTorch: router, dispatch/combine, experts, losses, statistics, expert parallelism.

``MoE`` is a drop-in for timm's ``Mlp``; see :mod:`gcvimoe.moe.layer` for a usage example.
"""
from gcvimoe.moe.config import GCVIMOE, MoEConfig
from gcvimoe.moe.dispatch import DispatchPlan, combine, expert_capacity, plan_dispatch
from gcvimoe.moe.experts import Experts
from gcvimoe.moe.layer import MoE, collect_aux_loss, collect_moe_report, moe_layers
from gcvimoe.moe.losses import gshard_balance_loss, importance_loss, load_loss, z_loss
from gcvimoe.moe.router import CosineRouter, LinearRouter, Routing, expert_choice_routing, top_k_routing
from gcvimoe.moe.stats import MoEReport, RoutingStats, routing_stats

__all__ = [
    'MoEConfig', 'GCVIMOE', 'MoE', 'moe_layers', 'collect_aux_loss', 'collect_moe_report', 'MoEReport', 'RoutingStats', 'routing_stats',
    'Experts', 'LinearRouter', 'CosineRouter', 'Routing', 'top_k_routing', 'expert_choice_routing',
    'DispatchPlan', 'plan_dispatch', 'combine', 'expert_capacity',
    'gshard_balance_loss', 'importance_loss', 'load_loss', 'z_loss',
]
