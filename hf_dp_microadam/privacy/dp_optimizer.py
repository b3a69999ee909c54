"""The privatizer: per-example clipping, Gaussian noise and normalization.

`DPOptimizer` wraps any update rule (a `torch.optim.Optimizer`) and turns the
per-example gradients in `p.grad_sample` into one privatized gradient per logical batch:

    g = (sum_i clip(g_i) + N(0, (noise_multiplier * max_grad_norm)^2 I)) / expected_batch_size

The stages are named methods, as in Opacus' `DPOptimizer`: `clip_and_accumulate()`,
`add_noise()`, `scale_grad()`. The update rule only ever receives `g`, so whatever it
does is post-processing and costs no privacy.

`DPMicroAdam` is this privatizer around `hf_dp_microadam.optim.MicroAdam`, and
`make_dp_optimizer(name, ...)` builds the privatizer around any of the update rules
that the package compares (DP-MicroAdam, DP-Adam, DP-AdamBC, DP-SGD).
"""

from __future__ import annotations

import logging
import math
import numbers
from collections import OrderedDict
from typing import Any, Callable, Iterable, Optional

import torch
import torch.distributed as dist
from opacus.optimizers import DPOptimizer as OpacusDPOptimizer
from torch.optim import Optimizer
from torch.utils.hooks import RemovableHandle

from hf_dp_microadam.privacy.noise import NoiseSource, create_noise_source

__all__ = [
    "CLIPPING_MODES",
    "DP_OPTIMIZER_NAMES",
    "DPMicroAdam",
    "DPOptimizer",
    "make_dp_optimizer",
]

logger = logging.getLogger(__name__)

CLIPPING_MODES = ("flat", "per_layer")

#: Added to the per-example norm before dividing, so that a clipped norm stays below C.
CLIPPING_EPSILON = 1e-6

#: Privatized optimizer name -> update rule name in `hf_dp_microadam.optim`.
DP_OPTIMIZER_NAMES = {
    "dp-microadam": "microadam",
    "dp-adam": "adamw",
    "dp-adambc": "adambc",
    "dp-sgd": "sgd",
}


def _accumulation_dtype(param: torch.Tensor) -> torch.dtype:
    """Return the dtype of the clipped sum: at least float32, so bf16 sums stay exact enough."""
    return torch.promote_types(param.dtype, torch.float32)


def _process_group_rank_and_size() -> tuple[int, int]:
    """Return (rank, world size) of the default process group, or (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        world_size = dist.get_world_size()
        if world_size > 1:
            return dist.get_rank(), world_size
    return 0, 1


class DPOptimizer(OpacusDPOptimizer):
    """Differentially private wrapper around an update rule.

    The wrapping, `param_groups`/`state`/`defaults` delegation, `state_dict()` and
    `signal_skip_step()` come from Opacus' `DPOptimizer`. This class replaces the
    privacy-relevant stages, because Opacus 1.6 differs from what this package needs:

    - Per-example gradients arrive in `p.grad_sample` from summed per-example losses
      (never averaged), so no rescaling by the batch size happens before clipping.
    - The normalizer is always the configured `expected_batch_size` B. Opacus multiplies
      it by `accumulated_iterations`, which depends on how the batch was split.
    - `step()` clears every per-step buffer itself. `transformers.Trainer` calls
      `model.zero_grad()`, not the optimizer's, so a clipped sum left for `zero_grad()`
      would leak into the next logical step.
    - An empty logical batch still gives a noise-only update and a step-hook call.
    - With several processes the clipped sums are all-reduced and only rank 0 adds
      noise, so each logical step has exactly one noise draw.
    - Noise comes from a dedicated generator (see `hf_dp_microadam.privacy.noise`),
      never from torch's global RNG.

    A logical step is one Poisson batch. Its examples may arrive in any number of
    micro-batches: call `clip_and_accumulate()` after each backward pass (or call
    `signal_skip_step()` and then `step()`, as Opacus' BatchMemoryManager does), then
    call `step()` once. `step()` clips whatever `p.grad_sample` is left, draws the noise,
    divides by B, writes `p.grad`, runs the step hooks (the accountant), runs the update
    rule and clears `p.grad_sample`, `p.summed_grad` and `p.grad`.

    Args:
        optimizer: the update rule. It receives only the privatized gradient.
        noise_multiplier: sigma. The noise on the clipped sum has standard deviation
            `noise_multiplier * max_grad_norm`. 0 keeps clipping and drops the noise
            (no privacy guarantee).
        max_grad_norm: clipping bound C on each example's gradient (L2 norm). `inf`
            turns clipping off, which is allowed only with `noise_multiplier=0` (a
            non-private baseline through the same code path).
        expected_batch_size: B = q * N, the public normalizer. Never the realized
            batch size.
        clipping: "flat" (default) clips the norm over all trainable parameters jointly.
            "per_layer" clips every parameter tensor to C / sqrt(L), where L is the
            number of trainable parameter tensors of the optimizer, so the joint norm
            of a clipped example is at most sqrt(L * C^2 / L) = C and the sensitivity
            stays C.
        secure_mode: draw noise from a ChaCha20 stream keyed from `os.urandom`.
        noise_seed: seed of the default noise generator, for tests and debugging only.
            `None` seeds it from `os.urandom`.
        noise_source: a ready noise source, overriding `secure_mode` and `noise_seed`.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        *,
        noise_multiplier: float,
        max_grad_norm: float,
        expected_batch_size: float,
        clipping: str = "flat",
        secure_mode: bool = False,
        noise_seed: Optional[int] = None,
        noise_source: Optional[NoiseSource] = None,
    ):
        if not math.isfinite(noise_multiplier) or noise_multiplier < 0:
            raise ValueError(
                f"noise_multiplier must be a finite number >= 0, got {noise_multiplier}."
            )
        if math.isnan(max_grad_norm) or max_grad_norm <= 0:
            raise ValueError(f"max_grad_norm must be a number > 0, got {max_grad_norm}.")
        if math.isinf(max_grad_norm) and noise_multiplier != 0:
            raise ValueError(
                "max_grad_norm=inf (no clipping) is only valid with noise_multiplier=0, "
                f"got noise_multiplier={noise_multiplier}."
            )
        if (
            isinstance(expected_batch_size, bool)
            or not isinstance(expected_batch_size, numbers.Real)
            or not math.isfinite(expected_batch_size)
            or expected_batch_size <= 0
        ):
            raise ValueError(
                "expected_batch_size must be a number > 0 taken from the configuration "
                f"(sample rate times dataset size), got {expected_batch_size!r}."
            )
        if clipping not in CLIPPING_MODES:
            raise ValueError(f"clipping must be one of {CLIPPING_MODES}, got {clipping!r}.")

        super().__init__(
            optimizer,
            noise_multiplier=noise_multiplier,
            max_grad_norm=max_grad_norm,
            expected_batch_size=expected_batch_size,
            loss_reduction="sum",
            secure_mode=secure_mode,
        )
        self.clipping = clipping
        if noise_source is None:
            first_param = next(iter(self.params), None)
            device = first_param.device if first_param is not None else None
            noise_source = create_noise_source(
                secure_mode=secure_mode, seed=noise_seed, device=device
            )
        self.noise_source = noise_source

        #: Number of completed logical steps (update rule calls). Step hooks see the
        #: count before the current step.
        self.logical_steps = 0
        #: Number of logical steps in which this process drew Gaussian noise.
        self.noise_draws = 0
        self._step_hooks: OrderedDict[int, Callable[[DPOptimizer], None]] = OrderedDict()

    # Step hooks

    def attach_step_hook(self, fn: Callable[["DPOptimizer"], None]) -> RemovableHandle:
        """Register `fn(optimizer)` to run once per logical step, before the update.

        When it runs, `p.grad` contains the privatized gradient and the parameters are
        not yet updated, so a hook that raises (a budget check) releases nothing.
        Unlike Opacus, which keeps one hook, several hooks may be attached (for example
        the accountant and a budget check). They run in the order of registration.
        Returns a handle whose `remove()` detaches the hook.
        """
        handle = RemovableHandle(self._step_hooks)
        self._step_hooks[handle.id] = fn
        return handle

    # Stage 1: clip and accumulate

    def _per_example_gradients(self) -> dict[int, torch.Tensor]:
        """Collect `p.grad_sample` of every trainable parameter, keyed by its index.

        A parameter without a per-example gradient and without `p.grad` did not take
        part in the forward pass, and its per-example gradients are zero. A parameter
        with `p.grad` but no `p.grad_sample` means the per-example gradient engine
        missed it, and clipping would not bound its contribution.
        """
        per_example: dict[int, torch.Tensor] = {}
        for index, param in enumerate(self.params):
            grad_sample = getattr(param, "grad_sample", None)
            if grad_sample is None:
                if param.grad is not None:
                    raise RuntimeError(
                        f"Trainable parameter {index} (shape {tuple(param.shape)}) has a "
                        "gradient but no per-example gradient (p.grad_sample). Attach the "
                        "per-example gradient hooks to every trainable module, or freeze "
                        "this parameter with requires_grad=False."
                    )
                continue
            if isinstance(grad_sample, (list, tuple)):
                grad_sample = torch.cat(list(grad_sample), dim=0)
            if grad_sample.shape[1:] != param.shape:
                raise ValueError(
                    f"p.grad_sample of trainable parameter {index} has shape "
                    f"{tuple(grad_sample.shape)}, expected (batch, {', '.join(map(str, param.shape))})."
                )
            per_example[index] = grad_sample

        batch_sizes = {grad_sample.shape[0] for grad_sample in per_example.values()}
        if len(batch_sizes) > 1:
            raise ValueError(
                "Per-example gradients of one micro-batch have different batch sizes "
                f"{sorted(batch_sizes)} across parameters. Every trainable parameter must "
                "get one gradient per example of the micro-batch."
            )
        return per_example

    def _clip_factors(
        self, per_example: dict[int, torch.Tensor], batch_size: int
    ) -> dict[int, torch.Tensor]:
        """Return, per parameter index, the clipping factor of each example."""
        norm_dtype = torch.float32
        for grad_sample in per_example.values():
            norm_dtype = torch.promote_types(norm_dtype, grad_sample.dtype)
        norms = {
            index: torch.linalg.vector_norm(
                grad_sample.reshape(batch_size, -1), ord=2, dim=1, dtype=norm_dtype
            )
            for index, grad_sample in per_example.items()
        }

        if self.clipping == "per_layer":
            layer_bound = self.max_grad_norm / math.sqrt(len(self.params))
            return {
                index: (layer_bound / (norm + CLIPPING_EPSILON)).clamp(max=1.0)
                for index, norm in norms.items()
            }

        device = next(iter(norms.values())).device
        joint_norm = torch.stack([norm.to(device) for norm in norms.values()], dim=1).norm(
            p=2, dim=1
        )
        factor = (self.max_grad_norm / (joint_norm + CLIPPING_EPSILON)).clamp(max=1.0)
        return {index: factor for index in norms}

    def clip_and_accumulate(self) -> None:
        """Clip the per-example gradients in `p.grad_sample` and add them to `p.summed_grad`.

        Call it after the backward pass of every micro-batch, or let `step()` do it for
        the last one. Afterwards `p.grad_sample` and `p.grad` are None, so no raw
        gradient outlives this call. `p.summed_grad` is kept in at least float32.
        """
        params = self.params
        per_example = self._per_example_gradients()
        batch_size = next(iter(per_example.values())).shape[0] if per_example else 0

        if batch_size > 0:
            factors = self._clip_factors(per_example, batch_size)
            for index, grad_sample in per_example.items():
                param = params[index]
                dtype = _accumulation_dtype(param)
                factor = factors[index].to(device=grad_sample.device, dtype=dtype)
                clipped_sum = torch.einsum("i,i...->...", factor, grad_sample.to(dtype))
                clipped_sum = clipped_sum.to(param.device)
                if param.summed_grad is None:
                    param.summed_grad = clipped_sum
                else:
                    param.summed_grad.add_(clipped_sum)

        for param in params:
            param.grad_sample = None
            param.grad = None

    # Stage 2: noise (and the all-reduce across processes)

    def _noise_std(self) -> float:
        """Return noise_multiplier * max_grad_norm, and 0 without noise even if C is inf."""
        if self.noise_multiplier == 0:
            return 0.0
        return self.noise_multiplier * self.max_grad_norm

    def add_noise(self) -> None:
        """Add N(0, (noise_multiplier * max_grad_norm)^2) to every `p.summed_grad`, once.

        A parameter without a clipped sum (empty logical batch) gets a zero sum first,
        so the update is noise only. With several processes only rank 0 adds noise.
        """
        rank, _ = _process_group_rank_and_size()
        std = self._noise_std()
        draw = rank == 0 and std > 0

        for param in self.params:
            dtype = _accumulation_dtype(param)
            if param.summed_grad is None:
                param.summed_grad = torch.zeros(param.shape, dtype=dtype, device=param.device)
            if draw:
                noise = self.noise_source.sample(
                    param.shape, std=std, device=param.device, dtype=dtype
                )
                param.summed_grad.add_(noise)
        if draw:
            self.noise_draws += 1

    def _all_reduce_sums(self) -> None:
        """Sum `p.summed_grad` over all processes, one flat buffer per device and dtype."""
        _, world_size = _process_group_rank_and_size()
        if world_size == 1:
            return
        buckets: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
        for param in self.params:
            tensor = param.summed_grad
            buckets.setdefault((tensor.device, tensor.dtype), []).append(tensor)
        for tensors in buckets.values():
            flat = torch.cat([tensor.reshape(-1) for tensor in tensors])
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            offset = 0
            for tensor in tensors:
                tensor.copy_(flat[offset : offset + tensor.numel()].view_as(tensor))
                offset += tensor.numel()

    # Stage 3: scale

    def scale_grad(self) -> None:
        """Write `p.grad = p.summed_grad / expected_batch_size` and drop `p.summed_grad`.

        The divisor is the configured B, identical for neighbouring datasets. The
        realized batch size and the number of micro-batches play no part.
        """
        for param in self.params:
            grad = param.summed_grad / self.expected_batch_size
            param.grad = grad.to(param.dtype).view_as(param)
            param.summed_grad = None

    # The logical step

    def pre_step(self, closure: Optional[Callable[[], float]] = None) -> bool:
        """Clip, then privatize unless a skip was signalled.

        Returns True when `p.grad` contains the privatized gradient of a finished logical
        batch, and False for a skipped (virtual) step that only accumulated.
        """
        self.clip_and_accumulate()
        if self._check_skip_next_step():
            self._is_last_step_skipped = True
            return False
        self.add_noise()
        self._all_reduce_sums()
        self.scale_grad()
        self._is_last_step_skipped = False
        return True

    def step(self, closure: Optional[Callable[[], float]] = None) -> Optional[float]:
        """Finish the logical step: privatize, run the step hooks, update, clear buffers.

        Returns the closure's loss if a closure was given, else the update rule's
        return value. A skipped step (see `signal_skip_step`) returns None. If a step
        hook raises, the update rule does not run, the buffers are cleared and the
        exception propagates.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        if not self.pre_step():
            return loss

        # The hooks (the accountant, a budget check) run before the update, as in
        # Opacus, so a hook that raises stops the step before anything is released.
        try:
            for hook in list(self._step_hooks.values()):
                hook(self)
            result = self.original_optimizer.step()
        finally:
            self._clear_step_buffers()
        self.logical_steps += 1
        return loss if loss is not None else result

    def _clear_step_buffers(self) -> None:
        for param in self.params:
            param.grad_sample = None
            param.summed_grad = None
            param.grad = None

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear `p.grad` and `p.grad_sample`, keeping the clipped sum of the logical step.

        `p.summed_grad` only exists between micro-batches of an unfinished logical step
        (`step()` clears it), so keeping it lets virtual steps call `zero_grad()`
        between micro-batches. `set_to_none` is passed to the update rule.
        """
        for param in self.params:
            param.grad_sample = None
        self.original_optimizer.zero_grad(set_to_none)

    @property
    def accumulated_iterations(self) -> int:
        """Always 1: the normalizer and the accountant do not depend on the batch split."""
        return 1

    # Checkpoint state

    def privacy_state_dict(self) -> dict[str, Any]:
        """Return the privatizer state a checkpoint needs (noise generator, step counts).

        It is separate from `state_dict()`, which is the update rule's state.

        Raises:
            RuntimeError: in the middle of a logical step, where clipped sums are pending
                and would be lost.
        """
        if any(param.summed_grad is not None for param in self.params):
            raise RuntimeError(
                "Cannot save the privacy state in the middle of a logical step: clipped "
                "sums are pending. Save after optimizer.step()."
            )
        return {
            "logical_steps": self.logical_steps,
            "noise_draws": self.noise_draws,
            "noise": self.noise_source.state_dict(),
            "noise_restorable": self.noise_source.restorable,
            "noise_multiplier": self.noise_multiplier,
            "max_grad_norm": self.max_grad_norm,
            "expected_batch_size": self.expected_batch_size,
            "clipping": self.clipping,
        }

    def load_privacy_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a state from `privacy_state_dict()`.

        A different `noise_multiplier`, `max_grad_norm`, `expected_batch_size` or
        `clipping` is allowed (the accountant records each step's settings) but logged.

        Raises:
            KeyError: if the state lacks the step count or the noise state.
            ValueError: if the saved run used the other `secure_mode` setting.
        """
        for key in ("logical_steps", "noise"):
            if key not in state:
                raise KeyError(f"Privacy state has no {key!r} entry: {sorted(state)}.")
        self.noise_source.load_state_dict(state["noise"])
        self.logical_steps = int(state["logical_steps"])
        # The state comes from rank 0, the only process that draws noise. Every rank loads
        # its generator state, but only rank 0 continues its count of draws.
        rank, _ = _process_group_rank_and_size()
        self.noise_draws = int(state.get("noise_draws", 0)) if rank == 0 else 0
        for key in ("noise_multiplier", "max_grad_norm", "expected_batch_size", "clipping"):
            if key in state and state[key] != getattr(self, key):
                logger.warning(
                    "Resuming with %s=%r, but the checkpoint was saved with %s=%r.",
                    key,
                    getattr(self, key),
                    key,
                    state[key],
                )

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(noise_multiplier={self.noise_multiplier}, "
            f"max_grad_norm={self.max_grad_norm}, expected_batch_size="
            f"{self.expected_batch_size}, clipping={self.clipping!r}, "
            f"noise={self.noise_source!r}, update_rule={self.original_optimizer!r})"
        )


class DPMicroAdam(DPOptimizer):
    """DP-MicroAdam for PyTorch and Opacus loops that fill `p.grad_sample`.

    The privatizer of `DPOptimizer` around `hf_dp_microadam.optim.MicroAdam`. The model
    must produce per-example gradients, for example through Opacus' `GradSampleModule`
    or `GradSampleHooks` with `loss_reduction="sum"` and a summed loss.

    Example:
        >>> optimizer = DPMicroAdam(model.parameters(), noise_multiplier=1.0,
        ...                         max_grad_norm=1.0, expected_batch_size=256, lr=1e-4)
        >>> for micro_batch in split_into_micro_batches(logical_batch, 32):
        ...     loss_fn(model(x[micro_batch]), y[micro_batch]).sum().backward()
        ...     optimizer.clip_and_accumulate()
        >>> optimizer.step()

    Args:
        params: parameters or parameter groups, as for any torch optimizer.
        noise_multiplier, max_grad_norm, expected_batch_size, clipping, secure_mode,
            noise_seed: see `DPOptimizer`.
        **microadam_kwargs: passed to `MicroAdam` (lr, betas, eps, weight_decay, density,
            window, quant_bucket, block_size, error_feedback).
    """

    def __init__(
        self,
        params: Iterable,
        noise_multiplier: float,
        max_grad_norm: float,
        expected_batch_size: float,
        *,
        clipping: str = "flat",
        secure_mode: bool = False,
        noise_seed: Optional[int] = None,
        **microadam_kwargs,
    ):
        from hf_dp_microadam.optim import MicroAdam

        super().__init__(
            MicroAdam(params, **microadam_kwargs),
            noise_multiplier=noise_multiplier,
            max_grad_norm=max_grad_norm,
            expected_batch_size=expected_batch_size,
            clipping=clipping,
            secure_mode=secure_mode,
            noise_seed=noise_seed,
        )


def make_dp_optimizer(
    name: str,
    params: Iterable,
    *,
    lr: float,
    noise_multiplier: float,
    max_grad_norm: float,
    expected_batch_size: float,
    weight_decay: float = 0.0,
    momentum: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    density: float = 0.01,
    window: int = 10,
    quant_bucket: int = 64,
    block_size: Optional[int] = None,
    error_feedback: str = "4bit",
    adambc_gamma: float = 1e-8,
    clipping: str = "flat",
    secure_mode: bool = False,
    noise_seed: Optional[int] = None,
) -> DPOptimizer:
    """Build a privatized optimizer by name.

    Names:
        dp-microadam: MicroAdam on the privatized gradient.
        dp-adam: AdamW on the privatized gradient.
        dp-adambc: DP-AdamBC (Tang, Shpilevskiy and Lecuyer, AAAI 2024). Adam whose
            second moment is corrected by the known noise variance of one coordinate of
            the privatized gradient, variance_offset = (noise_multiplier * max_grad_norm
            / expected_batch_size)^2, with floor `adambc_gamma`.
        dp-sgd: SGD, with heavy-ball momentum if `momentum > 0`.

    Options that an update rule does not use (momentum for Adam, density for SGD) are
    passed on and ignored there.

    Raises:
        ValueError: for an unknown name, listing the known ones.
    """
    if name not in DP_OPTIMIZER_NAMES:
        raise ValueError(
            f"Unknown DP optimizer {name!r}. Choose one of {sorted(DP_OPTIMIZER_NAMES)}."
        )
    from hf_dp_microadam.optim import create_update_rule

    variance_offset = 0.0
    if noise_multiplier != 0:
        variance_offset = (noise_multiplier * max_grad_norm / expected_batch_size) ** 2
    update_rule = create_update_rule(
        DP_OPTIMIZER_NAMES[name],
        params,
        lr=lr,
        weight_decay=weight_decay,
        betas=betas,
        eps=eps,
        momentum=momentum,
        variance_offset=variance_offset,
        gamma=adambc_gamma,
        density=density,
        window=window,
        quant_bucket=quant_bucket,
        block_size=block_size,
        error_feedback=error_feedback,
    )
    return DPOptimizer(
        update_rule,
        noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm,
        expected_batch_size=expected_batch_size,
        clipping=clipping,
        secure_mode=secure_mode,
        noise_seed=noise_seed,
    )
