"""Plots: training curves and expert usage (matplotlib, drawn off-screen)."""
from gcvimoe.viz.curves import plot_training_curves
from gcvimoe.viz.experts import plot_expert_usage

__all__ = ['plot_training_curves', 'plot_expert_usage']
