"""The 4-bit per-bucket quantizer of the error feedback."""

import pytest
import torch

from hf_dp_microadam.optim.quantization import (
    ConcatenatedLayout,
    bucket_count,
    code_bytes,
    dequantize,
    dequantize_concatenated,
    quantize,
    quantize_concatenated,
)


def bfloat16_spacing(values: torch.Tensor) -> torch.Tensor:
    """Distance from each float to the next bfloat16 number away from zero (8 significant bits)."""
    _, exponent = torch.frexp(values.double())
    return torch.ldexp(torch.ones_like(values, dtype=torch.float64), exponent - 8)


@pytest.mark.parametrize("numel", [1, 2, 3, 63, 64, 65, 1000, 1001])
@pytest.mark.parametrize("bucket_size", [1, 7, 64])
def test_round_trip_error_bound(numel, bucket_size):
    generator = torch.Generator().manual_seed(numel * 100 + bucket_size)
    x = torch.randn(numel, generator=generator) * torch.rand(numel, generator=generator).mul(10)
    codes, bounds = quantize(x, bucket_size)
    assert codes.dtype == torch.uint8
    assert codes.numel() == code_bytes(numel)
    assert bounds.dtype == torch.bfloat16
    assert tuple(bounds.shape) == (2, bucket_count(numel, bucket_size))

    restored = dequantize(codes, bounds, bucket_size, numel)
    bucket_of = torch.arange(numel) // bucket_size
    exact_min = torch.zeros(bounds.shape[1], dtype=torch.float64).scatter_reduce(
        0, bucket_of, x.double(), "amin", include_self=False
    )
    exact_max = torch.zeros(bounds.shape[1], dtype=torch.float64).scatter_reduce(
        0, bucket_of, x.double(), "amax", include_self=False
    )
    # (max - min) / 30 plus the bf16 rounding of the stored min and max.
    allowed = (exact_max - exact_min) / 30 + bfloat16_spacing(exact_min) + bfloat16_spacing(exact_max)
    error = (restored.double() - x.double()).abs()
    assert bool((error <= allowed[bucket_of] + 1e-12).all()), f"max excess {float((error - allowed[bucket_of]).max())}"


def test_stored_bounds_enclose_bucket():
    x = torch.randn(4096, generator=torch.Generator().manual_seed(0)) * 3
    _, bounds = quantize(x, 64)
    buckets = x.view(-1, 64)
    assert bool((bounds[0].float() <= buckets.amin(1)).all())
    assert bool((bounds[1].float() >= buckets.amax(1)).all())
    # Within one bfloat16 step of the exact extremes.
    assert bool((buckets.amin(1) - bounds[0].float() <= bfloat16_spacing(buckets.amin(1)).float()).all())
    assert bool((bounds[1].float() - buckets.amax(1) <= bfloat16_spacing(buckets.amax(1)).float()).all())


@pytest.mark.parametrize("value", [0.0, -2.5, 3.0, 3 * 2.0**-13])
def test_constant_bucket_exact(value):
    """A constant bucket whose value is a bfloat16 number decodes exactly."""
    x = torch.full((130,), value)
    x[64:] = torch.linspace(-1, 1, 66)
    codes, bounds = quantize(x, 64)
    restored = dequantize(codes, bounds, 64, 130)
    assert torch.equal(restored[:64], x[:64])


def test_zero_tensor_exact():
    x = torch.zeros(77)
    codes, bounds = quantize(x, 8)
    assert torch.equal(dequantize(codes, bounds, 8, 77), x)
    assert not bool(codes.any())


def test_code_layout_pairs_entries_32_apart():
    # Buckets of 15 and 16 entries whose min 0 and max 15 make step 1, so the codes are the
    # values themselves. The first span of 64 pairs entry j with j + 32; the last span
    # of 7 entries pairs entry j with j + 4.
    values = torch.arange(71) % 16
    values[[0, 64]] = 0
    values[[15, 65]] = 15
    codes, bounds = quantize(values.float(), 16)
    assert bounds.float()[:, 0].tolist() == [0.0, 15.0]
    assert codes.numel() == 36
    for j in range(32):
        assert int(codes[j]) == int(values[j]) | (int(values[j + 32]) << 4), j
    for j in range(4):
        high = int(values[68 + j]) if j < 3 else 0
        assert int(codes[32 + j]) == int(values[64 + j]) | (high << 4), j


def test_ties_round_half_to_even():
    # Step 1 with min 0: 2.5 and 3.5 lie halfway between codes.
    x = torch.tensor([0.0, 2.5, 3.5, 15.0])
    codes, bounds = quantize(x, 4)
    restored = dequantize(codes, bounds, 4, 4)
    assert restored.tolist() == [0.0, 2.0, 4.0, 15.0]


def test_bfloat16_input_and_work_buffer():
    x = torch.randn(200, generator=torch.Generator().manual_seed(1)).bfloat16()
    expected_codes, expected_bounds = quantize(x.float(), 16)
    work = x.float()
    codes, bounds = quantize(work, 16, work=work)
    assert torch.equal(codes, expected_codes)
    assert torch.equal(bounds, expected_bounds)
    codes, bounds = quantize(x, 16)
    assert torch.equal(codes, expected_codes)
    assert torch.equal(bounds, expected_bounds)


def test_dequantize_rejects_wrong_sizes():
    codes, bounds = quantize(torch.randn(10), 4)
    with pytest.raises(ValueError, match="code bytes"):
        dequantize(codes, bounds, 4, 12)
    with pytest.raises(ValueError, match="bounds of shape"):
        dequantize(codes, bounds, 2, 10)


def test_quantize_rejects_bad_input():
    with pytest.raises(ValueError, match="1-D"):
        quantize(torch.randn(2, 3), 4)
    with pytest.raises(ValueError, match="bucket_size"):
        quantize(torch.randn(4), 0)


CONCATENATED_CASES = {
    # Odd sizes: partial packing spans and buckets in the middle of the concatenation.
    "odd_sizes_bucket_7": ((5, 1, 2, 3, 63, 64, 65, 129, 1000, 1001), 7),
    "odd_sizes_bucket_64": ((5, 1, 2, 3, 63, 64, 65, 129, 1000, 1001), 64),
    # Multiples of 64 but not of the bucket: aligned spans, partial buckets.
    "partial_buckets_4096": ((768, 3072, 768, 64), 4096),
    # Multiples of lcm(bucket, 64) but the last: the concatenation is already laid out.
    "aligned_bucket_64": ((768, 3072, 64, 130), 64),
    "aligned_bucket_4096": ((8192, 4096, 100), 4096),
    "bucket_1": ((3, 64, 5), 1),
}


@pytest.mark.parametrize("case", list(CONCATENATED_CASES))
def test_concatenated_equals_per_part(case):
    sizes, bucket_size = CONCATENATED_CASES[case]
    generator = torch.Generator().manual_seed(len(sizes) * 1000 + bucket_size)
    parts = [torch.randn(size, generator=generator) * torch.rand(size, generator=generator).mul(10) for size in sizes]
    parts[2].fill_(0.75)  # a constant part
    expected = [quantize(part.clone(), bucket_size) for part in parts]
    layout = ConcatenatedLayout(sizes, bucket_size, torch.device("cpu"))
    assert layout.aligned == case.startswith("aligned")
    assert layout.code_sizes == [code_bytes(size) for size in sizes]
    assert layout.bucket_counts == [bucket_count(size, bucket_size) for size in sizes]

    codes = torch.empty(sum(layout.code_sizes), dtype=torch.uint8)
    bounds = torch.empty(2, layout.buckets, dtype=torch.bfloat16)
    quantize_concatenated(torch.cat(parts), layout, codes=codes, bounds=bounds)
    assert torch.equal(codes, torch.cat([part_codes for part_codes, _ in expected]))
    expected_bounds = torch.cat([part_bounds for _, part_bounds in expected], dim=1)
    assert torch.equal(bounds.view(torch.int16), expected_bounds.view(torch.int16))

    restored = dequantize_concatenated(codes, bounds, layout, out=torch.empty(layout.numel))
    for part, (part_codes, part_bounds), piece in zip(parts, expected, restored.split(list(sizes))):
        assert torch.equal(piece, dequantize(part_codes, part_bounds, bucket_size, part.numel()))


def test_concatenated_odd_part_keeps_high_nibble_zero():
    # A part of 5 entries packs 3 bytes, and the third byte has no high entry.
    sizes = (5, 64)
    parts = [torch.tensor([0.0, 1.0, 2.0, 3.0, 15.0]), torch.full((64,), 7.0)]
    layout = ConcatenatedLayout(sizes, 64, torch.device("cpu"))
    codes = torch.empty(sum(layout.code_sizes), dtype=torch.uint8)
    bounds = torch.empty(2, layout.buckets, dtype=torch.bfloat16)
    quantize_concatenated(torch.cat(parts), layout, codes=codes, bounds=bounds)
    assert int(codes[2]) >> 4 == 0
    assert torch.equal(codes[:3], quantize(parts[0], 64)[0])
