"""`synaug sample`: embed a split, cluster each class, write the images a generator should learn from.

Output folder:

    clusters.csv                 every cluster of every class: rank, size, coherence, kept, its manifest
    selected.csv                 the selected images of all kept clusters (a `selection:` for a datamodule)
    <class>/cluster_<j>.csv      one manifest per class and cluster: its top-N images, nearest first
    <class>/cluster_<j>/         with `copy: true`, those images as files, named `<rank>_<name>`

Manifests have the columns id (the ImageSource item id), path, class, label, cluster, rank, similarity (cosine to
the centroid) and, with `copy: true`, copy. The run is logged to MLflow: parameters, the tables, a grid of each
cluster's nearest images per class, and a 2-D map of the embeddings coloured by cluster.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import torch
from mlflow.entities import Param
from PIL import Image

from synaug.data.sources import ImageSource, OnBad, load_source
from synaug.sampling.cluster import ClassClusters, cluster_class
from synaug.sampling.embed import create_embedder, embed_images
from synaug.sampling.plots import Projection, grid_figure, map_figure
from synaug.tracking import command_run, log_figure

MANIFEST_COLUMNS = ["id", "path", "class", "label", "cluster", "rank", "similarity"]


def sample(
    data: str,
    out: str,
    embedder: str = "efficientnet_lite0",
    pretrained: bool | str = True,
    checkpoint_path: str | None = None,
    k: int | dict[str, int] = 5,
    top_n: int = 100,
    threshold: float = 0.65,
    niter: int = 20,
    nredo: int = 5,
    seed: int = 0,
    split: Literal["train", "val", "test"] = "train",
    classes: list[str] | None = None,
    copy: bool = False,
    batch_size: int = 64,
    device: str | None = None,
    gpu_kmeans: bool | None = None,
    on_bad: OnBad = "error",
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    split_seed: int = 0,
    projection: Projection = "pca",
    grid_n: int = 8,
    experiment: str = "sampling",
    run_name: str | None = None,
    tracking_uri: str | None = None,
) -> str:
    """Select representative images per class and cluster; returns the MLflow run id.

    Args:
        data: image folder, MedMNIST .npz or CSV manifest (see `synaug.data.sources.load_source`).
        out: folder for the manifests (and copies); must be new or empty.
        embedder: a timm model name (pooled features, e.g. `efficientnet_lite0`, whose ImageNet weights ship
            in a package and work offline) or `open_clip:<arch>` (e.g. `open_clip:ViT-B-32`).
        pretrained: timm: `true` for the packaged weights (`efficientnet_lite0`), else the hub weights timm
            knows for the name; OpenCLIP: a tag (e.g.
            `laion2b_s34b_b79k`). `false`: random weights (for tests: the clusters then mean little). Nothing
            can be downloaded offline: use `checkpoint_path`.
        checkpoint_path: a local weight file: timm format (`model.safetensors`) for timm, or
            `open_clip_pytorch_model.bin` / `.safetensors` for OpenCLIP.
        k: clusters per class; a mapping gives each class its own and must name every clustered class.
        top_n: images selected per cluster, nearest the centroid first.
        threshold: keep clusters whose member-to-centroid cosine similarity has mean - std >= threshold.
        niter: k-means iterations.
        nredo: k-means restarts; the best objective is kept.
        seed: seed of k-means and of the 2-D map.
        split: the split whose images are clustered.
        classes: the classes to cluster (default: all).
        copy: also copy the selected images into `out/<class>/cluster_<j>/`.
        batch_size: images per embedding batch.
        device: torch device for embedding (default: CUDA when present).
        gpu_kmeans: faiss on the GPU (default: when faiss-gpu sees one).
        on_bad: `error` stops at an unreadable image, `skip` leaves it out.
        val_fraction: as in `load_source`: use the values the datamodule uses, so that ids land in its splits.
        test_fraction: as in `load_source`.
        split_seed: the seed of `load_source`'s split carving.
        projection: `pca` or `tsne` for the embedding map.
        grid_n: images per cluster in the grid figures.
        experiment: MLflow experiment name.
        run_name: MLflow run name.
        tracking_uri: MLflow tracking URI (default: `$MLFLOW_TRACKING_URI`, else the local store).
    """
    params = dict(locals())
    out_dir = Path(out).expanduser()
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(
            f"{out_dir}: output folder is not empty; choose a new folder or delete this one"
        )
    model = create_embedder(embedder, pretrained, checkpoint_path, device)  # first: missing weights fail fast
    src = load_source(data, val_fraction=val_fraction, test_fraction=test_fraction, seed=split_seed)
    names = classes or src.classes
    unknown = sorted(set(names) - set(src.classes))
    if unknown:
        raise ValueError(f"{data}: unknown class(es) {unknown}; the source has {src.classes}")
    ks = k if isinstance(k, dict) else dict.fromkeys(names, k)
    missing = sorted(set(names) - set(ks))
    if missing:
        raise ValueError(f"k names no number of clusters for class(es) {missing}")

    features, held = embed_images(model, src, src.indices(split), batch_size=batch_size, on_bad=on_bad)
    features = features.numpy()

    results: dict[str, tuple[np.ndarray, ClassClusters, pd.DataFrame]] = {}
    for name in names:
        label = src.classes.index(name)
        pos = np.flatnonzero(src.items["label"].to_numpy()[held] == label)
        if len(pos) < ks[name]:
            raise ValueError(
                f"class '{name}' has {len(pos)} {split} images, fewer than k={ks[name]} clusters"
            )
        result = cluster_class(
            features[pos],
            ks[name],
            top_n=top_n,
            threshold=threshold,
            niter=niter,
            nredo=nredo,
            seed=seed,
            gpu=gpu_kmeans,
        )
        items = src.items.iloc[held[pos]]
        images = result.images.assign(
            index=held[pos],
            id=items["id"].to_numpy(),
            path=items["path"].to_numpy(),
            **{"class": name},
            label=label,
        )
        results[name] = (features[pos], result, images)

    summary, selected = write_manifests(src, results, out_dir, copy)

    client, run_id = command_run(
        experiment,
        run_name,
        tracking_uri,
        {"data_fingerprint": src.fingerprint, "embedder_weights": model.weights},
    )
    client.log_batch(run_id, params=[Param(key, str(value)) for key, value in params.items()])
    client.log_metric(run_id, "clusters_kept", int(summary["kept"].sum()))
    client.log_metric(run_id, "images_selected", len(selected))
    for csv in sorted(out_dir.rglob("*.csv")):
        rel = csv.relative_to(out_dir).parent
        client.log_artifact(run_id, str(csv), f"selection/{rel}" if rel.parts else "selection")
    for name, (_, result, images) in results.items():
        log_figure(client, run_id, cluster_grid(src, name, result, images, grid_n), f"grids/{name}.png")
    panels = [(f"{name} (k={ks[name]})", x, result) for name, (x, result, _) in results.items()]
    log_figure(client, run_id, map_figure(panels, projection, seed), "embedding_map.png")
    client.set_terminated(run_id)
    return run_id


def write_manifests(
    src: ImageSource,
    results: dict[str, tuple[np.ndarray, ClassClusters, pd.DataFrame]],
    out: Path,
    copy: bool,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Write the per-cluster manifests, `clusters.csv` and `selected.csv`; returns the last two as tables."""
    summaries, kept = [], []
    for name, (_, result, images) in results.items():
        clusters = result.clusters.assign(**{"class": name}, manifest="")
        for row in clusters.itertuples():
            rel = Path(name) / f"cluster_{row.cluster}.csv"
            chosen = images[(images["cluster"] == row.cluster) & images["selected"]].sort_values("rank")
            manifest = chosen[MANIFEST_COLUMNS].copy()
            if copy:
                manifest["copy"] = [
                    copy_image(src, i, out / name / f"cluster_{row.cluster}", r)
                    for i, r in zip(chosen["index"], chosen["rank"], strict=True)
                ]
            (out / name).mkdir(parents=True, exist_ok=True)
            manifest.to_csv(out / rel, index=False)
            clusters.loc[row.Index, "manifest"] = str(rel)
            if row.kept:
                kept.append(manifest)
        summaries.append(clusters)
    summary = pd.concat(summaries, ignore_index=True)
    summary = summary[["class", *[c for c in summary.columns if c != "class"]]]
    summary.to_csv(out / "clusters.csv", index=False)
    selected = pd.concat(kept, ignore_index=True) if kept else pd.DataFrame(columns=MANIFEST_COLUMNS)
    selected.to_csv(out / "selected.csv", index=False)
    return summary, selected


def copy_image(src: ImageSource, index: int, folder: Path, rank: int) -> str:
    """Copy one source image into `folder` as `<rank>_<name>`; array-backed images are written as PNG."""
    folder.mkdir(parents=True, exist_ok=True)
    item_id = src.items.at[index, "id"]
    if src.arrays is not None:
        dest = folder / f"{rank:04d}_{item_id.replace('/', '_')}.png"
        Image.fromarray(src.arrays[index]).save(dest)
    else:
        dest = folder / f"{rank:04d}_{Path(item_id).name}"
        shutil.copy2(src.items.at[index, "path"], dest)
    return str(dest)


def cluster_grid(src: ImageSource, name: str, result: ClassClusters, images: pd.DataFrame, n: int):
    """A figure with one row per cluster (best first): its `n` images nearest the centroid."""
    rows = []
    for c in result.clusters.itertuples():
        top = images[images["cluster"] == c.cluster].sort_values("rank").head(n)
        pixels, _ = (
            src.decode(top["index"].to_numpy(), 96, 3) if len(top) else (torch.empty(0, 3, 96, 96), None)
        )
        label = (
            f"cluster {c.cluster}\nn={c.size}\n{c.coherence_mean:.3f}±{c.coherence_std:.3f}\n"
            f"{'kept' if c.kept else 'dropped'}"
        )
        rows.append((label, pixels))
    return grid_figure(f"{name}: images nearest each centroid (rows by coherence)", rows)
