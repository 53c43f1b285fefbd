"""Matplotlib figures of a student's attention (see `distill.inspect.attention`).

One figure per image, laid out as

    row 1      the image | per token: last block, mean of heads | per token: rollout | class - distillation
    row 2..    per token: last block, one panel per head (one colour scale per row)
    right      token-to-token affinity softmax(QK^T/sqrt(d)) of the chosen block and head

Figures are `matplotlib.figure.Figure` objects (no pyplot state, Agg canvas), saved without
`bbox_inches="tight"`, so a PNG is exactly `figure_size(...) * dpi` pixels.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from matplotlib.figure import Figure

from .attention import AttentionMaps

PANEL_W, PANEL_H, TITLE_H = 2.5, 2.75, 0.5  # inches; exact in binary, so sizes in pixels are exact
SHORT = {"class": "class", "distillation": "dist"}


def to_display(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """A normalised `(C, H, W)` image back to `(H, W)` (grayscale) or `(H, W, 3)` in [0, 1] for imshow."""
    c = x.shape[0]
    m = torch.as_tensor(list(mean), dtype=torch.float32).view(-1, 1, 1)
    s = torch.as_tensor(list(std), dtype=torch.float32).view(-1, 1, 1)
    img = (x.detach().float().cpu() * s + m).clamp(0, 1)
    if c == 1:
        return img[0].numpy()
    if c == 3:
        return img.permute(1, 2, 0).numpy()
    return img.mean(0).numpy()  # other channel counts: shown as their mean


def layout(num_heads: int, num_tokens: int) -> tuple[int, int, int]:
    """(panel columns, panel rows, affinity columns) of an attention figure."""
    first_row = 1 + 2 * num_tokens + (1 if num_tokens == 2 else 0)
    cols = max(num_heads, first_row)
    rows = 1 + num_tokens
    return cols, rows, rows


def figure_size(num_heads: int, num_tokens: int) -> tuple[float, float]:
    """Size in inches of the figure `attention_figure` draws; times dpi = the PNG's size in pixels."""
    cols, rows, aff_cols = layout(num_heads, num_tokens)
    return (cols + aff_cols) * PANEL_W, rows * PANEL_H + TITLE_H


def _overlay(fig: Figure, ax, image: np.ndarray, values: np.ndarray, title: str, *, cmap: str,
             vmin: float | None = None, vmax: float | None = None, colorbar: bool = True, alpha: float = 0.7):
    h, w = image.shape[:2]
    extent = (0, w, h, 0)
    # the image underneath is dimmed so that its bright pixels do not read as attention
    ax.imshow(image * 0.6, cmap="gray" if image.ndim == 2 else None, vmin=0, vmax=1, extent=extent,
              interpolation="nearest")
    im = ax.imshow(values, cmap=cmap, alpha=alpha, vmin=vmin, vmax=vmax, extent=extent, interpolation="nearest")
    ax.set_title(title, fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
    if colorbar:
        # below the panel: a colour bar at the side would widen only its grid column and break the alignment
        cb = fig.colorbar(im, ax=ax, location="bottom", fraction=0.05, pad=0.02, aspect=15)
        cb.ax.tick_params(labelsize=7)
        cb.ax.locator_params(nbins=3)
        cb.formatter.set_powerlimits((-3, 3))  # 2.5e-4 as 2.5 with a x10^-4 offset, not 0.00025
        cb.formatter.set_useMathText(True)
        cb.solids.set_alpha(1.0)  # the overlay's transparency would wash out the scale
    return im


def attention_figure(
    image: np.ndarray,
    maps: AttentionMaps,
    index: int = 0,
    *,
    layer: int = -1,
    head: int | None = None,
    title: str | None = None,
    cmap: str = "inferno",
) -> Figure:
    """The attention figure of image `index` of `maps`.

    Args:
        image: the model's input as shown (`to_display`), `(H, W)` or `(H, W, 3)` in [0, 1].
        maps: `distill.inspect.attention.attention_maps` of the batch holding the image.
        index: which image of the batch.
        layer: block whose token attention and affinity are shown (negative counts from the end).
        head: head of the affinity matrix; None = mean over heads.
        title: figure title (e.g. the file name and the predictions).
        cmap: colour map of the overlays.
    """
    n_layers, heads = len(maps.layers), maps.num_heads
    block = layer % n_layers
    tokens = list(maps.tokens)
    cols, rows, aff_cols = layout(heads, len(tokens))
    fig = Figure(figsize=figure_size(heads, len(tokens)), layout="constrained")
    gs = fig.add_gridspec(rows, cols + aff_cols)

    # row 1: image, per-token mean attention of the block, per-token rollout, their difference
    ax = fig.add_subplot(gs[0, 0])
    ax.imshow(image, cmap="gray" if image.ndim == 2 else None, vmin=0, vmax=1, interpolation="nearest")
    ax.set_title(f"input {image.shape[1]}x{image.shape[0]}\n{maps.grid[1]}x{maps.grid[0]} patches", fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
    col = 1
    for tok in tokens:
        m = maps.token_map(tok, layer)[index].numpy()
        share = m.sum()
        _overlay(fig, fig.add_subplot(gs[0, col]), image, m,
                 f"{tok} token, block {block}\nmean of heads, {share:.0%} on patches", cmap=cmap)
        col += 1
    for tok in tokens:
        _overlay(fig, fig.add_subplot(gs[0, col]), image, maps.rollout_map(tok)[index].numpy(),
                 f"{tok} token\nrollout over {n_layers} blocks", cmap=cmap)
        col += 1
    if len(tokens) == 2:
        diff = (maps.rollout_map(tokens[0])[index] - maps.rollout_map(tokens[1])[index]).numpy()
        lim = float(np.abs(diff).max()) or 1e-6
        _overlay(fig, fig.add_subplot(gs[0, col]), image, diff, "rollout: class - dist\n(red: class, blue: dist)",
                 cmap="RdBu_r", vmin=-lim, vmax=lim, alpha=0.8)

    # rows 2..: per-head attention of each token, one colour scale per row
    for r, tok in enumerate(tokens, start=1):
        per_head = maps.head_maps(tok, layer)[index].numpy()
        vmin, vmax = float(per_head.min()), float(per_head.max())
        vmax = vmax if vmax > vmin else vmin + 1e-6
        for h in range(heads):
            # one colour scale per row, so heads compare directly
            _overlay(fig, fig.add_subplot(gs[r, h]), image, per_head[h],
                     f"{SHORT.get(tok, tok)} token, head {h}\nblock {block}",
                     cmap=cmap, vmin=vmin, vmax=vmax, colorbar=True)

    # right: affinity matrix
    ax = fig.add_subplot(gs[:, cols:])
    a = maps.affinity(layer, head)[index].numpy()
    im = ax.imshow(a, cmap="viridis", interpolation="nearest")
    n_prefix = maps.num_prefix_tokens
    for pos in (n_prefix - 0.5,):
        ax.axhline(pos, color="white", lw=0.8)
        ax.axvline(pos, color="white", lw=0.8)
    ticks, labels = _token_ticks(maps)
    ax.set_xticks(ticks, labels, fontsize=7, rotation=90)
    ax.set_yticks(ticks, labels, fontsize=7)
    ax.set_xlabel("key token", fontsize=8)
    ax.set_ylabel("query token", fontsize=8)
    which = "mean of heads" if head is None else f"head {head % heads}"
    ax.set_title(f"affinity softmax(QK\u1d40/\u221ad), block {block}, {which}\n"
                 f"rows sum to 1; patches row by row after the white line", fontsize=9)
    cb = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02)
    cb.ax.tick_params(labelsize=7)

    if title:
        fig.suptitle(title, fontsize=11)
    return fig


def _token_ticks(maps: AttentionMaps) -> tuple[list[int], list[str]]:
    """Ticks for the affinity matrix: the prefix tokens by name, then the first patch of grid rows."""
    names = {i: SHORT.get(t, t) for t, i in maps.tokens.items()}
    n_prefix = maps.num_prefix_tokens
    prefix = [names.get(i, f"reg{i}") for i in range(n_prefix)]
    rows, cols = maps.grid
    if n_prefix + rows * cols <= 40:  # room for a label per prefix token
        ticks, labels, first_row = list(range(n_prefix)), prefix, 0
    else:  # one label for all of them, and none on the first patch row, or the labels overlap
        ticks, labels, first_row = [(n_prefix - 1) / 2], ["+".join(prefix)], 1
    step = max(1, int(np.ceil(rows / 8)))  # at most ~8 patch labels
    for r in range(first_row * step, rows, step):
        ticks.append(n_prefix + r * cols)
        labels.append(f"p{r * cols}")
    return ticks, labels


def save_figure(fig: Figure, path: str | Path, dpi: int = 100) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    return path


def _prediction_text(probs: dict[str, torch.Tensor], i: int, class_names: Sequence[str] | None) -> str:
    def name(k: int) -> str:
        return class_names[k] if class_names and k < len(class_names) else str(k)

    parts = []
    for head, p in probs.items():
        conf, k = p[i].max(-1)
        parts.append(f"{head} {name(int(k))} ({float(conf):.2f})")
    return "prediction: " + ", ".join(parts)


def write_attention_pngs(
    model: torch.nn.Module,
    x: torch.Tensor,
    paths: Sequence[str | Path],
    *,
    mean: Sequence[float],
    std: Sequence[float],
    class_names: Sequence[str] | None = None,
    labels: Sequence[str | None] | None = None,
    targets: Sequence[int] | None = None,
    layer: int = -1,
    head: int | None = None,
    dpi: int = 100,
    cmap: str = "inferno",
) -> list[Path]:
    """Attention figures of the batch `x` (normalised with mean/std) written to `paths`, one per image.

    `labels` name the images in the titles (e.g. file names); `targets` adds the true class."""
    from .attention import attention_maps
    from ..models.heads import head_probabilities

    if len(paths) != len(x):
        raise ValueError(f"{len(x)} images but {len(paths)} output paths")
    was_training = model.training
    model.eval()
    try:
        maps = attention_maps(model, x)
        probs = {h: p.float().cpu() for h, p in head_probabilities(model, x).items()}
    finally:
        model.train(was_training)
    n = len(maps.layers)
    if not -n <= layer < n:
        raise IndexError(f"--layer {layer} is out of range; the model has {n} blocks (0..{n - 1}, or -1 for the last)")
    if head is not None and not -maps.num_heads <= head < maps.num_heads:
        raise IndexError(f"--head {head} is out of range; the model has {maps.num_heads} heads (0..{maps.num_heads - 1})")
    written = []
    for i, path in enumerate(paths):
        parts = [str(labels[i]) if labels and labels[i] else Path(path).stem]
        if targets is not None:
            t = int(targets[i])
            parts.append(f"true {class_names[t] if class_names and t < len(class_names) else t}")
        parts.append(_prediction_text(probs, i, class_names))
        fig = attention_figure(to_display(x[i], mean, std), maps, i, layer=layer, head=head,
                               title=" | ".join(parts), cmap=cmap)
        written.append(save_figure(fig, path, dpi=dpi))
    return written
