import numpy as np

from synaug.data.twins import bounded_groups, distances, has_near_twin


def chain(n: int, step: int) -> np.ndarray:
    """Hashes where image i+1 flips `step` more bits than image i: distance(i, j) = step * |i - j|."""
    bits = np.zeros((n, 256), dtype=np.uint8)
    for i in range(n):
        bits[i, : step * i] = 1
    return np.packbits(bits, axis=1).view(">u8").astype(np.uint64)


def test_bounded_groups_have_bounded_diameter():
    hashes = chain(40, 3)
    group = bounded_groups(hashes, threshold=3)
    assert len(set(group)) == 20  # pairs, where a threshold graph's components would be one chain of 40
    for g in set(group):
        members = np.flatnonzero(group == g)
        assert distances(hashes[members], hashes[members]).max() <= 2 * 3


def test_has_near_twin():
    hashes = chain(10, 4)
    assert has_near_twin(hashes, np.array([5, 9]), np.array([0, 1, 2, 3, 4]), 4).tolist() == [True, False]
