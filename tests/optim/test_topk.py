"""Exact row-wise top-k with group-maximum pre-selection."""

import pytest
import torch

from hf_dp_microadam.optim.topk import leading_positions, padded_topk_indices, topk_indices


def assert_valid_topk(values: torch.Tensor, indices: torch.Tensor, k: int) -> None:
    """Indices must be k distinct columns whose values are a multiset of the row's k largest."""
    assert indices.shape == (values.shape[0], k)
    assert indices.dtype == torch.int64
    for row in range(values.shape[0]):
        assert indices[row].unique().numel() == k, f"row {row}: repeated column"
    chosen = values.gather(1, indices).sort(dim=1, descending=True).values
    expected = torch.topk(values, k, dim=1).values
    assert torch.equal(chosen, expected)


@pytest.mark.parametrize(
    ("rows", "length", "k"),
    [(3, 32768, 328), (5, 4096, 41), (2, 32768, 33), (4, 2048, 1), (3, 1000, 10), (2, 1536, 300), (1, 1024, 1024)],
)
def test_topk_matches_torch(rows, length, k):
    values = torch.randn(rows, length, generator=torch.Generator().manual_seed(length + k)).abs()
    assert_valid_topk(values, topk_indices(values, k), k)


def test_topk_with_many_ties():
    # Few distinct values: the k-th largest is shared by many entries.
    values = torch.randint(0, 4, (4, 8192), generator=torch.Generator().manual_seed(0)).float()
    assert_valid_topk(values, topk_indices(values, 82), 82)


def test_topk_sparse_rows():
    # Fewer nonzeros than k: the rest of the choice is among zeros.
    values = torch.zeros(2, 16384)
    values[0, 100:110] = torch.arange(1.0, 11.0)
    values[1, -3:] = 5.0
    indices = topk_indices(values, 164)
    assert_valid_topk(values, indices, 164)
    assert set(range(100, 110)) <= set(indices[0].tolist())
    assert {16381, 16382, 16383} <= set(indices[1].tolist())


def test_topk_large_values_clustered():
    # The largest entries all sit in one contiguous stretch of the row.
    values = torch.rand(1, 32768, generator=torch.Generator().manual_seed(2))
    values[0, 5000:5400] += 10.0
    indices = topk_indices(values, 328)
    assert_valid_topk(values, indices, 328)
    assert bool(((indices >= 5000) & (indices < 5400)).all())


def test_topk_rejects_bad_k():
    with pytest.raises(ValueError, match="k must be in"):
        topk_indices(torch.rand(2, 10), 11)
    with pytest.raises(ValueError, match="k must be in"):
        topk_indices(torch.rand(2, 10), 0)


def test_padded_topk_per_row_counts():
    generator = torch.Generator().manual_seed(3)
    lengths, counts = [5, 8, 1, 7], [2, 8, 1, 3]
    width = 8
    keys = torch.full((len(lengths), width), -1, dtype=torch.int32)
    for row, length in enumerate(lengths):
        keys[row, :length] = torch.randperm(1000, generator=generator)[:length].int()
    leading = leading_positions(counts, max(counts), torch.device("cpu"))
    assert leading.tolist() == [0, 1, 8, 9, 10, 11, 12, 13, 14, 15, 16, 24, 25, 26]

    indices = padded_topk_indices(keys, max(counts), leading)
    assert indices.shape == (sum(counts),)
    for row, (chosen, count) in enumerate(zip(indices.split(counts), counts)):
        assert bool((chosen < lengths[row]).all()), f"row {row}: padding chosen"
        expected = torch.topk(keys[row], count).values
        assert torch.equal(keys[row, chosen], expected), f"row {row}"


def test_padded_topk_rejects_bad_count():
    with pytest.raises(ValueError, match="k must be in"):
        padded_topk_indices(torch.zeros(2, 4, dtype=torch.int32), 5, torch.arange(2))
