"""Figures and reports (matplotlib, off-screen): training curves and expert usage from the records the trainer hands
out; routing maps, expert load and class x expert figures from a model's own routing introspection
(:func:`visualize_routing`); the demo report."""
from gcvimoe.analysis.curves import plot_training_curves
from gcvimoe.analysis.experts import plot_class_expert, plot_expert_load, plot_expert_usage
from gcvimoe.analysis.routing import plot_routing_map, record_routing
from gcvimoe.analysis.visualize import visualize_routing

__all__ = ['plot_training_curves', 'plot_expert_usage', 'plot_expert_load', 'plot_class_expert', 'plot_routing_map',
           'record_routing', 'visualize_routing']
