"""MicroAdam's update of many small tensors at once, with a fixed number of PyTorch calls.

A tensor of d <= block_size entries is a single top-k block. Models have hundreds of
them (biases, norm weights), and updating each on its own costs a few hundred PyTorch
calls per tensor. Here the tensors of a batch are concatenated, and index maps built
once per set of sizes keep every tensor its own block, quantization buckets and packing
spans. The result is the same as updating each tensor on its own, up to the order
within a window slot and the choice among tied entries (see `update_small_tensors`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from hf_dp_microadam.optim._microadam_update import (
    StepScalars,
    Workspace,
    apply_update,
    decayed_window_values,
    stage,
    window_update,
)
from hf_dp_microadam.optim.quantization import ConcatenatedLayout, dequantize_concatenated, quantize_concatenated
from hf_dp_microadam.optim.topk import leading_positions, padded_topk_indices

_PLAN_CACHE_LIMIT = 16
"""Batch plans kept per workspace. A new set of tensor sizes beyond this clears the cache."""


def width_class(numel: int) -> int:
    """Return the padded row length of a tensor in the batched top-k: the next power of two."""
    return 1 << max(numel - 1, 0).bit_length()


class BatchPlan:
    """Index maps for one batch of small tensors, in batch order.

    The batch lists its tensors by increasing `width_class`, so the tensors of one width
    form consecutive rows of one padded top-k matrix.
    """

    def __init__(
        self, sizes: tuple[int, ...], keeps: tuple[int, ...], quant_bucket: int | None, device: torch.device
    ) -> None:
        self.sizes = sizes
        self.keeps = keeps
        self.numel = sum(sizes)
        offsets = torch.tensor(sizes, dtype=torch.int64).cumsum(0).sub_(torch.tensor(sizes, dtype=torch.int64))
        keeps_tensor = torch.tensor(keeps, dtype=torch.int64)
        self.column_offsets = offsets.repeat_interleave(keeps_tensor).to(device)
        """Entry offset in the concatenation of the tensor of every window column (int64, K entries)."""

        # Rows of one width class: padded positions point into the concatenated keys, and
        # padding points past the end, where the batch puts a key below all others.
        self.topk_rows: list[tuple[int, int, Tensor, Tensor]] = []
        first = 0
        while first < len(sizes):
            width = width_class(sizes[first])
            last = first
            while last < len(sizes) and width_class(sizes[last]) == width:
                last += 1
            columns = torch.arange(width, dtype=torch.int64)
            row_sizes = torch.tensor(sizes[first:last], dtype=torch.int64)
            padded = offsets[first:last, None] + columns[None, :]
            padded = torch.where(columns[None, :] < row_sizes[:, None], padded, self.numel)
            max_keep = max(keeps[first:last])
            leading = leading_positions(list(keeps[first:last]), max_keep, device)
            self.topk_rows.append((width, max_keep, padded.view(-1).to(device), leading))
            first = last

        self.quantization = ConcatenatedLayout(sizes, quant_bucket, device) if quant_bucket is not None else None

    def nbytes(self) -> int:
        """Return the bytes held by the index maps."""
        tensors = [self.column_offsets]
        tensors += [tensor for _, _, padded, leading in self.topk_rows for tensor in (padded, leading)]
        if self.quantization is not None and not self.quantization.aligned:
            layout = self.quantization
            tensors += [layout.entry_bucket, layout.entry_byte, layout.entry_shift, layout.byte_low, layout.byte_high]
        return sum(tensor.numel() * tensor.element_size() for tensor in tensors)


def batch_plan(workspace: Workspace, sizes: tuple[int, ...], keeps: tuple[int, ...], group: dict) -> BatchPlan:
    """Return the cached plan of a batch, building it on first use."""
    quant_bucket = group["quant_bucket"] if group["error_feedback"] == "4bit" else None
    key = (sizes, keeps, quant_bucket)
    plan = workspace.batch_plans.get(key)
    if plan is None:
        if len(workspace.batch_plans) >= _PLAN_CACHE_LIMIT:
            workspace.batch_plans.clear()
        plan = workspace.batch_plans[key] = BatchPlan(sizes, keeps, quant_bucket, workspace.device)
    return plan


def update_small_tensors(params: list[Tensor], states: list[dict], group: dict, workspace: Workspace) -> None:
    """Run steps 1-5 of the update on tensors that are each a single block.

    The tensors must share device, dtype, gradient dtype and step count, and come in
    increasing `width_class` of their sizes. The result equals that of updating each
    tensor on its own, bit for bit, with two exceptions. A window slot lists a tensor's
    kept indices in descending order of |a| here, so the order within a slot can differ.
    And where |a| ties at the k-th largest value of a tensor, another tied entry may be
    kept, as the update rule allows.
    """
    sizes = tuple(param.numel() for param in params)
    keeps = tuple(state["window_indices"].shape[1] for state in states)
    plan = batch_plan(workspace, sizes, keeps, group)
    for state in states:
        state["step"] += 1
    scalars = StepScalars.build(states[0]["step"], group, workspace)
    layout = plan.quantization

    with stage("microadam::add_error"):
        # 1. a = g + dequantize(E), all tensors concatenated.
        if layout is not None:
            accumulator = workspace.accumulator(plan.numel)
            codes = torch.cat([state["error_codes"] for state in states])
            bounds = torch.cat([state["error_bounds"] for state in states], dim=1)
            dequantize_concatenated(codes, bounds, layout, out=accumulator)
        else:
            accumulator = torch.cat([state["error"] for state in states])
        accumulator.add_(torch.cat([param.grad.reshape(-1) for param in params]))

    with stage("microadam::topk"):
        # 2. Top-k of |a| per tensor, each tensor one row of a padded matrix of its width.
        keys = torch.empty(plan.numel + 1, dtype=torch.int32, device=accumulator.device)
        torch.abs(accumulator, out=keys[:-1].view(torch.float32))
        keys[-1] = -1
        indices = [
            padded_topk_indices(keys.index_select(0, padded).view(-1, width), max_keep, leading)
            for width, max_keep, padded, leading in plan.topk_rows
        ]
        indices = torch.cat(indices) if len(indices) > 1 else indices[0]
        positions = indices + plan.column_offsets
        torch._foreach_copy_(
            [state["window_indices"][scalars.slot] for state in states], indices.to(torch.int16).split(keeps)
        )
        torch._foreach_copy_(
            [state["window_values"][scalars.slot] for state in states],
            accumulator.index_select(0, positions).to(torch.bfloat16).split(keeps),
        )

    with stage("microadam::quantize_error"):
        # 3. The rest of a is the new error of each tensor.
        accumulator.index_fill_(0, positions, 0.0)
        if layout is not None:
            quantize_concatenated(accumulator, layout, codes=codes, bounds=bounds)
            torch._foreach_copy_([state["error_codes"] for state in states], codes.split(layout.code_sizes))
            torch._foreach_copy_(
                [state["error_bounds"] for state in states], bounds.split(layout.bucket_counts, dim=1)
            )
        else:
            torch._foreach_copy_([state["error"] for state in states], accumulator.split(sizes))

    with stage("microadam::window_moments"):
        # 4. u at every window entry of every tensor.
        window_indices = torch.cat([state["window_indices"] for state in states], dim=1)[: scalars.filled]
        window_positions = window_indices.to(torch.int64).add_(plan.column_offsets).view(-1)
        values = torch.cat([state["window_values"] for state in states], dim=1)[: scalars.filled]
        contributions = torch.complex(*decayed_window_values(values, scalars)).view(-1)
        update = window_update(window_positions, contributions, scalars, workspace.moments(plan.numel))

    with stage("microadam::param_update"):
        # 5. Update the concatenated parameters, then copy every tensor back.
        param_values = torch.cat([param.reshape(-1) for param in params])
        apply_update(param_values, window_positions, update, scalars)
        pieces = param_values.split(sizes)
        torch._foreach_copy_(params, [piece.view(param.shape) for piece, param in zip(pieces, params)])
