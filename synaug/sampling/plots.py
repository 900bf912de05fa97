"""Figures that make a selection inspectable: each cluster's nearest images, and a 2-D map of the embeddings."""

from __future__ import annotations

from typing import Literal

import matplotlib.pyplot as plt
import numpy as np
import torch
from sklearn.decomposition import PCA
from sklearn.manifold import TSNE

from synaug.sampling.cluster import ClassClusters

Projection = Literal["pca", "tsne"]


def grid_figure(title: str, rows: list[tuple[str, torch.Tensor]]) -> plt.Figure:
    """One row per (label, uint8 images (m, C, H, W)), images left to right in the given order."""
    cols = max(1, max(len(images) for _, images in rows))
    fig, axes = plt.subplots(
        len(rows), cols, figsize=(1.3 * cols + 1.5, 1.4 * len(rows) + 0.4), squeeze=False
    )
    for (label, images), row in zip(rows, axes, strict=True):
        for j, ax in enumerate(row):
            ax.set_xticks([])
            ax.set_yticks([])
            ax.spines[:].set_visible(False)
            if j < len(images):
                img = images[j].permute(1, 2, 0).numpy()
                ax.imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap="gray", vmin=0, vmax=255)
        row[0].set_ylabel(label, rotation=0, ha="right", va="center", fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def project(x: np.ndarray, centroids: np.ndarray, method: Projection = "pca", seed: int = 0):
    """2-D coordinates of the rows of `x`, and of the centroids where the method can place new points (PCA)."""
    if method == "pca":
        pca = PCA(2, random_state=seed).fit(x)
        return pca.transform(x), pca.transform(centroids)
    # t-SNE embeds only the points it is fitted on: no centroids; its perplexity must stay below n.
    tsne = TSNE(2, perplexity=min(30.0, len(x) - 1.0), init="pca", random_state=seed)
    return tsne.fit_transform(x), None


def map_figure(
    panels: list[tuple[str, np.ndarray, ClassClusters]], method: Projection = "pca", seed: int = 0
) -> plt.Figure:
    """One panel per (title, embeddings (n, d), their clusters): points coloured by cluster, the selected ones
    outlined, centroids as numbered crosses."""
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4.2), squeeze=False)
    cmap = plt.get_cmap("tab10")
    for (title, x, result), ax in zip(panels, axes[0], strict=True):
        xy, cxy = project(x, result.centroids, method, seed)
        colours = cmap(result.images["cluster"].to_numpy() % 10)
        sel = result.images["selected"].to_numpy()
        ax.scatter(*xy[~sel].T, c=colours[~sel], s=8, alpha=0.35, linewidths=0)
        ax.scatter(*xy[sel].T, c=colours[sel], s=14, edgecolors="black", linewidths=0.4)
        if cxy is not None:
            for j, (cx, cy) in enumerate(cxy):
                ax.scatter(cx, cy, marker="X", s=120, c=[cmap(j % 10)], edgecolors="black", linewidths=0.8)
                ax.annotate(str(j), (cx, cy), xytext=(5, 5), textcoords="offset points", fontsize=9)
        ax.set_title(title, fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"embeddings ({method.upper()}), coloured by cluster; outlined: selected")
    fig.tight_layout()
    return fig
