"""MicroAdam: Adam moments rebuilt from a short window of sparse gradients.

Modoranu et al., "MicroAdam: Accurate Adaptive Optimization with Low Space Overhead and
Provable Convergence", NeurIPS 2024, arXiv 2405.15593.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from numbers import Real

import torch
from torch import Tensor
from torch.optim import Optimizer

from hf_dp_microadam.optim.quantization import PACK_SPAN, bucket_count, code_bytes, dequantize, quantize
from hf_dp_microadam.optim.topk import topk_indices

MAX_BLOCK_SIZE = 32768
"""Largest block: block-relative indices 0 .. 32767 fit in int16."""

DEFAULT_BLOCK_SIZE = MAX_BLOCK_SIZE
"""Block size when `block_size=None`. The largest block gives the smallest round-up of k."""

ERROR_FEEDBACK_MODES = ("4bit", "fp32")

# Entries processed together. On CPU every stage of a chunk then runs on data that is
# still in the caches, and the scratch memory stays at 3 float32 buffers of a chunk
# (12 MB). Of 2^18, 2^20 and 2^22 entries, 2^20 gave the lowest CPU time per step on
# five 4096 x 1024 tensors (one thread, 2-core AMD EPYC with 32 MB of L3 cache, torch
# 2.13). Chunks hold whole blocks, buckets and packing spans, so the result does not
# depend on this number.
_CPU_CHUNK_TARGET = 1 << 20
_ACCELERATOR_CHUNK_TARGET = 1 << 24


def keep_count(density: float, block_entries: int) -> int:
    """Return k = ceil(density * block_entries), the entries kept per block.

    A relative tolerance of 1e-9 absorbs float rounding, so that density 0.07 on 100
    entries keeps 7 entries and not 8.
    """
    return max(1, math.ceil(density * block_entries * (1 - 1e-9)))


@dataclass(frozen=True)
class BlockLayout:
    """Split of a flattened tensor into top-k blocks.

    Blocks are contiguous: `full_blocks` blocks of `block_size` entries, then one tail
    block of `tail_size` entries when the size is not a multiple of the block size. The
    window stores the kept entries block after block: `full_k` per full block, then
    `tail_k` for the tail block.
    """

    numel: int
    block_size: int
    full_blocks: int
    full_k: int
    tail_size: int
    tail_k: int

    @classmethod
    def build(cls, numel: int, block_size: int | None, density: float) -> BlockLayout:
        size = min(block_size or DEFAULT_BLOCK_SIZE, numel)
        full_blocks, tail_size = divmod(numel, size)
        return cls(
            numel=numel,
            block_size=size,
            full_blocks=full_blocks,
            full_k=keep_count(density, size),
            tail_size=tail_size,
            tail_k=keep_count(density, tail_size) if tail_size else 0,
        )

    @property
    def total_k(self) -> int:
        """Window entries per slot."""
        return self.full_blocks * self.full_k + self.tail_k


class MicroAdam(Optimizer):
    r"""MicroAdam with block-wise top-k, 4-bit error feedback and a window of sparse gradients.

    Each parameter tensor is flattened to d entries and updated on its own. At step t
    (counted per parameter, from 1), with gradient g:

    1. a = g + dequantize(E), where E is the error feedback (zero at t = 1).
    2. Split a into contiguous blocks of `block_size` entries (the last may be shorter).
       Each block keeps its k_b = ceil(density * |block|) entries of largest \|a\|:
       their block-relative indices (int16) and values (bfloat16) go to slot
       (t - 1) mod `window` of a ring buffer. Ties at the k-th magnitude break either way.
    3. The kept entries are set to zero in a, and the rest becomes the new E: 4-bit codes,
       asymmetric and uniform per bucket of `quant_bucket` entries, with bfloat16 min and
       max per bucket (see `hf_dp_microadam.optim.quantization`). With
       `error_feedback="fp32"`, E is kept dense in float32 instead.
    4. Moments come from the window only, with age 0 for the newest slot and sums over
       the filled slots r:

       .. math::
           M = \sum_r \beta_1^{age(r)} scatter(I_r, V_r), \quad
           S = \sum_r \beta_2^{age(r)} scatter(I_r, V_r^2)

           u = c_1 M / (\sqrt{c_2 S} + \epsilon), \quad
           c_1 = \frac{1 - \beta_1}{1 - \beta_1^t}, \quad c_2 = \frac{1 - \beta_2}{1 - \beta_2^t}

       A coordinate absent from the window gets u = 0 exactly.
    5. theta <- theta * (1 - lr * weight_decay) - lr * u (decoupled weight decay).

    The window spans only `window` steps while the bias correction uses the full t, so for
    t much larger than `window` the step is larger than Adam's at the same learning rate.

    With density 1 and a window of at least the number of steps, the error stays zero and
    the update is AdamW's on gradients rounded to bfloat16.

    State per parameter of d entries, with K = sum of k_b (about density * d):

    - ``window_indices``: int16 ``[window, K]``, ``window_values``: bfloat16 ``[window, K]``;
    - ``error_codes``: uint8 ``[ceil(d / 2)]`` and ``error_bounds``: bfloat16
      ``[2, ceil(d / quant_bucket)]`` (minima, maxima) in 4-bit mode, laid out as described
      in `hf_dp_microadam.optim.quantization`, or ``error``: float32 ``[d]`` in fp32 mode;
    - ``step``: int.

    At the defaults that is 0.5 + 4 * window * density + 4 / quant_bucket = 0.9625 bytes
    per entry, plus the round-up of k_b on small blocks (Adam: 8 bytes).

    Arithmetic runs in float32 for float32, bfloat16 and float16 parameters. float64
    parameters are updated in float64 from a float32 u. On CPU each tensor is processed
    in chunks of whole blocks that fit in the CPU caches.

    Speed: on 20M float32 parameters, a step took 2.4 to 3 times as long as
    `torch.optim.AdamW(foreach=True)` (one thread of a 2-core AMD EPYC, torch 2.13).
    Top-k selection is the largest part. `benchmarks/optimizer_step.py` measures this.

    NOTE: every parameter tensor costs a few hundred PyTorch calls per step, about 0.3 ms
    on that CPU, so models with many small tensors (biases, norms) pay that per tensor.

    Args:
        params: parameters or parameter groups. Every group may set its own values of
            the arguments below.
        lr: learning rate (>= 0).
        betas: (beta1, beta2), each in [0, 1).
        eps: term added to the denominator (> 0, so that an empty coordinate gets 0 and
            not 0 / 0).
        weight_decay: decoupled weight decay coefficient (>= 0), multiplied by lr.
        density: fraction of each block kept per step, in (0, 1].
        window: number of sparse gradients kept (>= 1).
        quant_bucket: entries per quantization bucket of the error feedback (>= 1).
        block_size: entries per top-k block, in [1, 32768]. None means 32768.
        error_feedback: ``"4bit"`` or ``"fp32"``.
    """

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        density: float = 0.01,
        window: int = 10,
        quant_bucket: int = 64,
        block_size: int | None = None,
        error_feedback: str = "4bit",
    ) -> None:
        defaults = {
            "lr": lr,
            "betas": betas,
            "eps": eps,
            "weight_decay": weight_decay,
            "density": density,
            "window": window,
            "quant_bucket": quant_bucket,
            "block_size": block_size,
            "error_feedback": error_feedback,
        }
        _validate_settings(defaults)
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict) -> None:
        settings = {**self.defaults, **param_group}
        settings.pop("params", None)
        _validate_settings(settings)
        if isinstance(param_group.get("betas"), list):
            param_group = {**param_group, "betas": tuple(param_group["betas"])}
        super().add_param_group(param_group)

    @torch.no_grad()
    def step(self, closure=None):
        """Update every parameter that has a gradient, and return the closure's loss if given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        workspaces: dict[torch.device, _Workspace] = {}
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is None or param.numel() == 0:
                    continue
                _check_parameter(param)
                state = self.state[param]
                layout = BlockLayout.build(param.numel(), group["block_size"], group["density"])
                if not state:
                    _init_state(state, param, layout, group)
                else:
                    _check_state(state, param, layout, group)
                workspace = workspaces.get(param.device)
                if workspace is None:
                    workspace = workspaces[param.device] = _Workspace(param.device)
                _update_parameter(param, state, layout, group, workspace)
        return loss

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a state from `state_dict()`, keeping the dtypes of the state tensors.

        `torch.optim.Optimizer.load_state_dict` casts floating state to the parameter's
        dtype. The int16 indices, bfloat16 values and uint8 codes must keep their
        own dtypes, so the per-parameter state is copied here instead.
        """
        saved_state = state_dict["state"]
        super().load_state_dict({**state_dict, "state": {}})
        saved_ids = [index for group in state_dict["param_groups"] for index in group["params"]]
        params = [param for group in self.param_groups for param in group["params"]]
        for saved_id, param in zip(saved_ids, params, strict=True):
            if saved_id not in saved_state:
                continue
            self.state[param] = {
                key: value.to(device=param.device, copy=True) if isinstance(value, Tensor) else value
                for key, value in saved_state[saved_id].items()
            }


def _validate_settings(settings: dict) -> None:
    """Raise ValueError or TypeError naming the first invalid hyperparameter."""
    _require_real(settings, "lr", low=0.0)
    betas = settings["betas"]
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
    for position, beta in enumerate(betas):
        if isinstance(beta, bool) or not isinstance(beta, Real) or not 0.0 <= beta < 1.0:
            raise ValueError(f"betas[{position}] must be a number in [0, 1), got {beta!r}")
    _require_real(settings, "eps", low=0.0, low_inclusive=False)
    _require_real(settings, "weight_decay", low=0.0)
    _require_real(settings, "density", low=0.0, low_inclusive=False, high=1.0)
    _require_int(settings, "window", low=1)
    _require_int(settings, "quant_bucket", low=1)
    if settings["block_size"] is not None:
        _require_int(settings, "block_size", low=1, high=MAX_BLOCK_SIZE)
    if settings["error_feedback"] not in ERROR_FEEDBACK_MODES:
        raise ValueError(
            f"error_feedback must be one of {', '.join(map(repr, ERROR_FEEDBACK_MODES))}, "
            f"got {settings['error_feedback']!r}"
        )


def _require_real(settings, name, *, low, low_inclusive=True, high=None):
    value = settings[name]
    if isinstance(value, bool) or not isinstance(value, Real) or math.isnan(value):
        raise TypeError(f"{name} must be a real number, got {value!r}")
    if value < low or (value == low and not low_inclusive) or (high is not None and value > high):
        low_bracket = "[" if low_inclusive else "("
        high_text = f"{high}]" if high is not None else "inf)"
        raise ValueError(f"{name} must be in {low_bracket}{low}, {high_text}, got {value!r}")


def _require_int(settings, name, *, low, high=None):
    value = settings[name]
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value < low or (high is not None and value > high):
        high_text = f", {high}]" if high is not None else ", inf)"
        raise ValueError(f"{name} must be in [{low}{high_text}, got {value!r}")


def _check_parameter(param: Tensor) -> None:
    if param.grad.is_sparse:
        raise RuntimeError("MicroAdam does not support sparse gradients. Use dense ones, e.g. nn.Embedding(sparse=False).")
    if not param.is_floating_point():
        raise TypeError(f"MicroAdam updates floating-point parameters only, got dtype {param.dtype}")
    if param.grad.shape != param.shape:
        raise ValueError(f"gradient shape {tuple(param.grad.shape)} does not match parameter shape {tuple(param.shape)}")


def _init_state(state: dict, param: Tensor, layout: BlockLayout, group: dict) -> None:
    device = param.device
    state["step"] = 0
    state["window_indices"] = torch.zeros(group["window"], layout.total_k, dtype=torch.int16, device=device)
    state["window_values"] = torch.zeros(group["window"], layout.total_k, dtype=torch.bfloat16, device=device)
    if group["error_feedback"] == "4bit":
        # All-zero codes and bounds decode to an all-zero error.
        state["error_codes"] = torch.zeros(code_bytes(layout.numel), dtype=torch.uint8, device=device)
        state["error_bounds"] = torch.zeros(
            2, bucket_count(layout.numel, group["quant_bucket"]), dtype=torch.bfloat16, device=device
        )
    else:
        state["error"] = torch.zeros(layout.numel, dtype=torch.float32, device=device)


def _expected_state_shapes(layout: BlockLayout, group: dict) -> dict[str, tuple[int, ...]]:
    shapes = {
        "window_indices": (group["window"], layout.total_k),
        "window_values": (group["window"], layout.total_k),
    }
    if group["error_feedback"] == "4bit":
        shapes["error_codes"] = (code_bytes(layout.numel),)
        shapes["error_bounds"] = (2, bucket_count(layout.numel, group["quant_bucket"]))
    else:
        shapes["error"] = (layout.numel,)
    return shapes


def _check_state(state: dict, param: Tensor, layout: BlockLayout, group: dict) -> None:
    """Raise ValueError when the state does not fit the group's current settings."""
    for key, shape in _expected_state_shapes(layout, group).items():
        value = state.get(key)
        if value is None or tuple(value.shape) != shape:
            found = "missing" if value is None else f"of shape {tuple(value.shape)}"
            raise ValueError(
                f"MicroAdam state {key!r} of a parameter of shape {tuple(param.shape)} is {found}, "
                f"but density={group['density']}, window={group['window']}, "
                f"quant_bucket={group['quant_bucket']}, block_size={group['block_size']}, "
                f"error_feedback={group['error_feedback']!r} need shape {shape}. "
                "These settings cannot change once a parameter has state."
            )


class _Workspace:
    """Scratch memory of one step on one device, shared by the parameters on that device.

    Contains three float32 buffers of one chunk, and caches the block-start offsets of
    each chunk shape and the window decay powers of each step count seen in the step.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.chunk_target = _CPU_CHUNK_TARGET if device.type == "cpu" else _ACCELERATOR_CHUNK_TARGET
        self._buffers: list[Tensor] = []
        self._block_starts: dict[tuple[int, int, int, int], Tensor] = {}
        self._decay_powers: dict[tuple, tuple[Tensor, Tensor]] = {}

    def buffers(self, numel: int) -> list[Tensor]:
        """Return three float32 buffers of at least `numel` entries."""
        if not self._buffers or self._buffers[0].numel() < numel:
            self._buffers = [torch.empty(numel, dtype=torch.float32, device=self.device) for _ in range(3)]
        return self._buffers

    def decay_powers(self, slot: int, filled: int, window: int, beta1: float, beta2: float) -> tuple[Tensor, Tensor]:
        """Return float32 columns beta1^age and beta2^age of the filled window slots.

        Slot r has age (slot - r) mod window, and only slots 0 .. filled - 1 have been
        written. The powers are computed on the workspace's device, so no copy waits, and
        are shared by the parameters that are at the same step.
        """
        key = (slot, filled, window, beta1, beta2)
        powers = self._decay_powers.get(key)
        if powers is None:
            ages = torch.arange(filled, device=self.device).neg_().add_(slot).remainder_(window).double()
            powers = tuple(torch.pow(beta, ages).float().unsqueeze_(1) for beta in (beta1, beta2))
            self._decay_powers[key] = powers
        return powers

    def block_starts(self, layout: BlockLayout, full_blocks: int, has_tail: bool) -> Tensor:
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


def _chunk_length(layout: BlockLayout, group: dict, target: int) -> int:
    """Return a chunk length made of whole blocks, whole buckets and whole packing spans."""
    unit = layout.block_size
    if group["error_feedback"] == "4bit":
        unit = math.lcm(unit, group["quant_bucket"], PACK_SPAN)
    return max(1, target // unit) * unit


def _update_parameter(param: Tensor, state: dict, layout: BlockLayout, group: dict, workspace: _Workspace) -> None:
    state["step"] += 1
    step = state["step"]
    beta1, beta2 = group["betas"]
    window = group["window"]
    slot = (step - 1) % window
    filled = min(step, window)
    beta1_powers, beta2_powers = workspace.decay_powers(slot, filled, window, beta1, beta2)
    scalars = _StepScalars(
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

    grad = param.grad.reshape(-1)
    if param.is_contiguous():
        flat_param = param.view(-1)
    else:
        flat_param = param.detach().reshape(-1).clone()

    chunk = _chunk_length(layout, group, workspace.chunk_target)
    for start in range(0, layout.numel, chunk):
        stop = min(start + chunk, layout.numel)
        _update_chunk(flat_param, grad, state, layout, group, scalars, start, stop, workspace)

    if flat_param.data_ptr() != param.data_ptr():
        param.copy_(flat_param.view_as(param))


@dataclass(frozen=True)
class _StepScalars:
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


def _update_chunk(
    flat_param: Tensor,
    grad: Tensor,
    state: dict,
    layout: BlockLayout,
    group: dict,
    scalars: _StepScalars,
    start: int,
    stop: int,
    workspace: _Workspace,
) -> None:
    """Run steps 1-5 of the update on entries [start, stop), a run of whole blocks."""
    length = stop - start
    accumulator, first_moment, second_moment = (buffer[:length] for buffer in workspace.buffers(length))
    four_bit = group["error_feedback"] == "4bit"
    bucket = group["quant_bucket"]

    with _stage("microadam::add_error"):
        # 1. a = g + dequantize(E). In fp32 mode the state buffer itself becomes a.
        if four_bit:
            codes = state["error_codes"][start // 2 : (stop + 1) // 2]
            bounds = state["error_bounds"][:, start // bucket : bucket_count(stop, bucket)]
            dequantize(codes, bounds, bucket, length, out=accumulator)
        else:
            accumulator = state["error"][start:stop]
        accumulator.add_(grad[start:stop])

    with _stage("microadam::topk"):
        # 2. Block-wise top-k of |a| into the newest window slot.
        first_block = start // layout.block_size
        full_blocks = min(layout.full_blocks - first_block, length // layout.block_size)
        has_tail = stop == layout.numel and layout.tail_size > 0
        # The bit patterns of non-negative floats, read as int32, are ordered like the
        # floats (NaN above inf, as in torch.topk). Top-k on int32 took 1.3 ns per entry
        # against 1.9 on float32, whose comparisons handle NaN (torch 2.13, AMD EPYC).
        keys = torch.abs(accumulator, out=first_moment).view(torch.int32)
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

    with _stage("microadam::quantize_error"):
        # 3. The rest of a is the new error.
        accumulator.index_fill_(0, positions, 0.0)
        if four_bit:
            quantize(accumulator, bucket, codes=codes, bounds=bounds, work=accumulator)

    with _stage("microadam::window_moments"):
        # 4. Moments from the filled window slots, and u = c1 M / (sqrt(c2 S) + eps) at
        # every window entry. Entries that share a coordinate get the same u.
        window_positions = state["window_indices"][: scalars.filled, k_start:k_stop].to(torch.int64)
        window_positions = window_positions.add_(block_starts).view(-1)
        values = state["window_values"][: scalars.filled, k_start:k_stop].float()
        # NOTE: on CUDA, index_add_ adds in no fixed order, so M and S can differ in the
        # last bits between runs unless torch.use_deterministic_algorithms(True) is set.
        first_moment.zero_().index_add_(0, window_positions, (values * scalars.beta1_powers).view(-1))
        second_moment.zero_().index_add_(0, window_positions, values.square_().mul_(scalars.beta2_powers).view(-1))
        denominator = second_moment.index_select(0, window_positions).mul_(scalars.c2).sqrt_().add_(scalars.eps)
        update = first_moment.index_select(0, window_positions).mul_(scalars.c1).div_(denominator)

    with _stage("microadam::param_update"):
        # 5. theta <- theta * (1 - lr * wd) - lr * u. Coordinates outside the window only decay.
        param_chunk = flat_param[start:stop]
        compute_dtype = torch.float64 if param_chunk.dtype == torch.float64 else torch.float32
        new_values = param_chunk.index_select(0, window_positions).to(compute_dtype)
        if scalars.decay != 1.0:
            new_values.mul_(scalars.decay)
            param_chunk.mul_(scalars.decay)
        new_values.add_(update, alpha=-scalars.lr)
        # Repeated positions carry equal values, so the write order does not matter.
        param_chunk.scatter_(0, window_positions, new_values.to(param_chunk.dtype))


_NO_STAGE = contextlib.nullcontext()


def _stage(name: str):
    """Return a torch.profiler label for a stage while a profiler runs, else a no-op context.

    A `record_function` costs microseconds even without a profiler, so it is only
    entered while one records.
    """
    # NOTE: `_is_profiler_enabled` is a private flag of torch.autograd.profiler
    # (torch 2.x). Without it, the labels are always entered.
    if getattr(torch.autograd.profiler, "_is_profiler_enabled", True):
        return torch.profiler.record_function(name)
    return _NO_STAGE
