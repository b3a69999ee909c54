"""4-bit asymmetric uniform quantization per bucket, for MicroAdam's error feedback.

A 1-D tensor of n entries is cut into contiguous buckets of `bucket_size` entries (the
last bucket may be shorter). Each bucket stores its minimum and maximum as bfloat16 and
each entry a 4-bit code:

    step = (max - min) / 15
    code = round((x - min) / step)      (half to even, always in [0, 15])
    x'   = code * step + min

The stored minimum is rounded down to bfloat16 and the maximum up, so every entry of a
bucket lies inside [min, max] and the round-trip error is at most step / 2. A constant
bucket whose value is a bfloat16 number (zero in particular) has step 0 and comes back
exactly. The arithmetic runs in float32.

Layout:

- ``bounds``: bfloat16 ``[2, buckets]``, row 0 the minima and row 1 the maxima.
- ``codes``: uint8 ``[ceil(n / 2)]``, two codes per byte, in spans of 64 entries:
  byte j of a span contains entry j in its low nibble and entry j + 32 in its high nibble.
  A last span of r < 64 entries pairs entry j with entry j + ceil(r / 2), and for odd r
  its last high nibble is zero. Pairing entries 32 apart lets packing and unpacking run
  on contiguous runs of 32 entries, which is several times faster on CPU than pairing
  neighbours.

Storage for n entries: ceil(n / 2) bytes of codes plus 4 bytes per bucket.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

CODE_LEVELS = 15
"""Largest 4-bit code. The step of a bucket is its range divided by this number."""

PACK_SPAN = 64
"""Entries per packing span. Byte j of a span contains entries j and j + PACK_SPAN / 2."""

_HALF_SPAN = PACK_SPAN // 2

# Adding 2^23 to an integer-valued float32 in [0, 256) puts the integer in the low byte
# of the float's bit pattern, so the int32 view cast to uint8 is the integer. This is
# faster on CPU than converting float32 to uint8.
_MANTISSA_OFFSET = 2.0**23


def bucket_count(numel: int, bucket_size: int) -> int:
    """Return the number of buckets that cover `numel` entries."""
    return -(-numel // bucket_size)


def code_bytes(numel: int) -> int:
    """Return the number of bytes that hold the 4-bit codes of `numel` entries."""
    return -(-numel // 2)


def quantize(
    x: Tensor,
    bucket_size: int,
    *,
    codes: Tensor | None = None,
    bounds: Tensor | None = None,
    work: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Quantize a 1-D floating tensor to 4-bit codes and per-bucket bounds.

    Args:
        x: 1-D tensor of any floating dtype.
        bucket_size: entries per bucket (>= 1).
        codes: optional uint8 output of `code_bytes(x.numel())` entries.
        bounds: optional bfloat16 output of shape `[2, bucket_count(x.numel(), bucket_size)]`.
        work: optional float32 scratch of `x.numel()` entries. It may be `x` itself, and
            then `x` is overwritten.

    Returns:
        `(codes, bounds)`, the given outputs when they were passed.
    """
    if x.dim() != 1:
        raise ValueError(f"quantize expects a 1-D tensor, got shape {tuple(x.shape)}")
    if bucket_size < 1:
        raise ValueError(f"bucket_size must be >= 1, got {bucket_size}")
    numel = x.numel()
    num_buckets = bucket_count(numel, bucket_size)
    if codes is None:
        codes = torch.empty(code_bytes(numel), dtype=torch.uint8, device=x.device)
    if bounds is None:
        bounds = torch.empty(2, num_buckets, dtype=torch.bfloat16, device=x.device)
    if work is None:
        work = torch.empty(numel, dtype=torch.float32, device=x.device)
    if numel == 0:
        return codes, bounds

    work.copy_(x)
    full_buckets = numel // bucket_size
    full = full_buckets * bucket_size
    extremes = torch.empty(2, num_buckets, dtype=torch.float32, device=x.device)
    if full:
        work_full = work[:full].view(full_buckets, bucket_size)
        torch.amin(work_full, dim=1, out=extremes[0, :full_buckets])
        torch.amax(work_full, dim=1, out=extremes[1, :full_buckets])
    if full < numel:
        torch.aminmax(work[full:], out=(extremes[0, -1], extremes[1, -1]))
    _round_outward_to_bfloat16(extremes, out=bounds)

    stored = bounds.float()
    lower = stored[0]
    step = stored[1].sub_(lower).div_(CODE_LEVELS)
    # A bucket with step 0 is constant: x - min is 0 there, and any divisor gives code 0.
    step.masked_fill_(step == 0, 1.0)

    _apply_per_bucket(work, lower, step, bucket_size, encode=True)
    # No clamp to [0, 15] is needed: the stored min is at or below every entry and the
    # stored max at or above, so (x - min) / step exceeds [0, 15] only by float32
    # rounding, which round() absorbs.
    work.round_()
    _pack_codes(work, codes)
    return codes, bounds


def dequantize(
    codes: Tensor,
    bounds: Tensor,
    bucket_size: int,
    numel: int,
    *,
    out: Tensor | None = None,
) -> Tensor:
    """Decode `numel` entries from 4-bit codes and per-bucket bounds into float32.

    Args:
        codes: uint8 tensor of `code_bytes(numel)` packed codes.
        bounds: bfloat16 tensor of shape `[2, bucket_count(numel, bucket_size)]`.
        bucket_size: entries per bucket, as passed to `quantize`.
        numel: number of entries to decode.
        out: optional float32 output of `numel` entries.
    """
    if codes.numel() != code_bytes(numel):
        raise ValueError(f"{numel} entries need {code_bytes(numel)} code bytes, got {codes.numel()}")
    num_buckets = bucket_count(numel, bucket_size)
    if tuple(bounds.shape) != (2, num_buckets):
        raise ValueError(
            f"{numel} entries in buckets of {bucket_size} need bounds of shape (2, {num_buckets}), "
            f"got {tuple(bounds.shape)}"
        )
    if out is None:
        out = torch.empty(numel, dtype=torch.float32, device=codes.device)
    if numel == 0:
        return out

    _unpack_codes(codes, out)
    stored = bounds.float()
    lower = stored[0]
    step = stored[1].sub_(lower).div_(CODE_LEVELS)
    _apply_per_bucket(out, lower, step, bucket_size, encode=False)
    return out


def _round_outward_to_bfloat16(extremes: Tensor, out: Tensor) -> None:
    """Round row 0 (minima) down and row 1 (maxima) up to bfloat16, into `out`."""
    nearest = extremes.to(torch.bfloat16)
    sign, outward = _outward_constants(extremes.device)
    # (nearest - exact) * sign > 0 where rounding to nearest went inward.
    went_inward = nearest.float().sub_(extremes).mul_(sign) > 0
    torch.where(went_inward, torch.nextafter(nearest, outward), nearest, out=out)


@functools.lru_cache(maxsize=None)
def _outward_constants(device: torch.device) -> tuple[Tensor, Tensor]:
    """Return (sign, direction) columns for rows of minima and maxima, kept per device."""
    sign = torch.tensor([[1.0], [-1.0]], device=device)
    direction = torch.tensor([[-torch.inf], [torch.inf]], dtype=torch.bfloat16, device=device)
    return sign, direction


def _apply_per_bucket(values: Tensor, lower: Tensor, step: Tensor, bucket_size: int, *, encode: bool) -> None:
    """Map values in place with each bucket's bounds: (x - lower) / step to encode, x * step + lower to decode."""
    numel = values.numel()
    full_buckets = numel // bucket_size
    full = full_buckets * bucket_size
    segments = []
    if full:
        segments.append((values[:full].view(full_buckets, bucket_size), lower[:full_buckets, None], step[:full_buckets, None]))
    if full < numel:
        segments.append((values[full:], lower[-1:], step[-1:]))
    for segment, segment_lower, segment_step in segments:
        if encode:
            segment.sub_(segment_lower).div_(segment_step)
        else:
            segment.mul_(segment_step).add_(segment_lower)


def _span_split(numel: int) -> tuple[int, int]:
    """Return (entries in full spans, low half of the last partial span)."""
    full = numel // PACK_SPAN * PACK_SPAN
    return full, (numel - full + 1) // 2


def _unpack_codes(codes: Tensor, out: Tensor) -> None:
    """Write the 4-bit codes as floats into `out`."""
    numel = out.numel()
    full, tail_low = _span_split(numel)
    if full:
        spans = full // PACK_SPAN
        out_spans = out[:full].view(spans, 2, _HALF_SPAN)
        code_spans = codes[: spans * _HALF_SPAN].view(spans, _HALF_SPAN)
        out_spans[:, 0].copy_(torch.bitwise_and(code_spans, 0x0F))
        out_spans[:, 1].copy_(torch.bitwise_right_shift(code_spans, 4))
    if full < numel:
        tail_codes = codes[full // 2 :]
        out[full : full + tail_low].copy_(torch.bitwise_and(tail_codes, 0x0F))
        out[full + tail_low :].copy_(torch.bitwise_right_shift(tail_codes, 4)[: numel - full - tail_low])


def _pack_codes(levels: Tensor, codes: Tensor) -> None:
    """Pack float codes in [0, 15] two per byte into `codes`, overwriting `levels`."""
    numel = levels.numel()
    full, tail_low = _span_split(numel)
    if full:
        spans = full // PACK_SPAN
        level_spans = levels[:full].view(spans, 2, _HALF_SPAN)
        packed = level_spans[:, 0].add_(level_spans[:, 1], alpha=16).add_(_MANTISSA_OFFSET)
        codes[: spans * _HALF_SPAN].view(spans, _HALF_SPAN).copy_(packed.view(torch.int32))
    if full < numel:
        low = levels[full : full + tail_low]
        high = levels[full + tail_low :]
        low[: high.numel()].add_(high, alpha=16)
        codes[full // 2 :].copy_(low.add_(_MANTISSA_OFFSET).view(torch.int32))


class ConcatenatedLayout:
    """Index maps that quantize several 1-D tensors as one concatenated tensor.

    Each part keeps its own buckets and packing spans, exactly as `quantize` lays out a
    tensor of that size on its own. The concatenated codes are the parts' codes one
    after another, and the bounds are the parts' bounds side by side (minima in row 0,
    maxima in row 1). `quantize_concatenated` and `dequantize_concatenated` then handle
    all parts with a fixed number of PyTorch calls, and their results are the same as
    those of `quantize` and `dequantize` on every part.

    When every part but the last has a multiple of lcm(bucket_size, 64) entries, the
    concatenation already has this layout, so `quantize` and `dequantize` run on it
    directly and no index maps are built (`aligned` is True). Otherwise the maps take
    three int64 and one uint8 entry per element, and two int64 entries per code byte.
    """

    def __init__(self, sizes: tuple[int, ...], bucket_size: int, device: torch.device) -> None:
        if bucket_size < 1:
            raise ValueError(f"bucket_size must be >= 1, got {bucket_size}")
        self.sizes = sizes
        self.bucket_size = bucket_size
        self.numel = sum(sizes)
        self.code_sizes = [code_bytes(size) for size in sizes]
        self.bucket_counts = [bucket_count(size, bucket_size) for size in sizes]
        self.buckets = sum(self.bucket_counts)
        unit = math.lcm(bucket_size, PACK_SPAN)
        self.aligned = all(size % unit == 0 for size in sizes[:-1])
        if self.aligned:
            return

        entry_bucket, entry_byte, entry_shift, byte_low, byte_high = [], [], [], [], []
        entry_offset = byte_offset = bucket_offset = 0
        for size in sizes:
            local = torch.arange(size, dtype=torch.int64)
            entry_bucket.append(local // bucket_size + bucket_offset)
            byte, shift = _entry_bytes(size)
            entry_byte.append(byte + byte_offset)
            entry_shift.append(shift)
            low, high = _byte_entries(size)
            byte_low.append(low + entry_offset)
            # A byte without a high entry points past the end, where the packer puts level 0.
            byte_high.append(torch.where(high < 0, self.numel, high + entry_offset))
            entry_offset += size
            byte_offset += code_bytes(size)
            bucket_offset += bucket_count(size, bucket_size)

        self.entry_bucket = torch.cat(entry_bucket).to(device)
        self.entry_byte = torch.cat(entry_byte).to(device)
        self.entry_shift = torch.cat(entry_shift).to(device)
        self.byte_low = torch.cat(byte_low).to(device)
        self.byte_high = torch.cat(byte_high).to(device)


def dequantize_concatenated(codes: Tensor, bounds: Tensor, layout: ConcatenatedLayout, *, out: Tensor) -> Tensor:
    """Decode the concatenated parts of `layout` into the float32 tensor `out` of `layout.numel` entries."""
    if layout.aligned:
        return dequantize(codes, bounds, layout.bucket_size, layout.numel, out=out)
    levels = codes.index_select(0, layout.entry_byte)
    levels = torch.bitwise_right_shift(levels, layout.entry_shift).bitwise_and_(0x0F)
    out.copy_(levels)
    stored = bounds.float()
    lower = stored[0]
    step = stored[1].sub_(lower).div_(CODE_LEVELS)
    out.mul_(step.index_select(0, layout.entry_bucket)).add_(lower.index_select(0, layout.entry_bucket))
    return out


def quantize_concatenated(x: Tensor, layout: ConcatenatedLayout, *, codes: Tensor, bounds: Tensor) -> None:
    """Quantize the float32 tensor `x` part by part into `codes` and `bounds`, overwriting `x`.

    The codes and bounds are laid out as `ConcatenatedLayout` describes.
    """
    if layout.aligned:
        quantize(x, layout.bucket_size, codes=codes, bounds=bounds, work=x)
        return
    extremes = torch.empty(2, layout.buckets, dtype=torch.float32, device=x.device)
    extremes[0].scatter_reduce_(0, layout.entry_bucket, x, "amin", include_self=False)
    extremes[1].scatter_reduce_(0, layout.entry_bucket, x, "amax", include_self=False)
    _round_outward_to_bfloat16(extremes, out=bounds)

    stored = bounds.float()
    lower = stored[0]
    step = stored[1].sub_(lower).div_(CODE_LEVELS)
    step.masked_fill_(step == 0, 1.0)
    x.sub_(lower.index_select(0, layout.entry_bucket)).div_(step.index_select(0, layout.entry_bucket))
    x.round_()

    levels = torch.cat([x, x.new_zeros(1)])
    packed = levels.index_select(0, layout.byte_low)
    packed.add_(levels.index_select(0, layout.byte_high), alpha=16).add_(_MANTISSA_OFFSET)
    codes.copy_(packed.view(torch.int32))


def _entry_bytes(numel: int) -> tuple[Tensor, Tensor]:
    """Return the code byte and the bit shift (0 or 4) of every entry of a tensor of `numel` entries."""
    entries = torch.arange(numel, dtype=torch.int64)
    full, tail_low = _span_split(numel)
    in_span = entries % PACK_SPAN
    high = in_span >= _HALF_SPAN
    byte = entries // PACK_SPAN * _HALF_SPAN + in_span - high * _HALF_SPAN
    tail = entries >= full
    tail_high = entries >= full + tail_low
    tail_byte = full // 2 + entries - full - tail_high * tail_low
    byte = torch.where(tail, tail_byte, byte)
    high = torch.where(tail, tail_high, high)
    return byte, high.to(torch.uint8) * 4


def _byte_entries(numel: int) -> tuple[Tensor, Tensor]:
    """Return the entries in the low and high nibble of every code byte; -1 where a byte has no high entry."""
    bytes_ = torch.arange(code_bytes(numel), dtype=torch.int64)
    full, tail_low = _span_split(numel)
    low = bytes_ // _HALF_SPAN * PACK_SPAN + bytes_ % _HALF_SPAN
    high = low + _HALF_SPAN
    tail = bytes_ >= full // 2
    tail_low_entry = full + bytes_ - full // 2
    tail_high_entry = tail_low_entry + tail_low
    low = torch.where(tail, tail_low_entry, low)
    high = torch.where(tail, tail_high_entry, high)
    high = torch.where(high < numel, high, -1)
    return low, high
