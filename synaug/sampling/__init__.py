"""Representative sampling: embed a class's images, cluster them with Faiss, select the images nearest each
centroid for generators to learn from, and keep only coherent clusters."""

from synaug.sampling.cluster import ClassClusters, assign, cluster_class, coherence, kmeans, rank_members
from synaug.sampling.command import sample
from synaug.sampling.embed import Embedder, create_embedder, embed_images

__all__ = [
    "ClassClusters",
    "Embedder",
    "assign",
    "cluster_class",
    "coherence",
    "create_embedder",
    "embed_images",
    "kmeans",
    "rank_members",
    "sample",
]
