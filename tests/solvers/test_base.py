"""merge_counts: the layer-wide greedy merge of per-row removal sequences (lobs and obc)."""

from __future__ import annotations

import numpy as np

from onnx_lobs.solvers.base import merge_counts

# Running maxima: row 0 [1, 5, 5], row 1 [3, 4, 9], so the layer visits
# (0,0)=1, (1,0)=3, (1,1)=4, (0,1)=5, (0,2)=2, (1,2)=9, cumulative losses 1, 4, 8, 13, 15, 24.
LOSS = np.array([[1.0, 5.0, 2.0], [3.0, 4.0, 9.0]])


def test_counts_follow_the_running_maximum():
    done = np.array([3, 3])
    for n_prune, counts in [(0, [0, 0]), (1, [1, 0]), (3, [1, 2]), (5, [3, 2]), (6, [3, 3])]:
        np.testing.assert_array_equal(merge_counts(LOSS, done, n_prune, None), counts)
    for max_loss, counts in [(0.5, [0, 0]), (8.0, [1, 2]), (7.9, [1, 1]), (15.0, [3, 2]), (1e9, [3, 3])]:
        np.testing.assert_array_equal(merge_counts(LOSS, done, None, max_loss), counts)


def test_only_the_computed_prefixes_count_for_the_budget():
    done = np.array([1, 3])  # row 0's sequence is computed up to its first removal only
    np.testing.assert_array_equal(merge_counts(LOSS, done, 2, None), [1, 1])
    counts = merge_counts(LOSS, done, None, 1e9)
    np.testing.assert_array_equal(counts, [1, 3])
    assert counts[0] >= done[0]  # the caller's sign that row 0's sequence must go further
