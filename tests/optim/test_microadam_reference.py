"""MicroAdam step by step against a float64 reference written from the update rule.

Before every step the reference decodes the optimizer's stored state with its own code:
the window of int16 block-relative indices and bfloat16 values, and the 4-bit codes with
bfloat16 bucket bounds or the fp32 error. It then runs the update rule in float64 and
checks each part of the state after the step, and the parameter. Checking one step at a time keeps the
float32-versus-float64 rounding of one step from growing into different top-k choices
in later steps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

import pytest
import torch

import hf_dp_microadam.optim.microadam as microadam_module
from hf_dp_microadam.optim import MicroAdam

STEPS = 32
# float32 rounding of a = g + E and of the bucket arithmetic, relative to the entry scale.
FLOAT32_SLACK = 2.0**-20


@dataclass(frozen=True)
class Case:
    shape: tuple[int, ...]
    block_size: int | None
    quant_bucket: int
    density: float
    window: int
    chunk_target: int | None  # CPU chunk length target, to run several chunks per tensor


CASES = {
    # 165 entries: five blocks of 32 and a tail of 5, buckets of 10 (last of 5), three chunks.
    "blocks_and_tail": Case((5, 33), 32, 10, 0.1, 4, 100),
    # One block of 7 entries, one partial bucket, an odd number of 4-bit codes, window 1.
    "single_short_block": Case((7,), 50, 10, 0.1, 1, None),
    # 276 entries: blocks of 64 plus a tail of 20, buckets of 6, chunks of 192.
    "three_dims": Case((3, 4, 23), 64, 6, 0.05, 3, 100),
    # 39000 entries with the default block (32768 + 6232) and buckets (64, last of 24).
    "default_layout": Case((300, 130), None, 64, 0.01, 10, None),
}


def reference_blocks(numel: int, block_size: int | None, density: float) -> list[tuple[int, int, int]]:
    """Return (start, stop, k) per block, k = ceil(density * block length) in exact decimal arithmetic."""
    size = min(block_size or 32768, numel)
    exact_density = Fraction(str(density))
    return [
        (start, min(start + size, numel), math.ceil(exact_density * (min(start + size, numel) - start)))
        for start in range(0, numel, size)
    ]


def bfloat16_round(values: torch.Tensor, direction: str) -> torch.Tensor:
    """Round float64 values down or up to bfloat16 numbers (8 significant bits)."""
    _, exponent = torch.frexp(values)
    spacing = torch.ldexp(torch.ones_like(values), exponent - 8)
    scaled = values / spacing
    return (scaled.floor() if direction == "down" else scaled.ceil()) * spacing


def decode_codes(codes: torch.Tensor, numel: int) -> torch.Tensor:
    """Unpack 4-bit codes, paired in spans of 64 entries: byte j has entry j (low) and j + 32 (high).

    A last span of r < 64 entries pairs entry j with entry j + ceil(r / 2).
    """
    codes = codes.to(torch.int64)
    low, high = (codes & 15).double(), (codes >> 4).double()
    levels = torch.empty(numel, dtype=torch.float64)
    full_spans = numel // 64
    spans = levels[: full_spans * 64].view(full_spans, 2, 32)
    spans[:, 0] = low[: full_spans * 32].view(full_spans, 32)
    spans[:, 1] = high[: full_spans * 32].view(full_spans, 32)
    rest = numel - full_spans * 64
    half = (rest + 1) // 2
    levels[full_spans * 64 : full_spans * 64 + half] = low[full_spans * 32 :]
    levels[full_spans * 64 + half :] = high[full_spans * 32 :][: rest - half]
    return levels


def bucket_steps(bounds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Return float64 (min, step) per bucket from bounds laid out as [2, buckets]."""
    lower = bounds[0].double()
    return lower, (bounds[1].double() - lower) / 15


def decode_error(state: dict, numel: int, bucket: int) -> torch.Tensor:
    if "error" in state:
        return state["error"].double().clone()
    lower, step = bucket_steps(state["error_bounds"])
    per_entry = torch.arange(numel) // bucket
    return decode_codes(state["error_codes"], numel) * step[per_entry] + lower[per_entry]


def decode_window(state: dict, blocks, filled: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Return (global indices, float64 values) of each filled slot."""
    slots = []
    for slot in range(filled):
        indices, values = [], []
        offset = 0
        for start, stop, k in blocks:
            relative = state["window_indices"][slot, offset : offset + k].to(torch.int64)
            assert bool(((relative >= 0) & (relative < stop - start)).all()), "block-relative index out of range"
            indices.append(relative + start)
            values.append(state["window_values"][slot, offset : offset + k].double())
            offset += k
        assert offset == state["window_indices"].shape[1]
        slots.append((torch.cat(indices), torch.cat(values)))
    return slots


def reference_update(slots, numel: int, newest: int, window: int, step: int, betas, eps) -> torch.Tensor:
    """u = c1 M / (sqrt(c2 S) + eps) with M and S summed slot by slot."""
    beta1, beta2 = betas
    first = torch.zeros(numel, dtype=torch.float64)
    second = torch.zeros(numel, dtype=torch.float64)
    for slot, (indices, values) in enumerate(slots):
        age = (newest - slot) % window
        first.index_add_(0, indices, beta1**age * values)
        second.index_add_(0, indices, beta2**age * values**2)
    c1 = (1 - beta1) / (1 - beta1**step)
    c2 = (1 - beta2) / (1 - beta2**step)
    return c1 * first / ((c2 * second).sqrt() + eps)


def check_selection(magnitudes: torch.Tensor, selected: torch.Tensor, start: int, stop: int, k: int) -> None:
    """Selected entries must be k distinct entries of the block with the largest |a|, ties either way."""
    assert selected.numel() == k
    assert selected.unique().numel() == k, "an index is kept twice in one block"
    block = magnitudes[start:stop]
    is_selected = torch.zeros(stop - start, dtype=torch.bool)
    is_selected[selected - start] = True
    if k == stop - start:
        return
    tolerance = FLOAT32_SLACK * float(block.max())
    smallest_kept = float(block[is_selected].min())
    largest_dropped = float(block[~is_selected].max())
    assert smallest_kept >= largest_dropped - tolerance, (
        f"block [{start}, {stop}): kept |a| = {smallest_kept} while dropping |a| = {largest_dropped}"
    )


def check_four_bit_error(state: dict, remainder: torch.Tensor, bucket: int) -> None:
    numel = remainder.numel()
    bounds = state["error_bounds"].double()
    per_entry = torch.arange(numel) // bucket
    buckets = int(per_entry[-1]) + 1

    def per_bucket(values: torch.Tensor, reduction: str) -> torch.Tensor:
        empty = torch.zeros(buckets, dtype=torch.float64)
        return empty.scatter_reduce(0, per_entry, values, reduction, include_self=False)

    exact_min = per_bucket(remainder, "amin")
    exact_max = per_bucket(remainder, "amax")
    slack = FLOAT32_SLACK * per_bucket(remainder.abs(), "amax")
    # Directed rounding is monotonic, so a float32 extreme within `slack` of the exact one
    # rounds to a bfloat16 number between these two.
    low_range = bfloat16_round(exact_min - slack, "down"), bfloat16_round(exact_min + slack, "down")
    high_range = bfloat16_round(exact_max - slack, "up"), bfloat16_round(exact_max + slack, "up")
    bad_low = (bounds[0] < low_range[0]) | (bounds[0] > low_range[1])
    bad_high = (bounds[1] < high_range[0]) | (bounds[1] > high_range[1])
    assert not bool(bad_low.any()), (
        f"buckets {bad_low.nonzero().flatten()[:5].tolist()}: stored min is not the bfloat16 at or below the minimum"
    )
    assert not bool(bad_high.any()), (
        f"buckets {bad_high.nonzero().flatten()[:5].tolist()}: stored max is not the bfloat16 at or above the maximum"
    )

    lower, step = bucket_steps(state["error_bounds"])
    safe_step = torch.where(step > 0, step, torch.ones_like(step))[per_entry]
    position = (remainder - lower[per_entry]) / safe_step
    expected = torch.round(position).clamp(0, 15)
    stored = decode_codes(state["error_codes"], numel)
    near_half = ((position - position.floor()) - 0.5).abs() < 1e-3
    mismatch = (stored != expected) & ~near_half
    assert not bool(mismatch.any()), (
        f"4-bit codes differ at {mismatch.nonzero().flatten()[:5].tolist()}: "
        f"stored {stored[mismatch][:5].tolist()}, expected {expected[mismatch][:5].tolist()}"
    )


def make_gradient(shape, dtype, step: int, generator: torch.Generator) -> torch.Tensor:
    scale = 1.0 + (step % 3)
    gradient = torch.randn(shape, generator=generator, dtype=torch.float64) * scale
    return gradient.to(dtype)


@pytest.mark.parametrize("error_feedback", ["4bit", "fp32"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case_name", list(CASES))
def test_microadam_matches_reference(case_name, dtype, error_feedback, monkeypatch):
    case = CASES[case_name]
    if case.chunk_target is not None:
        monkeypatch.setattr(microadam_module, "_CPU_CHUNK_TARGET", case.chunk_target)
    lr, betas, eps, weight_decay = 1e-2, (0.9, 0.99), 1e-8, 0.1
    generator = torch.Generator().manual_seed(1234)
    param = torch.nn.Parameter(torch.randn(case.shape, generator=generator).to(dtype))
    optimizer = MicroAdam(
        [param],
        lr=lr,
        betas=betas,
        eps=eps,
        weight_decay=weight_decay,
        density=case.density,
        window=case.window,
        quant_bucket=case.quant_bucket,
        block_size=case.block_size,
        error_feedback=error_feedback,
    )
    numel = param.numel()
    blocks = reference_blocks(numel, case.block_size, case.density)

    for step in range(1, STEPS + 1):
        state = optimizer.state[param]
        if state:
            assert state["step"] == step - 1
            error = decode_error(state, numel, case.quant_bucket)
            old_window = state["window_indices"].clone(), state["window_values"].clone()
        else:
            error = torch.zeros(numel, dtype=torch.float64)
            old_window = None
        old_param = param.detach().double().reshape(-1).clone()

        param.grad = make_gradient(case.shape, dtype, step, generator)
        accumulator = param.grad.double().reshape(-1) + error
        optimizer.step()
        state = optimizer.state[param]
        newest = (step - 1) % case.window
        filled = min(step, case.window)

        # Older slots are untouched, the newest holds a top-k of |a| per block.
        if old_window is not None:
            others = [slot for slot in range(case.window) if slot != newest]
            assert torch.equal(state["window_indices"][others], old_window[0][others])
            assert torch.equal(state["window_values"][others], old_window[1][others])
        slots = decode_window(state, blocks, filled)
        new_indices, new_values = slots[newest]
        magnitudes = accumulator.abs()
        offset = 0
        for start, stop, k in blocks:
            check_selection(magnitudes, new_indices[offset : offset + k], start, stop, k)
            offset += k
        expected_values = accumulator[new_indices]
        torch.testing.assert_close(new_values, expected_values, rtol=2.0**-8, atol=1e-30)

        # The error is a with the kept entries set to zero, stored exactly or in 4 bits.
        remainder = accumulator.clone()
        remainder[new_indices] = 0.0
        if error_feedback == "fp32":
            stored = state["error"].double()
            torch.testing.assert_close(stored, remainder, rtol=1e-6, atol=FLOAT32_SLACK * float(remainder.abs().max()))
        else:
            check_four_bit_error(state, remainder, case.quant_bucket)

        # theta <- theta * (1 - lr * wd) - lr * u, u from the decoded window.
        update = reference_update(slots, numel, newest, case.window, step, betas, eps)
        expected_param = old_param * (1 - lr * weight_decay) - lr * update
        new_param = param.detach().double().reshape(-1)
        if dtype == torch.float32:
            torch.testing.assert_close(new_param, expected_param, rtol=1e-6, atol=1e-7)
        else:
            torch.testing.assert_close(new_param, expected_param, rtol=2.0**-8, atol=1e-30)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_coordinates_outside_window_unchanged(dtype):
    generator = torch.Generator().manual_seed(7)
    param = torch.nn.Parameter(torch.randn(40, 50, generator=generator).to(dtype))
    optimizer = MicroAdam([param], lr=0.1, density=0.02, window=3, block_size=400, quant_bucket=32)
    for step in range(1, 8):
        before = param.detach().clone().reshape(-1)
        param.grad = torch.randn(param.shape, generator=generator).to(dtype)
        optimizer.step()
        state = optimizer.state[param]
        blocks = reference_blocks(param.numel(), 400, 0.02)
        in_window = torch.zeros(param.numel(), dtype=torch.bool)
        for indices, _ in decode_window(state, blocks, min(step, 3)):
            in_window[indices] = True
        after = param.detach().reshape(-1)
        assert torch.equal(after[~in_window], before[~in_window])
        assert bool((after[in_window] != before[in_window]).any())


def test_weight_decay_applies_outside_window():
    generator = torch.Generator().manual_seed(8)
    param = torch.nn.Parameter(torch.randn(2000, generator=generator))
    optimizer = MicroAdam([param], lr=0.1, weight_decay=0.5, density=0.01, window=2)
    before = param.detach().clone()
    param.grad = torch.randn(2000, generator=generator)
    optimizer.step()
    blocks = reference_blocks(2000, None, 0.01)
    in_window = torch.zeros(2000, dtype=torch.bool)
    in_window[decode_window(optimizer.state[param], blocks, 1)[0][0]] = True
    assert torch.equal(param.detach()[~in_window], before[~in_window] * (1 - 0.1 * 0.5))


@pytest.mark.parametrize("error_feedback", ["4bit", "fp32"])
@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
def test_full_density_equals_adamw(error_feedback, weight_decay):
    """Density 1 and a window longer than the run make MicroAdam AdamW on bf16 gradients."""
    steps, lr, betas, eps = 35, 1e-2, (0.9, 0.999), 1e-8
    generator = torch.Generator().manual_seed(3)
    start = torch.randn(6, 37, generator=generator)
    micro_param = torch.nn.Parameter(start.clone())
    adam_param = torch.nn.Parameter(start.clone())
    micro = MicroAdam(
        [micro_param], lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, density=1.0,
        window=steps, block_size=64, error_feedback=error_feedback,
    )
    adam = torch.optim.AdamW([adam_param], lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    for step in range(steps):
        # Gradients that bfloat16 represents exactly, so the window loses nothing.
        gradient = (torch.randn(start.shape, generator=generator) * (1 + step % 4)).bfloat16().float()
        micro_before = micro_param.detach().clone()
        adam_before = adam_param.detach().clone()
        micro_param.grad = gradient.clone()
        adam_param.grad = gradient.clone()
        micro.step()
        adam.step()
        micro_update = micro_param.detach() - micro_before
        adam_update = adam_param.detach() - adam_before
        torch.testing.assert_close(micro_update, adam_update, rtol=1e-4, atol=1e-7, msg=lambda m: f"step {step + 1}: {m}")
        torch.testing.assert_close(micro_param.detach(), adam_param.detach(), rtol=1e-6, atol=1e-6)


def test_full_density_close_to_adam_on_raw_gradients():
    """Without bf16-exact gradients the match is as close as bf16 window values allow."""
    steps, lr, (beta1, beta2) = 20, 1e-3, (0.9, 0.999)
    generator = torch.Generator().manual_seed(4)
    start = torch.randn(500, generator=generator, dtype=torch.float64).float()
    micro_param = torch.nn.Parameter(start.clone())
    adam_param = torch.nn.Parameter(start.clone())
    micro = MicroAdam([micro_param], lr=lr, density=1.0, window=steps, error_feedback="fp32")
    adam = torch.optim.Adam([adam_param], lr=lr)
    absolute_average = torch.zeros(500, dtype=torch.float64)
    square_average = torch.zeros(500, dtype=torch.float64)
    for step in range(1, steps + 1):
        gradient = torch.randn(start.shape, generator=generator)
        absolute_average = beta1 * absolute_average + (1 - beta1) * gradient.double().abs()
        square_average = beta2 * square_average + (1 - beta2) * gradient.double() ** 2
        micro_before = micro_param.detach().clone()
        adam_before = adam_param.detach().clone()
        micro_param.grad = gradient.clone()
        adam_param.grad = gradient.clone()
        micro.step()
        adam.step()
        micro_update = (micro_param.detach() - micro_before).double()
        adam_update = (adam_param.detach() - adam_before).double()
        # Every window value is within 2^-9 relative of its gradient entry, which moves
        # m_hat by at most 2^-9 of the average |g| and sqrt(v_hat) by 2^-9 relative.
        denominator = (square_average / (1 - beta2**step)).sqrt()
        first_order = (absolute_average / (1 - beta1**step)) / denominator + adam_update.abs() / lr
        tolerance = lr * 2.0**-8 * first_order + 1e-7
        excess = (micro_update - adam_update).abs() - tolerance
        assert float(excess.max()) <= 0.0, f"step {step}: update off by {float(excess.max())} beyond the bf16 bound"
