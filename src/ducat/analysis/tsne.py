"""Fig. 10 of the paper: t-SNE of penultimate features, clean vs adversarial inputs.

Features are the inputs of the model's last ``nn.Linear`` (captured with a forward hook), embedded
in 2-D with scikit-learn's t-SNE, one panel per model.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure
from torch import nn

from ducat.analysis._figure import save_figure
from ducat.dummy import find_last_linear


def penultimate_features(model: nn.Module, x: torch.Tensor, batch_size: int = 256) -> np.ndarray:
    """Inputs of the last ``nn.Linear`` (the classifier) for ``x``: ``(N, D)`` numpy."""
    layer = model.get_submodule(find_last_linear(model))
    captured: list[torch.Tensor] = []
    handle = layer.register_forward_hook(lambda m, inp, out: captured.append(inp[0].detach().flatten(1).cpu()))
    try:
        with torch.no_grad():
            for i in range(0, len(x), batch_size):
                model(x[i:i + batch_size])
    finally:
        handle.remove()
    return torch.cat(captured).numpy()


def tsne_embed(features: np.ndarray, seed: int = 0) -> np.ndarray:
    """2-D t-SNE embedding ``(N, 2)`` of ``features`` ``(N, D)``; perplexity shrinks for small N."""
    from sklearn.manifold import TSNE  # scikit-learn takes about a second to import

    perplexity = min(30.0, max(2.0, (len(features) - 1) / 3))
    return TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(features)


def tsne_panels(panels: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray, bool]], path: Path) -> Path:
    """One t-SNE panel per model: ``(features (N, D), labels (N,), is_adversarial (N,), _)``;
    clean inputs as dots, adversarial inputs as crosses, coloured by class."""
    fig = Figure(figsize=(5.5 * len(panels), 5))
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (title, (features, labels, is_adv, _)) in zip(axes, panels.items()):
        xy = tsne_embed(features)
        for adv, marker in ((False, "."), (True, "x")):
            sel = is_adv == adv
            ax.scatter(xy[sel, 0], xy[sel, 1], c=labels[sel], cmap="tab10", marker=marker, s=12 if adv else 8,
                       vmin=0, vmax=9, label="adversarial (paper protocol PGD-10)" if adv else "clean")
        ax.set_title(title)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.legend(fontsize=7, loc="lower right")
    fig.suptitle("t-SNE of penultimate features, coloured by true class")
    return save_figure(fig, path)
