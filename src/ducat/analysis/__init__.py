"""The paper's figures and tables as functions of finished runs.

Each figure has a compute function on plain arrays (per-example masks, labels, predictions,
features) that returns plain data, and a ``plot_*`` function that writes a PNG with matplotlib and
returns its path, so it works on any runs, not only ``ducat reproduce``'s. Accuracies are fractions
in [0, 1]; tables print percentages.
"""

from __future__ import annotations

import csv
from importlib import resources
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

__all__ = ["always_failed_overlap", "plot_always_failed_overlap", "transfer_matrix", "plot_transfer_matrix",
           "toy_case_plot", "sota_points", "tradeoff_scatter", "training_time_bars", "ablation_plot",
           "confusion_under_attack", "plot_confusion", "penultimate_features", "tsne_panels", "targeted_table",
           "main_table"]


def _save(fig: plt.Figure, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ---- fig. 2: always-failed examples ---------------------------------------------------------------
def always_failed_overlap(robust: dict[str, np.ndarray], labels: np.ndarray, num_classes: int) -> dict[str, Any]:
    """For M defenses' per-example robustness masks (``(N,)`` bool each): ``counts[c, k]`` = number of
    class-c examples whose adversarial version beats exactly k defenses; the shares of examples
    defended by all M (``uniform_defended``) and beating all M (``uniform_failed``)."""
    names = list(robust)
    stacked = np.stack([np.asarray(robust[n], bool) for n in names])
    beaten = (~stacked).sum(0)
    m = len(names)
    counts = np.zeros((num_classes, m + 1), dtype=int)
    np.add.at(counts, (np.asarray(labels), beaten), 1)
    return {"defenses": names, "counts": counts, "uniform_defended": float(np.mean(beaten == 0)),
            "uniform_failed": float(np.mean(beaten == m))}


def plot_always_failed_overlap(result: dict[str, Any], path: Path) -> Path:
    counts = result["counts"]
    c, k = counts.shape
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / k
    for j in range(k):
        ax.bar(np.arange(c) + j * width - 0.4 + width / 2, counts[:, j], width, label=f"beats {j}")
    ax.set_xticks(np.arange(c))
    ax.set_xlabel("class")
    ax.set_ylabel("test examples")
    ax.set_title(f"How many of the {k - 1} defenses each adversarial example beats\n"
                 f"uniformly defended {100 * result['uniform_defended']:.1f}%, "
                 f"uniformly failed {100 * result['uniform_failed']:.1f}%")
    ax.legend(ncol=k, fontsize=8)
    return _save(fig, path)


# ---- fig. 3: transfer between robust models ---------------------------------------------------
def transfer_matrix(on_surrogate: dict[str, np.ndarray],
                    on_target: dict[tuple[str, str], np.ndarray]) -> dict[str, Any]:
    """Attack success rate on each target among examples that fooled the surrogate
    (``given_success[i, j]``) and among those that did not (``given_failure[i, j]``); NaN on the
    diagonal. Inputs are boolean success masks ``(N,)``."""
    names = list(on_surrogate)
    m = len(names)
    success, failure = np.full((m, m), np.nan), np.full((m, m), np.nan)
    for i, s in enumerate(names):
        fooled = np.asarray(on_surrogate[s], bool)
        for j, t in enumerate(names):
            if (s, t) not in on_target:
                continue
            hit = np.asarray(on_target[(s, t)], bool)
            success[i, j] = hit[fooled].mean() if fooled.any() else np.nan
            failure[i, j] = hit[~fooled].mean() if (~fooled).any() else np.nan
    return {"names": names, "given_success": success, "given_failure": failure}


def plot_transfer_matrix(result: dict[str, Any], path: Path) -> Path:
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    names = result["names"]
    for ax, key, title in ((axes[0], "given_success", "fooled the surrogate"),
                           (axes[1], "given_failure", "did not fool the surrogate")):
        grid = result[key]
        image = ax.imshow(100 * grid, vmin=0, vmax=100, cmap="viridis")
        for i in range(len(names)):
            for j in range(len(names)):
                if not np.isnan(grid[i, j]):
                    ax.text(j, i, f"{100 * grid[i, j]:.0f}", ha="center", va="center", color="w", fontsize=9)
        ax.set_xticks(range(len(names)), names, rotation=30, fontsize=8)
        ax.set_yticks(range(len(names)), names, fontsize=8)
        ax.set_xlabel("target model")
        if ax is axes[0]:
            ax.set_ylabel("surrogate model")
        ax.set_title(f"transfer success (%), examples that\n{title}", fontsize=10)
    fig.colorbar(image, ax=axes, shrink=0.8, label="%")
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return Path(path)


# ---- fig. 4: toy case ---------------------------------------------------------------------------
def toy_case_plot(curves: dict[str, dict[str, float]], path: Path) -> Path:
    """Grouped bars: for each run (e.g. toy, DUCAT, PGD-AT), accuracy under each evaluation."""
    runs = list(curves)
    metrics = list(dict.fromkeys(m for r in runs for m in curves[r]))
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / len(runs)
    for i, run in enumerate(runs):
        values = [100 * curves[run].get(m, np.nan) for m in metrics]
        bars = ax.bar(np.arange(len(metrics)) + i * width - 0.4 + width / 2, values, width, label=run)
        for bar, v in zip(bars, values):
            if not np.isnan(v):
                ax.text(bar.get_x() + bar.get_width() / 2, v + 0.5, f"{v:.0f}", ha="center", fontsize=7)
    ax.set_xticks(np.arange(len(metrics)), metrics, fontsize=8)
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 105)
    ax.set_title("Hard labels (toy case) vs soft labels (DUCAT): robustness that survives which attack")
    ax.legend(fontsize=8)
    return _save(fig, path)


# ---- fig. 5 / table 2: trade-off ---------------------------------------------------------------------
def sota_points() -> list[dict[str, Any]]:
    """The SOTA rows of the paper's table 2 (CIFAR-10, ResNet-18, no extra data; clean and
    AutoAttack accuracy in %, with the record source the paper cites). The paper's text says 14;
    its table lists 16, all shipped here."""
    text = (resources.files("ducat.analysis") / "sota_table2.csv").read_text()
    rows = list(csv.DictReader(text.splitlines()))
    for row in rows:
        row["clean"], row["autoattack"], row["year"] = float(row["clean"]), float(row["autoattack"]), int(row["year"])
    return rows


def tradeoff_scatter(points: list[dict[str, Any]], path: Path, include_sota: bool = True) -> Path:
    """Clean vs robust accuracy. ``points``: dicts with ``name``, ``clean``, ``robust`` (fractions)
    and ``group`` (e.g. the protocol); points of the same name are joined by an arrow from the
    first group to the second (paper protocol -> adaptive worst case)."""
    fig, ax = plt.subplots(figsize=(7.5, 5.5))
    if include_sota:
        sota = sota_points()
        ax.scatter([r["clean"] for r in sota], [r["autoattack"] for r in sota], c="grey", marker="s", s=20,
                   label="SOTA, paper table 2 (CIFAR-10, AutoAttack)")
        for r in sota:
            ax.annotate(r["method"], (r["clean"], r["autoattack"]), fontsize=6, color="grey")
    groups = list(dict.fromkeys(p["group"] for p in points))
    markers = ["o", "x", "^", "v"]
    for g, marker in zip(groups, markers):
        sel = [p for p in points if p["group"] == g]
        ax.scatter([100 * p["clean"] for p in sel], [100 * p["robust"] for p in sel], marker=marker, s=40,
                   label=f"this grid: {g}")
    by_name: dict[str, list[dict[str, Any]]] = {}
    for p in points:
        by_name.setdefault(p["name"], []).append(p)
    for name, ps in by_name.items():
        ax.annotate(name, (100 * ps[0]["clean"], 100 * ps[0]["robust"]), fontsize=7)
        if len(ps) >= 2:
            ax.annotate("", xy=(100 * ps[1]["clean"], 100 * ps[1]["robust"]),
                        xytext=(100 * ps[0]["clean"], 100 * ps[0]["robust"]),
                        arrowprops={"arrowstyle": "->", "color": "tab:red", "alpha": 0.6})
    ax.set_xlabel("clean accuracy (%)")
    ax.set_ylabel("robust accuracy (%)")
    ax.set_title("Accuracy-robustness trade-off")
    ax.legend(fontsize=7, loc="lower left")
    return _save(fig, path)


# ---- fig. 6: training time -----------------------------------------------------------------------
def training_time_bars(times: dict[str, dict[str, float]], path: Path) -> Path:
    """``times[method] = {"base": s/epoch, "ducat": s/epoch}``; bars with the overhead annotated."""
    methods = list(times)
    fig, ax = plt.subplots(figsize=(7, 4))
    x = np.arange(len(methods))
    base = [times[m]["base"] for m in methods]
    ducat = [times[m]["ducat"] for m in methods]
    ax.bar(x - 0.2, base, 0.4, label="base method")
    ax.bar(x + 0.2, ducat, 0.4, label="+ DUCAT")
    for i, (b, d) in enumerate(zip(base, ducat)):
        ax.text(i + 0.2, d, f"{100 * (d / b - 1):+.0f}%", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(x, methods)
    ax.set_ylabel("seconds per epoch (measured)")
    ax.set_title("Training time with and without DUCAT")
    ax.legend()
    return _save(fig, path)


# ---- figs. 7 and 9: ablations --------------------------------------------------------------------
def ablation_plot(param: str, values: list[float], clean: list[float], robust_paper: list[float],
                  robust_adaptive: list[float], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    ax.plot(values, 100 * np.asarray(clean), "o-", label="clean")
    ax.plot(values, 100 * np.asarray(robust_paper), "s-", label="PGD-10, paper protocol")
    ax.plot(values, 100 * np.asarray(robust_adaptive), "^-", label="adaptive worst case")
    ax.set_xlabel(param)
    ax.set_ylabel("accuracy (%)")
    ax.set_title(f"PGD-AT + DUCAT: ablation over {param}")
    ax.legend(fontsize=8)
    return _save(fig, path)


# ---- fig. 8: confusion under attack ----------------------------------------------------------------
def confusion_under_attack(labels: np.ndarray, predictions: np.ndarray, num_classes: int,
                           dummy_index: np.ndarray | None = None) -> np.ndarray:
    """Row-normalised confusion matrix. With raw 2C predictions and a pairing (``dummy_index``,
    ``(C,)``), returns ``(C, 2C)`` with columns ``[0..C-1, dummy(0)..dummy(C-1)]`` so that the
    diagonal of the right half is the "sink" into the dummy of the true class; else ``(C, C)``."""
    labels, predictions = np.asarray(labels), np.asarray(predictions)
    width = num_classes if dummy_index is None else 2 * num_classes
    column = np.arange(width)
    if dummy_index is not None:
        column[np.asarray(dummy_index)] = num_classes + np.arange(num_classes)
    matrix = np.zeros((num_classes, width))
    valid = predictions >= 0
    np.add.at(matrix, (labels[valid], column[predictions[valid]]), 1)
    return matrix / np.maximum(matrix.sum(1, keepdims=True), 1)


def plot_confusion(matrix: np.ndarray, path: Path) -> Path:
    c, width = matrix.shape
    fig, ax = plt.subplots(figsize=(max(5, width * 0.45), 4))
    image = ax.imshow(100 * matrix, cmap="magma", vmin=0, vmax=100)
    ax.set_xlabel("prediction under attack" + (" (right half: dummy of class k)" if width == 2 * c else ""))
    ax.set_ylabel("true class")
    ticks = [str(k) for k in range(c)] + ([f"d{k}" for k in range(c)] if width == 2 * c else [])
    ax.set_xticks(range(width), ticks, fontsize=7)
    ax.set_yticks(range(c), [str(k) for k in range(c)], fontsize=7)
    if width == 2 * c:
        ax.axvline(c - 0.5, color="w", lw=1)
    fig.colorbar(image, ax=ax, label="% of the row")
    ax.set_title("Where the attack sends each class")
    return _save(fig, path)


# ---- fig. 10: t-SNE ---------------------------------------------------------------------------------
def penultimate_features(model: nn.Module, x: torch.Tensor, batch_size: int = 256) -> np.ndarray:
    """Inputs of the last ``nn.Linear`` (the classifier) for ``x``: ``(N, D)`` numpy."""
    from ducat.dummy import find_last_linear

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
    from sklearn.manifold import TSNE

    perplexity = min(30.0, max(2.0, (len(features) - 1) / 3))
    return TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(features)


def tsne_panels(panels: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray, bool]], path: Path) -> Path:
    """One t-SNE panel per model: ``(features (N, D), labels (N,), is_adversarial (N,), _)``;
    clean inputs as dots, adversarial inputs as crosses, coloured by class."""
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 5))
    axes = np.atleast_1d(axes)
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
    return _save(fig, path)


# ---- tables -----------------------------------------------------------------------------------------
def _mean_std(values: list[float]) -> str:
    values = [v for v in values if v is not None and not np.isnan(v)]
    if not values:
        return "-"
    mean = 100 * float(np.mean(values))
    return f"{mean:.2f}" if len(values) == 1 else f"{mean:.2f} ± {100 * float(np.std(values, ddof=1)):.2f}"


def main_table(rows: list[dict[str, Any]]) -> str:
    """Table 1 layout: one line per method and DUCAT flag, mean ± std over seeds. ``rows``: dicts
    with ``method``, ``ducat``, ``seed``, ``clean``, ``paper`` ({attack: accuracy}) and
    ``adaptive_worst``."""
    attacks = list(dict.fromkeys(a for r in rows for a in r["paper"]))
    header = ["method", "clean"] + [f"{a} (paper)" for a in attacks] + ["adaptive worst case"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    keys = list(dict.fromkeys((r["method"], r["ducat"]) for r in rows))
    for method, ducat in keys:
        group = [r for r in rows if r["method"] == method and r["ducat"] == ducat]
        cells = [method + (" + DUCAT" if ducat else ""), _mean_std([r["clean"] for r in group])]
        cells += [_mean_std([r["paper"].get(a) for r in group]) for a in attacks]
        cells.append(_mean_std([r["adaptive_worst"] for r in group]))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def targeted_table(results: dict[str, dict[str, float]]) -> str:
    """Table 4 layout: one row per run, one column per targeted attack (accuracy %)."""
    attacks = list(dict.fromkeys(a for r in results.values() for a in r))
    lines = ["| run | " + " | ".join(attacks) + " |", "|---|" + "---|" * len(attacks)]
    for run, values in results.items():
        lines.append(f"| {run} | " + " | ".join(_mean_std([values.get(a)]) for a in attacks) + " |")
    return "\n".join(lines)
