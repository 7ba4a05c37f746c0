import pytest
import torch

from sparsegrad.kernels import (
    macs_auto,
    macs_dense,
    macs_regular,
    nonzero_rows,
    resolve_k,
    scatter_rows,
    topk_coo,
    topk_rows,
)


def test_resolve_k_counts_and_fractions():
    assert resolve_k(10, 100) == 10
    assert resolve_k(0.25, 100) == 25
    assert resolve_k(500, 100) == 100
    with pytest.raises(ValueError):
        resolve_k(0.0, 100)
    with pytest.raises(ValueError):
        resolve_k(1.5, 100)
    with pytest.raises(TypeError):
        resolve_k("7", 100)


@pytest.mark.parametrize("k", [1, 7, 40, 120])
def test_topk_coo_keeps_exactly_the_k_largest(k):
    torch.manual_seed(0)
    dense = torch.randn(10, 12)
    coo = topk_coo(dense, k)
    assert coo.is_sparse and coo.is_coalesced() and coo._nnz() == k
    kept = coo.to_dense()
    # kept entries are the original values
    idx = coo.indices()
    assert torch.equal(dense[idx[0], idx[1]], coo.values())
    # every kept magnitude >= every dropped magnitude
    mask = torch.zeros_like(dense, dtype=torch.bool)
    mask[idx[0], idx[1]] = True
    if k < dense.numel():
        assert dense.abs()[mask].min() >= dense.abs()[~mask].max()
    assert torch.equal(kept[mask], dense[mask])


def test_topk_coo_ties_break_by_lowest_index():
    dense = torch.tensor([[1.0, -3.0, 3.0, 2.0], [3.0, 0.5, -3.0, 3.0]])
    coo = topk_coo(dense, 3)  # five entries of magnitude 3: the three lowest flat indices win
    assert coo.indices().tolist() == [[0, 0, 1], [1, 2, 0]]
    assert coo.values().tolist() == [-3.0, 3.0, 3.0]
    # deterministic across calls and across a permuted-equal input
    assert torch.equal(topk_coo(dense, 3).indices(), coo.indices())
    zeros = torch.zeros(3, 3)
    assert topk_coo(zeros, 4).indices().tolist() == [[0, 0, 0, 1], [0, 1, 2, 0]]


def test_topk_rows_per_row_budget():
    torch.manual_seed(1)
    mat = torch.randn(5, 9)
    out = topk_rows(mat, 3)
    assert (out.ne(0).sum(1) == 3).all()
    for row, full in zip(out, mat):
        kept = row.ne(0)
        assert full.abs()[kept].min() >= full.abs()[~kept].max()


def test_nonzero_rows_and_scatter_roundtrip():
    mat = torch.randn(6, 4)
    assert nonzero_rows(mat) is None
    mat[[1, 4]] = 0
    rows = nonzero_rows(mat)
    assert rows.tolist() == [0, 2, 3, 5]
    assert torch.equal(scatter_rows(mat.index_select(0, rows), rows, 6), mat)


def test_multiply_add_counts():
    t, d_in, d_out = 2048, 768, 3072
    assert macs_dense(t, d_in, d_out) == 3 * t * d_in * d_out
    regular = macs_regular(t, d_in, d_out)
    assert regular == 3 * t * d_in * d_out + 2 * t * (d_in**2 + d_out**2)
    # the cached-weight formulation is the cheaper exact one at BERT-base sizes
    assert macs_auto(t, d_in, d_out, n_backward_rows=t // 2) < macs_regular(t, d_in, d_out, t // 2) < regular


def _reference_topk_indices(dense: torch.Tensor, k: int) -> torch.Tensor:
    """Largest magnitudes first, lowest flat index first among equals (a stable sort)."""
    order = torch.sort(-dense.reshape(-1).abs(), stable=True).indices
    return order[:k].sort().values


@pytest.mark.parametrize("case", ["gaussian", "ties", "large_values_off_sample"])
@pytest.mark.parametrize("k", [700, 5000])
def test_topk_coo_large_matrices_all_paths(case, k):
    # >= 2^16 entries: the prefiltered path; "large_values_off_sample" defeats the strided sample
    # estimate (the biggest entries avoid every 16th position), forcing the fallback.
    gen = torch.Generator().manual_seed(3)
    dense = torch.randn(300, 320, generator=gen)
    if case == "ties":
        dense = torch.round(dense * 2) / 2
    if case == "large_values_off_sample":
        flat = dense.view(-1)
        flat.mul_(0.01)
        off = torch.arange(flat.numel()) % 16 != 0
        flat[off.nonzero().squeeze(1)[: 2 * k]] = 10.0 + torch.rand(2 * k, generator=gen)
    coo = topk_coo(dense, k)
    flat_idx = coo.indices()[0] * dense.shape[1] + coo.indices()[1]
    assert torch.equal(flat_idx, _reference_topk_indices(dense, k))


def test_topk_coo_overwrite_gives_the_same_entries():
    gen = torch.Generator().manual_seed(3)
    dense = torch.randn(50, 40, generator=gen, dtype=torch.float64)
    dense[0, :5] = dense[0, 5]  # ties at some magnitudes
    ref = topk_coo(dense, 77)
    scratch = dense.clone()
    ours = topk_coo(scratch, 77, overwrite=True)
    assert torch.equal(ours.indices(), ref.indices()) and torch.equal(ours.values(), ref.values())
    assert torch.equal(scratch, dense.abs())  # the documented side effect
