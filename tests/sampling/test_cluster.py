import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score

from synaug.sampling import cluster_class, coherence, kmeans


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def groups(rng, sizes, d=32, noise=0.3):
    centres = rng.normal(size=(len(sizes), d))
    x = np.concatenate([c + noise * rng.normal(size=(n, d)) for c, n in zip(centres, sizes, strict=True)])
    return unit(x), np.repeat(np.arange(len(sizes)), sizes)


@pytest.mark.parametrize("sizes", [(20, 20), (25, 10, 15)])
def test_clusters_recover_groups(sizes):
    x, truth = groups(np.random.default_rng(1), sizes)
    result = cluster_class(x, len(sizes), top_n=5)
    assert adjusted_rand_score(truth, result.images["cluster"]) == 1.0
    assert sorted(result.clusters["size"]) == sorted(sizes)
    np.testing.assert_allclose(np.linalg.norm(result.centroids, axis=1), 1, atol=1e-5)  # spherical


def test_top_n_equals_brute_force_nearest_search():
    x = unit(np.random.default_rng(2).normal(size=(200, 16)))
    top_n, k = 7, 4
    result = cluster_class(x, k, top_n=top_n)
    c = result.centroids / np.linalg.norm(result.centroids, axis=1, keepdims=True)
    cos = x @ c.T
    truth = cos.argmax(1)
    np.testing.assert_array_equal(result.images["cluster"], truth)
    np.testing.assert_allclose(result.images["similarity"], cos[np.arange(len(x)), truth], rtol=1e-5)
    for j in range(k):
        members = np.flatnonzero(truth == j)
        expected = members[np.argsort(-cos[members, j], kind="stable")[:top_n]]
        chosen = result.images[(result.images["cluster"] == j) & result.images["selected"]].sort_values(
            "rank"
        )
        np.testing.assert_array_equal(chosen.index.to_numpy(), expected)
        np.testing.assert_array_equal(chosen["rank"], np.arange(1, len(expected) + 1))


def test_coherence_filter_drops_incoherent_cluster():
    rng = np.random.default_rng(3)
    d = 16
    tight = np.zeros((20, d))
    tight[:, 0] = 1
    tight[:, 2:] = 0.05 * rng.normal(size=(20, d - 2))
    # Diffuse: all along e1, but with a random amount of noise each, so similarity to the centroid spreads widely.
    diffuse = np.zeros((20, d))
    diffuse[:, 1] = 1
    diffuse[:, 2:] = rng.uniform(0.1, 1.5, size=(20, 1)) * rng.normal(size=(20, d - 2))
    x = unit(np.concatenate([tight, diffuse]))
    result = cluster_class(x, 2, top_n=5, threshold=0.65)

    truth = np.repeat([0, 1], 20)
    assert adjusted_rand_score(truth, result.images["cluster"]) == 1.0
    tight_cluster = result.images["cluster"][0]
    table = result.clusters.set_index("cluster")
    assert table.loc[tight_cluster, "kept"]
    assert not table.loc[1 - tight_cluster, "kept"]
    assert table.loc[tight_cluster, "rank"] == 1
    for j in (0, 1):
        sims = result.images["similarity"][result.images["cluster"] == j]
        assert table.loc[j, "coherence_mean"] == pytest.approx(np.mean(sims))
        assert table.loc[j, "coherence_std"] == pytest.approx(np.std(sims))
        assert table.loc[j, "coherence"] == pytest.approx(np.mean(sims) - np.std(sims))


def test_coherence_reports_empty_clusters():
    table = coherence(np.array([0, 0, 2]), np.array([0.9, 0.7, 1.0]), 3)
    assert table["size"].tolist() == [2, 0, 1]
    assert np.isnan(table.loc[1, "coherence"])
    assert table.loc[2, "coherence_std"] == 0


def test_kmeans_is_seeded_and_refuses_too_few_points():
    x = unit(np.random.default_rng(4).normal(size=(300, 8)))
    np.testing.assert_array_equal(kmeans(x, 5, seed=1), kmeans(x, 5, seed=1))
    with pytest.raises(ValueError, match="cannot make 5 clusters from 4 images"):
        kmeans(x[:4], 5)
