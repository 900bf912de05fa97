"""Faiss k-means within one class, each cluster's members ranked by closeness to its centroid, and coherence.

Thesis 1 trained one generator per cluster of similar images, meaning to take the N images nearest each centroid
(it took the first N files in directory order). Here every member of a cluster is ranked by cosine similarity to
the centroid, the top N are the selection, and a cluster is kept when it is coherent: the mean minus the standard
deviation of its members' similarity to the centroid is at least a threshold (0.65 in thesis 1).
"""

from __future__ import annotations

from dataclasses import dataclass

import faiss
import numpy as np
import pandas as pd


def kmeans(
    x: np.ndarray,
    k: int,
    *,
    niter: int = 20,
    nredo: int = 5,
    seed: int = 0,
    spherical: bool = True,
    gpu: bool | None = None,
) -> np.ndarray:
    """Centroids (k, d) of the rows of `x` (n, d).

    Spherical k-means (unit-norm centroids, inner-product assignment) fits L2-normalised features; `nredo`
    restarts keep the best objective. `gpu=None` uses a GPU index when faiss was built with GPU support and
    sees a GPU.
    """
    n, d = x.shape
    if n < k:
        raise ValueError(f"cannot make {k} clusters from {n} images; lower k")
    if gpu and faiss.get_num_gpus() == 0:
        raise RuntimeError(
            "gpu=True, but faiss sees no GPU (install faiss-gpu and run where CUDA is present)"
        )
    km = faiss.Kmeans(
        d,
        k,
        niter=niter,
        nredo=nredo,
        seed=seed,
        spherical=spherical,
        verbose=False,
        init_method=faiss.ClusteringInitMethod_KMEANS_PLUS_PLUS,
        # faiss trains on a sample of 256 points per centroid by default; these sets are small: use every point.
        max_points_per_centroid=n,
        # Fewer than 39 points per centroid only makes faiss warn; small medical classes are the use case.
        min_points_per_centroid=1,
        gpu=faiss.get_num_gpus() > 0 if gpu is None else gpu,
    )
    km.train(np.ascontiguousarray(x, dtype=np.float32))
    return km.centroids


def assign(x: np.ndarray, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each row's most similar centroid and its cosine similarity to it (rows of `x` are unit-norm)."""
    sim = x @ (centroids / np.linalg.norm(centroids, axis=1, keepdims=True)).T
    cluster = sim.argmax(1)
    return cluster, sim[np.arange(len(x)), cluster]


def rank_members(cluster: np.ndarray, similarity: np.ndarray) -> np.ndarray:
    """1-based rank of each row within its cluster, most similar to the centroid first (ties: earlier row)."""
    ranks = pd.Series(similarity).groupby(cluster).rank(method="first", ascending=False)
    return ranks.to_numpy(dtype=np.int64)


def coherence(cluster: np.ndarray, similarity: np.ndarray, k: int) -> pd.DataFrame:
    """Per cluster: size, mean and (population) standard deviation of members' similarity, and mean - std."""
    table = (
        pd.DataFrame({"cluster": cluster, "s": similarity})
        .groupby("cluster")["s"]
        .agg(size="size", coherence_mean="mean", coherence_std=lambda s: s.std(ddof=0))
        .reindex(range(k))  # faiss re-seeds empty clusters, but a cluster can still end up empty: size 0, NaN
        .fillna({"size": 0})
        .astype({"size": int})
        .rename_axis("cluster")
        .reset_index()
    )
    table["coherence"] = table["coherence_mean"] - table["coherence_std"]
    return table


@dataclass
class ClassClusters:
    centroids: np.ndarray  # (k, d), unit-norm
    images: pd.DataFrame  # one row per input row, same order: cluster, similarity, rank, selected
    clusters: (
        pd.DataFrame
    )  # one row per cluster, best first: cluster, rank, size, n_selected, coherence*, kept


def cluster_class(
    x: np.ndarray,
    k: int,
    *,
    top_n: int = 100,
    threshold: float = 0.65,
    niter: int = 20,
    nredo: int = 5,
    seed: int = 0,
    gpu: bool | None = None,
) -> ClassClusters:
    """Cluster one class's L2-normalised embeddings, select the `top_n` nearest members of each cluster, and
    keep clusters whose coherence (mean - std of member similarity) is at least `threshold`."""
    centroids = kmeans(x, k, niter=niter, nredo=nredo, seed=seed, gpu=gpu)
    cluster, similarity = assign(x, centroids)
    rank = rank_members(cluster, similarity)
    images = pd.DataFrame(
        {"cluster": cluster, "similarity": similarity, "rank": rank, "selected": rank <= top_n}
    )
    clusters = coherence(cluster, similarity, k)
    clusters["n_selected"] = clusters["size"].clip(upper=top_n)
    clusters["kept"] = clusters["coherence"] >= threshold
    clusters = clusters.sort_values("coherence", ascending=False, na_position="last", kind="stable")
    clusters.insert(1, "rank", np.arange(1, k + 1))
    return ClassClusters(centroids, images, clusters.reset_index(drop=True))
