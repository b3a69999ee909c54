"""MicroAdam's update rule on a run of whole blocks of one tensor, and the pieces it shares.

`update_chunk` runs steps 1-5 of `MicroAdam` on entries [start, stop) of one flattened
parameter. `window_update` (step 4) and `apply_update` (step 5) also serve the batched
path for small tensors in `hf_dp_microadam.optim._microadam_batched`.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import Tensor

from hf_dp_microadam.optim.quantization import bucket_count, dequantize, quantize
from hf_dp_microadam.optim.topk import topk_indices

_DECAY_CACHE_LIMIT = 1024
"""Cached decay-power columns per workspace before the cache is cleared. Each has at most `window` floats."""


class Workspace:
    """Scratch memory and caches of one optimizer on one device.

    This is transient memory, not optimizer state: it is not saved by `state_dict()`,
    its size does not grow with the number of parameters, and it is shared by all
    parameter tensors on the device. It contains:

    - a float32 buffer for the accumulator a and a complex64 buffer for the moments (M
      in the real parts, S in the imaginary parts, and before that the top-k keys |a|),
      each of the largest run of entries updated at once: a chunk of a large tensor or a
      batch of small tensors. That is 12 bytes per entry of that run, 6 MB at the CPU
      chunk length of 2^19 entries;
    - the block start of every window column per chunk shape, the decay powers per
      window slot and step, and the index maps of each batch of small tensors (see
      `hf_dp_microadam.optim._microadam_batched`).
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._accumulator = torch.empty(0, dtype=torch.float32, device=device)
        self._moments = torch.empty(0, dtype=torch.complex64, device=device)
        self._block_starts: dict[tuple[int, int, int, int], Tensor] = {}
        self._decay_powers: dict[tuple, tuple[Tensor, Tensor]] = {}
        self.batch_plans: dict[tuple, object] = {}

    def accumulator(self, numel: int) -> Tensor:
        """Return a float32 buffer of `numel` entries."""
        if self._accumulator.numel() < numel:
            self._accumulator = torch.empty(numel, dtype=torch.float32, device=self.device)
        return self._accumulator[:numel]

    def keys(self, numel: int) -> Tensor:
        """Return a float32 buffer of `numel` entries for the top-k keys |a|.

        It shares memory with `moments`: the keys are dead once the moments are needed.
        """
        return torch.view_as_real(self._moment_buffer(numel)).view(-1)[:numel]

    def moments(self, numel: int) -> Tensor:
        """Return a complex64 buffer of `numel` entries, set to zero."""
        return self._moment_buffer(numel).zero_()

    def _moment_buffer(self, numel: int) -> Tensor:
        if self._moments.numel() < numel:
            self._moments = torch.empty(numel, dtype=torch.complex64, device=self.device)
        return self._moments[:numel]

    def nbytes(self) -> int:
        """Return the bytes held by the buffers and cached tensors."""
        tensors = [self._accumulator, self._moments, *self._block_starts.values()]
        tensors += [power for powers in self._decay_powers.values() for power in powers]
        total = sum(tensor.numel() * tensor.element_size() for tensor in tensors)
        return total + sum(plan.nbytes() for plan in self.batch_plans.values())

    def decay_powers(self, slot: int, filled: int, window: int, beta1: float, beta2: float) -> tuple[Tensor, Tensor]:
        """Return float32 columns beta1^age and beta2^age of the filled window slots.

        Slot r has age (slot - r) mod window, and only slots 0 .. filled - 1 have been
        written. The powers are computed on the workspace's device, so no copy waits, and
        are shared by the parameters that are at the same step.
        """
        key = (slot, filled, window, beta1, beta2)
        powers = self._decay_powers.get(key)
        if powers is None:
            if len(self._decay_powers) >= _DECAY_CACHE_LIMIT:
                self._decay_powers.clear()
            ages = torch.arange(filled, device=self.device).neg_().add_(slot).remainder_(window).double()
            powers = tuple(torch.pow(beta, ages).float().unsqueeze_(1) for beta in (beta1, beta2))
            self._decay_powers[key] = powers
        return powers

    def block_starts(self, layout, full_blocks: int, has_tail: bool) -> Tensor:
        """Return the chunk-relative start of the block of every window entry of a chunk.

        The window entries of a chunk are `full_k` per full block, then `tail_k` for the
        tail block when the chunk ends with it.
        """
        tail_k = layout.tail_k if has_tail else 0
        key = (layout.block_size, layout.full_k, full_blocks, tail_k)
        starts = self._block_starts.get(key)
        if starts is None:
            block_ids = torch.arange(full_blocks + (1 if tail_k else 0), dtype=torch.int64, device=self.device)
            counts = torch.full_like(block_ids, layout.full_k)
            if tail_k:
                counts[-1] = tail_k
            starts = block_ids.mul_(layout.block_size).repeat_interleave(counts)
            self._block_starts[key] = starts
        return starts


@dataclass(frozen=True)
class StepScalars:
    """Constants of one step of one parameter: window slot, decay weights and coefficients."""

    slot: int
    filled: int
    beta1_powers: Tensor
    beta2_powers: Tensor
    c1: float
    c2: float
    eps: float
    lr: float
    decay: float

    @classmethod
    def build(cls, step: int, group: dict, workspace: Workspace) -> StepScalars:
        """Return the constants of step `step` (counted from 1) under the group's settings."""
        beta1, beta2 = group["betas"]
        window = group["window"]
        slot = (step - 1) % window
        filled = min(step, window)
        beta1_powers, beta2_powers = workspace.decay_powers(slot, filled, window, beta1, beta2)
        return cls(
            slot=slot,
            filled=filled,
            beta1_powers=beta1_powers,
            beta2_powers=beta2_powers,
            c1=(1 - beta1) / (1 - beta1**step),
            c2=(1 - beta2) / (1 - beta2**step),
            eps=group["eps"],
            lr=group["lr"],
            decay=1 - group["lr"] * group["weight_decay"],
        )


def update_chunk(
    flat_param: Tensor,
    grad: Tensor,
    state: dict,
    layout,
    group: dict,
    scalars: StepScalars,
    start: int,
    stop: int,
    workspace: Workspace,
) -> None:
    """Run steps 1-5 of the update on entries [start, stop), a run of whole blocks.

    `layout` is the parameter's `hf_dp_microadam.optim.microadam.BlockLayout`.
    """
    length = stop - start
    four_bit = group["error_feedback"] == "4bit"
    bucket = group["quant_bucket"]

    with stage("microadam::add_error"):
        # 1. a = g + dequantize(E). In fp32 mode the state buffer itself becomes a.
        if four_bit:
            accumulator = workspace.accumulator(length)
            codes = state["error_codes"][start // 2 : (stop + 1) // 2]
            bounds = state["error_bounds"][:, start // bucket : bucket_count(stop, bucket)]
            dequantize(codes, bounds, bucket, length, out=accumulator)
        else:
            accumulator = state["error"][start:stop]
        accumulator.add_(grad[start:stop])

    with stage("microadam::topk"):
        # 2. Block-wise top-k of |a| into the newest window slot.
        first_block = start // layout.block_size
        full_blocks = min(layout.full_blocks - first_block, length // layout.block_size)
        has_tail = stop == layout.numel and layout.tail_size > 0
        # The bit patterns of non-negative floats, read as int32, are ordered like the
        # floats (NaN above inf, as in torch.topk). Top-k on int32 took 1.3 ns per entry
        # against 1.9 on float32, whose comparisons handle NaN (torch 2.13, AMD EPYC).
        keys = torch.abs(accumulator, out=workspace.keys(length)).view(torch.int32)
        full_length = full_blocks * layout.block_size
        block_indices = []
        if full_blocks > 0:
            full = keys[:full_length].view(full_blocks, layout.block_size)
            block_indices.append(topk_indices(full, layout.full_k).view(-1))
        if has_tail:
            tail = keys[full_length:].view(1, -1)
            block_indices.append(topk_indices(tail, layout.tail_k).view(-1))
        indices = torch.cat(block_indices) if len(block_indices) > 1 else block_indices[0]
        block_starts = workspace.block_starts(layout, full_blocks, has_tail)
        positions = indices + block_starts

        k_start = first_block * layout.full_k
        k_stop = k_start + indices.numel()
        state["window_indices"][scalars.slot, k_start:k_stop].copy_(indices)
        state["window_values"][scalars.slot, k_start:k_stop].copy_(accumulator.index_select(0, positions))

    with stage("microadam::quantize_error"):
        # 3. The rest of a is the new error.
        accumulator.index_fill_(0, positions, 0.0)
        if four_bit:
            quantize(accumulator, bucket, codes=codes, bounds=bounds, work=accumulator)

    with stage("microadam::window_moments"):
        # 4. u at every window entry of the chunk.
        window_positions, contributions = _block_major_window(
            state, layout, scalars, k_start, k_stop, full_blocks, has_tail
        )
        update = window_update(window_positions, contributions, scalars, workspace.moments(length))

    with stage("microadam::param_update"):
        apply_update(flat_param[start:stop], window_positions, update, scalars)


def decayed_window_values(values: Tensor, scalars: StepScalars) -> tuple[Tensor, Tensor]:
    """Return beta1^age V and beta2^age V^2 of the filled window slots, float32 ``[filled, K]``.

    `values` are the bfloat16 window values ``[filled, K]``, slot r in row r.
    """
    values = values.float()
    first = values * scalars.beta1_powers
    second = values.square_().mul_(scalars.beta2_powers)
    return first, second


def _block_major_window(
    state: dict, layout, scalars: StepScalars, k_start: int, k_stop: int, full_blocks: int, has_tail: bool
) -> tuple[Tensor, Tensor]:
    """Return the chunk-relative positions and complex contributions of the chunk's window entries.

    The window stores slot after slot. Here the entries come block after block, and
    within a block slot after slot. The scatter and gathers of a block then stay within
    the block's entries, a few hundred KB that fit in a CPU's L2 cache, instead of
    sweeping the chunk once per slot. The entries of one coordinate keep their slot order.
    """
    filled = scalars.filled
    indices = state["window_indices"][:filled, k_start:k_stop]
    first, second = decayed_window_values(state["window_values"][:filled, k_start:k_stop], scalars)
    count = filled * (k_stop - k_start)
    positions = torch.empty(count, dtype=torch.int64, device=indices.device)
    contributions = torch.empty(count, dtype=torch.complex64, device=indices.device)

    full_columns = full_blocks * layout.full_k
    full_count = filled * full_columns
    if full_blocks > 0:
        slot_major = (filled, full_blocks, layout.full_k)
        block_major = (full_blocks, filled, layout.full_k)
        target = positions[:full_count].view(block_major)
        target.copy_(indices[:, :full_columns].view(slot_major).permute(1, 0, 2))
        block_offsets = torch.arange(full_blocks, dtype=torch.int64, device=indices.device).mul_(layout.block_size)
        target.add_(block_offsets.view(-1, 1, 1))
        torch.complex(
            first[:, :full_columns].view(slot_major).permute(1, 0, 2),
            second[:, :full_columns].view(slot_major).permute(1, 0, 2),
            out=contributions[:full_count].view(block_major),
        )
    if has_tail:
        tail_shape = (filled, layout.tail_k)
        positions[full_count:].view(tail_shape).copy_(indices[:, full_columns:]).add_(full_blocks * layout.block_size)
        tail_contributions = contributions[full_count:].view(tail_shape)
        torch.complex(first[:, full_columns:], second[:, full_columns:], out=tail_contributions)
    return positions, contributions


def window_update(positions: Tensor, contributions: Tensor, scalars: StepScalars, moments: Tensor) -> Tensor:
    """Return u = c1 M / (sqrt(c2 S) + eps) at every window entry (step 4).

    `positions` (int64) and `contributions` (complex64, beta1^age V + i beta2^age V^2)
    list the filled window entries, the entries of one coordinate in slot order.
    `moments` is an all-zero complex64 buffer that covers the positions. M gathers into
    its real parts and S into its imaginary parts, so one scatter and one gather serve
    both, and complex addition adds the two parts as separate float32 sums. Entries that
    share a coordinate get the same u.
    """
    # scatter_add_ adds the entries of one coordinate in the order of `positions` on
    # CPU. NOTE: on CUDA the order is not fixed, so M and S can differ in the last bits
    # between runs unless torch.use_deterministic_algorithms(True) is set. No CUDA run
    # has checked the complex64 buffer yet (tests/optim test_cuda_matches_cpu does).
    moments.scatter_add_(0, positions, contributions)
    gathered = torch.view_as_real(moments.index_select(0, positions))
    denominator = gathered[:, 1].mul(scalars.c2).sqrt_().add_(scalars.eps)
    return gathered[:, 0].mul(scalars.c1).div_(denominator)


def apply_update(param_values: Tensor, positions: Tensor, update: Tensor, scalars: StepScalars) -> None:
    """Apply theta <- theta * (1 - lr * wd) - lr * u to the 1-D `param_values` in place (step 5).

    Coordinates outside `positions` only decay. Repeated positions carry equal values,
    so the write order does not matter.
    """
    compute_dtype = torch.float64 if param_values.dtype == torch.float64 else torch.float32
    # The gather below reads about one entry in ten, but touches most cache lines of a
    # chunk. A dense pass first streams the chunk into the cache, which on CPU took a
    # third of the time of gathering from memory line by line (AMD EPYC, torch 2.13).
    # The decay multiply is such a pass. Where theta is stored in the compute dtype,
    # multiplying before gathering gives the same values as gathering before multiplying.
    decay_first = scalars.decay != 1.0 and param_values.dtype == compute_dtype
    if decay_first:
        param_values.mul_(scalars.decay)
    elif param_values.device.type == "cpu":
        param_values.sum()
    new_values = param_values.index_select(0, positions).to(compute_dtype)
    if scalars.decay != 1.0 and not decay_first:
        new_values.mul_(scalars.decay)
        param_values.mul_(scalars.decay)
    new_values.add_(update, alpha=-scalars.lr)
    param_values.scatter_(0, positions, new_values.to(param_values.dtype))


_NO_STAGE = contextlib.nullcontext()


def stage(name: str):
    """Return a torch.profiler label for a stage while a profiler runs, else a no-op context.

    A `record_function` costs microseconds even without a profiler, so it is only
    entered while one records.
    """
    # NOTE: `_is_profiler_enabled` is a private flag of torch.autograd.profiler
    # (torch 2.x). Without it, the labels are always entered.
    if getattr(torch.autograd.profiler, "_is_profiler_enabled", True):
        return torch.profiler.record_function(name)
    return _NO_STAGE
