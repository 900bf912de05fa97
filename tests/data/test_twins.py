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


def hashes_with_bits(*flipped: list[int]) -> np.ndarray:
    """One 256-bit hash per list: the bits set in it (all others 0)."""
    bits = np.zeros((len(flipped), 256), dtype=np.uint8)
    for row, on in enumerate(flipped):
        bits[row, on] = 1
    return np.packbits(bits, axis=1).view(">u8").astype(np.uint64)


def test_bounded_groups_of_a_small_hand_made_graph():
    # Within 3 bits: a-a2 (1), a2-c (3), b-b2 (0, exact twins); a-c is 4 bits apart. Connected components of the
    # threshold graph would be {a, a2, c}, {b, b2}, {d}; leader clustering stops the chain at a's neighbours.
    a, a2, c = [0, 1], [0, 1, 2], [0, 1, 2, 3, 4, 5]
    b, d = list(range(100, 140)), list(range(200, 256))
    hashes = hashes_with_bits(a, a2, b, c, b, d, a)
    ok = np.array([True, True, True, True, True, True, False])  # the last is unreadable: a group of its own
    assert distances(hashes, hashes)[0].tolist() == [0, 1, 42, 4, 42, 58, 0]
    assert bounded_groups(hashes, threshold=3, ok=ok).tolist() == [0, 0, 1, 2, 1, 3, 4]
