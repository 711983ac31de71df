"""Stage 2 of a report: draw every figure from the computed results (one ``analysis`` function each)."""

from __future__ import annotations

from pathlib import Path

from ducat import analysis
from ducat.reproduce.results import Results


def draw(results: Results, directory: Path) -> dict[str, Path]:
    """Every figure of the report as a PNG in ``directory`` (those whose data the scale has); name -> path."""
    f = results.figures
    optional = {"fig2": (analysis.plot_always_failed_overlap, f["overlap"], "fig2_always_failed.png"),
                "fig3": (analysis.plot_transfer_matrix, f["transfer"], "fig3_transfer.png"),
                "fig4": (analysis.toy_case_plot, f["toy"], "fig4_toy_case.png")}  # None: not at this scale
    paths = {name: plot(data, directory / file) for name, (plot, data, file) in optional.items() if data is not None}
    paths |= {
        "fig5": analysis.tradeoff_scatter(f["tradeoff"], directory / "fig5_tradeoff.png"),
        "fig6": analysis.training_time_bars(f["timing"], directory / "fig6_training_time.png"),
        "fig8": analysis.plot_confusion(f["confusion"]["matrix"], directory / "fig8_confusion.png"),
        "fig10": analysis.tsne_panels(f["tsne"], directory / "fig10_tsne.png"),
        "curves": analysis.plot_training_curves(f["curves"], directory / "training_curves.png"),
    }
    for param, data in f["ablations"].items():
        paths[f"fig7_{param}"] = analysis.ablation_plot(param, data["values"], data["clean"], data["paper"],
                                                        data["adaptive"], directory / f"fig7_ablation_{param}.png")
    return paths
