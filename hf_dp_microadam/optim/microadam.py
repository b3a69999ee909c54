"""MicroAdam: Adam moments rebuilt from a short window of sparse gradients.

Modoranu et al., "MicroAdam: Accurate Adaptive Optimization with Low Space Overhead and
Provable Convergence", NeurIPS 2024, arXiv 2405.15593.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from numbers import Real

import torch
from torch import Tensor
from torch.optim import Optimizer

from hf_dp_microadam.optim._microadam_batched import update_small_tensors, width_class
from hf_dp_microadam.optim._microadam_update import StepScalars, Workspace, update_chunk
from hf_dp_microadam.optim.quantization import PACK_SPAN, bucket_count, code_bytes

MAX_BLOCK_SIZE = 32768
"""Largest block: block-relative indices 0 .. 32767 fit in int16."""

DEFAULT_BLOCK_SIZE = MAX_BLOCK_SIZE
"""Block size when `block_size=None`. The largest block gives the smallest round-up of k."""

ERROR_FEEDBACK_MODES = ("4bit", "fp32")

# Entries processed together: a chunk of a large tensor, or a batch of small tensors.
# On CPU every stage of a chunk then runs on data that is still in the caches, and the
# scratch memory stays at 12 bytes per entry of a chunk (6 MB). Of 2^18 to 2^21
# entries, 2^19 gave the lowest CPU time per step on the 20M-parameter stack of
# benchmarks/optimizer_step.py (one thread, 2-core AMD EPYC with 32 MB of L3 cache
# shared with other jobs, torch 2.13). Chunks hold whole blocks, buckets and packing
# spans, so the result does not depend on this number.
_CPU_CHUNK_TARGET = 1 << 19
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
    @functools.lru_cache(maxsize=4096)
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
    parameters are updated in float64 from a float32 u.

    Execution: a tensor of more than `block_size` entries is processed in chunks of whole
    blocks, about 2^19 entries on CPU (2^24 on other devices), so that every stage runs on
    data in the CPU caches. Tensors of a group with at most `block_size` entries each
    (biases, norm weights) that share device, dtypes and step are updated together, with
    a fixed number of PyTorch calls per batch of up to a chunk. Both give the same parameters and state as
    updating each tensor on its own, except that a batched window slot lists a tensor's
    kept indices in another order (and where |a| ties at the k-th largest value of a
    block, another tied entry may be kept). The scratch memory, 12 bytes per entry of
    the largest chunk or batch plus the index maps of the batches, is shared by all
    tensors on a device and is not part of the state (see `workspace_bytes`).

    Speed: `benchmarks/optimizer_step.py` measured it with float32 parameters and torch
    2.13 on one thread of a 2-core AMD EPYC, shared with other jobs at a load average of
    3 to 7. On its 20M-parameter stack a step took 113 ms of CPU time, 2.5 times
    `torch.optim.AdamW(foreach=True)` (44 ms). On the 110M parameters of BERT-base it
    took 1.5 times AdamW. Exact top-k selection takes about a third of the step, the
    4-bit error feedback about a third, and the window scatters and gathers the rest. The
    124 single-block tensors of BERT-base took 4.0 ms (AdamW: 2.3 ms).

    NOTE: with two intra-op threads on that loaded machine, a step took about six times
    as long as with one, most likely because a step runs a few thousand PyTorch calls and
    each parallel call waits for both threads.

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

        for group in self.param_groups:
            # Single-block tensors that share device, dtypes and step are updated together.
            batches: dict[tuple, list[tuple[int, Tensor, dict]]] = {}
            for param in group["params"]:
                numel = param.numel()
                if param.grad is None or numel == 0:
                    continue
                _check_parameter(param)
                state = self.state[param]
                layout = BlockLayout.build(numel, group["block_size"], group["density"])
                if not state:
                    _init_state(state, param, layout, group)
                else:
                    _check_state(state, param, layout, group)
                if layout.block_size == numel:
                    key = (param.device, param.dtype, param.grad.dtype, state["step"])
                    batches.setdefault(key, []).append((numel, param, state))
                else:
                    _update_parameter(param, state, layout, group, self._workspace(param.device))
            for (device, *_), members in batches.items():
                _update_batches(members, group, self._workspace(device))
        return loss

    def workspace_bytes(self) -> int:
        """Return the bytes of scratch memory and caches that the optimizer keeps outside its state.

        This memory is shared by all parameters on a device and is not saved by
        `state_dict()` (see `hf_dp_microadam.optim._microadam_update.Workspace`).
        """
        return sum(workspace.nbytes() for workspace in self.__dict__.get("_workspaces", {}).values())

    def _workspace(self, device: torch.device) -> Workspace:
        # Created on first use, so optimizers restored by pickle or deepcopy, which
        # only carry defaults, state and param_groups, get one too.
        workspaces = self.__dict__.setdefault("_workspaces", {})
        workspace = workspaces.get(device)
        if workspace is None:
            workspace = workspaces[device] = Workspace(device)
        return workspace

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


@functools.lru_cache(maxsize=4096)
def _expected_state_shapes(
    numel: int, total_k: int, window: int, quant_bucket: int, error_feedback: str
) -> tuple[tuple[str, tuple[int, ...]], ...]:
    shapes = [("window_indices", (window, total_k)), ("window_values", (window, total_k))]
    if error_feedback == "4bit":
        shapes.append(("error_codes", (code_bytes(numel),)))
        shapes.append(("error_bounds", (2, bucket_count(numel, quant_bucket))))
    else:
        shapes.append(("error", (numel,)))
    return tuple(shapes)


def _check_state(state: dict, param: Tensor, layout: BlockLayout, group: dict) -> None:
    """Raise ValueError when the state does not fit the group's current settings."""
    shapes = _expected_state_shapes(
        layout.numel, layout.total_k, group["window"], group["quant_bucket"], group["error_feedback"]
    )
    for key, shape in shapes:
        value = state.get(key)
        if value is None or value.shape != shape:
            found = "missing" if value is None else f"of shape {tuple(value.shape)}"
            raise ValueError(
                f"MicroAdam state {key!r} of a parameter of shape {tuple(param.shape)} is {found}, "
                f"but density={group['density']}, window={group['window']}, "
                f"quant_bucket={group['quant_bucket']}, block_size={group['block_size']}, "
                f"error_feedback={group['error_feedback']!r} need shape {shape}. "
                "These settings cannot change once a parameter has state."
            )


def _chunk_length(layout: BlockLayout, group: dict, target: int) -> int:
    """Return a chunk length made of whole blocks, whole buckets and whole packing spans."""
    unit = layout.block_size
    if group["error_feedback"] == "4bit":
        unit = math.lcm(unit, group["quant_bucket"], PACK_SPAN)
    return max(1, target // unit) * unit


def _chunk_target(device: torch.device) -> int:
    return _CPU_CHUNK_TARGET if device.type == "cpu" else _ACCELERATOR_CHUNK_TARGET


def _update_parameter(param: Tensor, state: dict, layout: BlockLayout, group: dict, workspace: Workspace) -> None:
    state["step"] += 1
    scalars = StepScalars.build(state["step"], group, workspace)

    grad = param.grad.reshape(-1)
    if param.is_contiguous():
        flat_param = param.view(-1)
    else:
        flat_param = param.detach().reshape(-1).clone()

    chunk = _chunk_length(layout, group, _chunk_target(param.device))
    for start in range(0, layout.numel, chunk):
        stop = min(start + chunk, layout.numel)
        update_chunk(flat_param, grad, state, layout, group, scalars, start, stop, workspace)

    if flat_param.data_ptr() != param.data_ptr():
        param.copy_(flat_param.view_as(param))


def _update_batches(members: list[tuple[int, Tensor, dict]], group: dict, workspace: Workspace) -> None:
    """Update single-block tensors that share device, dtypes and step, in batches of about a chunk.

    `members` lists (numel, parameter, state) triples.
    """
    members = sorted(members, key=lambda member: width_class(member[0]))
    target = _chunk_target(workspace.device)
    start = 0
    while start < len(members):
        stop = start + 1
        batch_numel = members[start][0]
        while stop < len(members) and batch_numel + members[stop][0] <= target:
            batch_numel += members[stop][0]
            stop += 1
        if stop - start == 1:
            numel, param, state = members[start]
            layout = BlockLayout.build(numel, group["block_size"], group["density"])
            _update_parameter(param, state, layout, group, workspace)
        else:
            batch = members[start:stop]
            update_small_tensors([param for _, param, _ in batch], [state for _, _, state in batch], group, workspace)
        start = stop
