"""The paper's figures and tables as functions of finished runs, plus training curves.

Each figure has a compute function on plain arrays (per-example masks, labels, predictions,
features) that returns plain data, and a plot function that writes a PNG and returns its path, so
it works on any runs, not only ``ducat reproduce``'s. One module per figure; this package only
re-exports them. Figures are drawn on ``matplotlib.figure.Figure`` without pyplot, so importing this
package does not touch the caller's matplotlib backend. Accuracies are fractions in [0, 1]; figures
and tables show percentages.
"""

from ducat.analysis.ablation import ablation_plot
from ducat.analysis.confusion import confusion_under_attack, plot_confusion
from ducat.analysis.curves import plot_training_curves, read_metrics, training_curves
from ducat.analysis.overlap import always_failed_overlap, plot_always_failed_overlap
from ducat.analysis.tables import main_table, mean_std, significance_table, targeted_table
from ducat.analysis.timing import training_time_bars
from ducat.analysis.toy import toy_case_plot
from ducat.analysis.tradeoff import sota_points, tradeoff_scatter
from ducat.analysis.transfer import plot_transfer_matrix, transfer_matrix
from ducat.analysis.tsne import penultimate_features, tsne_embed, tsne_panels

__all__ = ["ablation_plot", "always_failed_overlap", "confusion_under_attack", "main_table",
           "mean_std", "penultimate_features", "plot_always_failed_overlap", "plot_confusion",
           "plot_training_curves", "plot_transfer_matrix", "read_metrics", "significance_table", "sota_points",
           "targeted_table", "toy_case_plot", "tradeoff_scatter", "training_curves", "training_time_bars",
           "transfer_matrix", "tsne_embed", "tsne_panels"]
