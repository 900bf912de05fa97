"""Faiss vs scikit-learn k-means: wall time and objective with the same k, iterations, restarts and init.

    .venv/bin/python experiments/bench/kmeans.py [--model efficientnet_b0] [--k 5] [--niter 20] [--nredo 5]
        [--threads 1]

Two workloads: the brain MRI training embeddings, clustered per class as `synaug sample` does (embedded with a
randomly initialised timm model: no weights can be downloaded here; the embeddings are cached), and n x d random
Gaussian vectors. Both libraries run Lloyd k-means (L2) from k-means++ with `niter` iterations (scikit-learn:
`max_iter=niter, tol=0`, so it stops early only when no label changes) and `nredo` restarts (`n_init`). The
objective (sum of squared distances to the nearest centroid) is computed the same way for both. One run each:
on a shared CPU the times are noisy. The first run embeds the ~5,100 training images (minutes on a CPU);
later runs read the embeddings from the cache.
"""

from __future__ import annotations

import time

import faiss
import numpy as np
import torch
from jsonargparse import CLI
from sklearn.cluster import KMeans
from threadpoolctl import threadpool_info, threadpool_limits

from synaug.data.sources import load_source
from synaug.sampling import create_embedder, embed_images, kmeans


def objective(x: np.ndarray, centroids: np.ndarray) -> float:
    index = faiss.IndexFlatL2(x.shape[1])
    index.add(np.ascontiguousarray(centroids, dtype=np.float32))
    distances, _ = index.search(x, 1)
    return float(distances.sum())


def compare(name: str, sets: list[np.ndarray], k: int, niter: int, nredo: int, seed: int) -> None:
    """Time both libraries over `sets` (clustered one after the other) and print their ratios."""
    t_faiss = t_sk = obj_faiss = obj_sk = 0.0
    for x in sets:
        start = time.perf_counter()
        c_faiss = kmeans(x, k, niter=niter, nredo=nredo, seed=seed, spherical=False, gpu=False)
        t_faiss += time.perf_counter() - start
        start = time.perf_counter()
        c_sk = (
            KMeans(
                k, init="k-means++", n_init=nredo, max_iter=niter, tol=0, algorithm="lloyd", random_state=seed
            )
            .fit(x)
            .cluster_centers_
        )
        t_sk += time.perf_counter() - start
        obj_faiss += objective(x, c_faiss)
        obj_sk += objective(x, c_sk)
    shape = " + ".join(f"{len(x)}" for x in sets) + f" x {sets[0].shape[1]}"
    print(f"{name} ({shape}, k={k}, niter={niter}, nredo={nredo}):")
    print(
        f"  faiss {t_faiss:.3f} s, scikit-learn {t_sk:.3f} s: scikit-learn / faiss time = {t_sk / t_faiss:.2f}"
    )
    print(
        f"  objective faiss / scikit-learn = {obj_faiss / obj_sk:.4f} (below 1: faiss found tighter clusters)"
    )


def main(
    data: str = "../shared/data/brain_tumor_mri",
    model: str = "efficientnet_b0",
    k: int = 5,
    niter: int = 20,
    nredo: int = 5,
    n_random: int = 100_000,
    d_random: int = 512,
    seed: int = 0,
    threads: int | None = None,
) -> None:
    """`threads`: cap every library at this many threads (default: theirs); 1 gives steadier figures on a
    shared CPU, where a parallel region waits for whichever of its threads was descheduled."""
    if threads is not None:
        faiss.omp_set_num_threads(threads)
        threadpool_limits(threads)
        torch.set_num_threads(threads)
    sk_threads = {i["internal_api"]: i["num_threads"] for i in threadpool_info()}
    print(
        f"threads: faiss (OpenMP) {faiss.omp_get_max_threads()}, scikit-learn {sk_threads}, "
        f"torch {torch.get_num_threads()}"
    )

    source = load_source(data)
    embedder = create_embedder(model, pretrained=False)
    features, held = embed_images(embedder, source, source.indices("train"))
    labels = source.items["label"].to_numpy()[held]
    per_class = [np.ascontiguousarray(features.numpy()[labels == c]) for c in range(len(source.classes))]
    compare(
        f"brain MRI train embeddings, {model} with RANDOM weights, per class",
        per_class,
        k,
        niter,
        nredo,
        seed,
    )
    start = time.perf_counter()
    for x in per_class:
        kmeans(x, k, niter=niter, nredo=nredo, seed=seed)
    print(f"  (synaug's spherical faiss k-means on the same: {time.perf_counter() - start:.3f} s)")

    x = np.random.default_rng(seed).standard_normal((n_random, d_random), dtype=np.float32)
    compare("random Gaussian vectors", [x], k, niter, nredo, seed)


if __name__ == "__main__":
    CLI(main)
