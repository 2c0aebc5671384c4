"""The gradient-mixing probes separate every ordered pair of samples: for s != r some probe set holds s and not
r, so a gradient from sample s into sample r's rows shows as a non-zero outside the set, whatever the
permutation or grouping; 2 and 3 samples (the ordinary analysis) take one backward per sample, as before."""
import pytest

from fxdp.analysis.gradient_mixing import probe_sets


@pytest.mark.parametrize("n", [2, 3, 4, 5, 7, 8, 9, 16, 33, 64, 100, 256])
def test_probe_sets_separate_every_ordered_pair_of_samples(n):
    sets = [set(S) for S in probe_sets(n)]
    assert all(any(s in S and r not in S for S in sets) for s in range(n) for r in range(n) if s != r)
    assert all(0 < len(S) < n for S in sets)


def test_probe_sets_cost_one_backward_per_sample_for_three_and_grow_logarithmically():
    assert probe_sets(2) == [[0], [1]] and probe_sets(3) == [[0], [1], [2]]
    assert [len(probe_sets(n)) for n in (8, 64, 256, 1024)] == [5, 8, 11, 13]
