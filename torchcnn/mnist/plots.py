"""The pictures a training run leaves behind (matplotlib, no display needed)."""

from __future__ import annotations

import io
import math
from pathlib import Path

import torch

from .checkpoint import _replace_atomically


def _figure(*args, **kwargs):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt, *plt.subplots(*args, **kwargs)


def _save(plt, fig, path: Path) -> None:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    _replace_atomically(path, lambda f: f.write(buffer.getvalue()))


def curves(history: list[dict], path) -> None:
    """Loss and accuracy per epoch, train and test."""
    plt, fig, (ax_loss, ax_acc) = _figure(1, 2, figsize=(10, 3.8))
    from matplotlib.ticker import MaxNLocator

    epochs = [row["epoch"] for row in history]
    for split in ("train", "test"):
        ax_loss.plot(epochs, [row[f"{split}_loss"] for row in history], marker="o", label=split)
        ax_acc.plot(epochs, [100 * row[f"{split}_accuracy"] for row in history], marker="o", label=split)
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy", title="loss", yscale="log")
    ax_acc.set(xlabel="epoch", ylabel="%", title="accuracy")
    for ax in (ax_loss, ax_acc):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # whole epochs
        ax.grid(alpha=0.3)
        ax.legend()
    _save(plt, fig, Path(path))


def confusion(matrix: torch.Tensor, path) -> None:
    """The test confusion matrix, rows true labels, columns predictions."""
    plt, fig, ax = _figure(figsize=(5.6, 5))
    m = matrix.cpu()
    ax.imshow(torch.log1p(m.float()).numpy(), cmap="Blues")  # log: the few mistakes stay visible
    for t in range(m.shape[0]):
        for p in range(m.shape[1]):
            if m[t, p]:
                ax.text(p, t, str(m[t, p].item()), ha="center", va="center", fontsize=7,
                        color="black" if t != p else "white")
    accuracy = m.diagonal().sum().item() / max(m.sum().item(), 1)
    ax.set(xlabel="predicted", ylabel="true", xticks=range(10), yticks=range(10),
           title=f"test confusion matrix (accuracy {100 * accuracy:.2f}%)")
    _save(plt, fig, Path(path))


def filters(weight: torch.Tensor, path) -> None:
    """The first conv layer's kernels ``(C_out, 1, kH, kW)``, one tile each."""
    w = weight.detach().float().cpu()[:, 0]
    cols = 8
    rows = math.ceil(w.shape[0] / cols)
    plt, fig, axes = _figure(rows, cols, figsize=(cols * 0.9, rows * 0.9), squeeze=False)
    limit = w.abs().max().item() or 1.0
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < w.shape[0]:
            ax.imshow(w[i].numpy(), cmap="RdBu_r", vmin=-limit, vmax=limit)
    fig.suptitle("first conv layer's kernels (red +, blue −)")
    _save(plt, fig, Path(path))


def mistakes(images: torch.Tensor, labels: torch.Tensor, predictions: torch.Tensor, path,
             limit: int = 48) -> None:
    """A grid of misclassified test digits titled ``true→predicted``."""
    wrong = (labels != predictions).nonzero().flatten()[:limit].cpu()
    cols = 8
    rows = max(1, math.ceil(len(wrong) / cols))
    plt, fig, axes = _figure(rows, cols, figsize=(cols * 1.1, rows * 1.25), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, i in zip(axes.flat, wrong.tolist()):
        ax.imshow(images[i].cpu().numpy(), cmap="gray_r")
        ax.set_title(f"{labels[i].item()}→{predictions[i].item()}", fontsize=9, color="crimson")
    total = int((labels != predictions).sum())
    fig.suptitle(f"misclassified test digits, true→predicted ({len(wrong)} of {total} shown)")
    _save(plt, fig, Path(path))
