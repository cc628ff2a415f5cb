"""Figures and reports drawn from records the caller hands in: training curves, expert usage, routing maps, the
demo report (matplotlib, off-screen)."""
from gcvimoe.analysis.curves import plot_training_curves
from gcvimoe.analysis.experts import plot_expert_usage

__all__ = ['plot_training_curves', 'plot_expert_usage']
