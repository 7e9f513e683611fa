import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from prunekit import NM, Block1xN, PruneError, Unstructured, get_pattern
from prunekit.patterns import PatternViolation

shapes = st.tuples(st.integers(1, 12), st.integers(1, 24))


def _scores(rows, cols, seed):
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))


@settings(max_examples=60, deadline=None)
@given(shapes, st.floats(0, 0.99), st.integers(0, 10_000))
def test_unstructured_layer_hits_count_and_drops_smallest(shape, sparsity, seed):
    s = _scores(*shape, seed)
    mask = Unstructured("layer").select(s, sparsity)
    assert int((~mask).sum()) == round(sparsity * s.numel())
    Unstructured("layer").check(mask, sparsity)
    if (~mask).any() and mask.any():
        assert s[~mask].max() <= s[mask].min()


@settings(max_examples=60, deadline=None)
@given(shapes, st.floats(0, 0.99), st.integers(0, 10_000))
def test_unstructured_row_hits_count_in_every_row(shape, sparsity, seed):
    s = _scores(*shape, seed)
    mask = Unstructured("row").select(s, sparsity)
    assert ((~mask).sum(dim=1) == round(sparsity * shape[1])).all()
    for r in range(shape[0]):
        if (~mask[r]).any() and mask[r].any():
            assert s[r][~mask[r]].max() <= s[r][mask[r]].min()


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 6), st.integers(2, 8), st.integers(1, 5), st.integers(1, 8),
       st.integers(0, 10_000))
def test_nm_keeps_exactly_n_of_every_m(n, m, groups, rows, seed):
    n = min(n, m - 1)
    s = _scores(rows, groups * m, seed)
    mask = NM(n, m).select(s)
    kept = mask.reshape(rows, groups, m)
    assert (kept.sum(dim=2) == n).all()
    NM(n, m).check(mask)
    g = s.reshape(rows, groups, m)
    lowest_kept = g.masked_fill(~kept, float("inf")).amin(2)
    assert (lowest_kept >= g.masked_fill(kept, -float("inf")).amax(2)).all()


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 4), st.integers(1, 5), st.integers(1, 16), st.floats(0, 0.99),
       st.integers(0, 10_000))
def test_1xn_blocks_are_whole_and_counted(n, blocks, cols, sparsity, seed):
    s = _scores(n * blocks, cols, seed)
    pat = Block1xN(n)
    mask = pat.select(s, sparsity)
    b = mask.reshape(blocks, n, cols)
    assert (b.all(dim=1) | (~b).all(dim=1)).all()
    assert int((~b[:, 0]).sum()) == round(sparsity * blocks * cols)
    pat.check(mask, sparsity)


def test_check_rejects_broken_masks():
    mask = torch.ones(4, 8, dtype=torch.bool)
    with pytest.raises(PatternViolation):
        NM(2, 4).check(mask)
    mask = NM(2, 4).select(torch.randn(4, 8))
    NM(2, 4).check(mask)
    mask[0, 0] = ~mask[0, 0]
    with pytest.raises(PatternViolation):
        NM(2, 4).check(mask)
    bm = Block1xN(2).select(torch.randn(4, 8), 0.5)
    bm[0, 0] = ~bm[0, 0]
    with pytest.raises(PatternViolation):
        Block1xN(2).check(bm)
    with pytest.raises(PatternViolation):
        Unstructured().check(torch.ones(3, 3, dtype=torch.bool), 0.5)


def test_pattern_names_parse():
    assert get_pattern("unstructured") == Unstructured("layer")
    assert get_pattern("unstructured:row") == Unstructured("row")
    assert get_pattern("2:4") == NM(2, 4)
    assert get_pattern("4:8") == NM(4, 8)
    assert get_pattern("1x4") == Block1xN(4)
    assert get_pattern("2:4").implied_sparsity == 0.5
    for bad in ("3:2", "0:4", "4:4", "2x4", "dense", ""):
        with pytest.raises(PruneError):
            get_pattern(bad)


def test_bad_shapes_and_sparsity_are_named():
    with pytest.raises(PruneError, match="multiple of 4"):
        NM(2, 4).validate_shape((8, 10), "enc.fc1")
    with pytest.raises(PruneError, match="enc.fc1"):
        Block1xN(4).validate_shape((6, 8), "enc.fc1")
    for s in (-0.1, 1.0, 1.5):
        with pytest.raises(PruneError, match="sparsity"):
            Unstructured().select(torch.randn(3, 3), s)
    with pytest.raises(PruneError, match="fixes sparsity"):
        NM(2, 4).resolve_sparsity(0.7)
