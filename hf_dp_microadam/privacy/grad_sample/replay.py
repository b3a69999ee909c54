"""Generic per-example gradients for parameters that no grad sampler covers.

This covers bare parameters of non-leaf modules (ViT/DeiT/DINOv2 `cls_token`,
`position_embeddings`, DeiT's `distillation_token`, relative-position tables), PEFT
parameters kept in a `ParameterDict` (LoRA on embeddings), DoRA magnitude vectors, and
any other module class without a sampler.

The forward hook keeps the module's positional and keyword inputs. When the gradient of
its outputs arrives, the module runs again on the whole micro-batch ("replay"), with the
RNG and autocast state of the original call, so that dropout draws the same mask. The
per-example gradient of the module's own parameters is then one vector-Jacobian product
per example, with the output gradient restricted to that example's row. Child modules run
too, but their hooks are off during the replay and their parameters get no gradient here:
their own hooks cover them.

Opacus' functorch fallback is not used because it re-runs a module with only its first
positional input, differentiates all parameters of the subtree, and samples a fresh
dropout mask.

Cost: the replay costs one forward of the module, and each example costs a backward
through it at micro-batch size, so the work grows with n^2 for these modules only.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

# Upper bound on the elements of the batched output gradients built at once (examples per
# chunk times the module's output size). 2**24 float32 values are 64 MiB.
_MAX_BATCHED_COTANGENT_ELEMENTS = 2**24


@dataclass
class ForwardState:
    """RNG and autocast state at the start of a module call, so that a replay matches it."""

    cpu_rng_state: torch.Tensor
    device: torch.device
    device_rng_state: torch.Tensor | None
    autocast: list[tuple[str, bool, torch.dtype]]


def _device_module(device: torch.device):
    if device.type == "cpu":
        return None
    return torch.get_device_module(device.type)


def capture_forward_state(device: torch.device) -> ForwardState:
    """Record the RNG state of the CPU and of `device`, and the autocast settings."""
    device_module = _device_module(device)
    device_rng_state = device_module.get_rng_state(device) if device_module is not None else None
    device_types = ["cpu"] if device.type == "cpu" else ["cpu", device.type]
    autocast = [
        (device_type, torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type))
        for device_type in device_types
    ]
    return ForwardState(torch.get_rng_state(), device, device_rng_state, autocast)


@contextlib.contextmanager
def restored_forward_state(state: ForwardState):
    """Run the body with the recorded RNG and autocast state, and restore the RNG afterwards."""
    device_module = _device_module(state.device)
    devices = [state.device] if device_module is not None else []
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.random.fork_rng(devices=devices, device_type=state.device.type))
        torch.set_rng_state(state.cpu_rng_state)
        if device_module is not None:
            device_module.set_rng_state(state.device_rng_state, state.device)
        for device_type, enabled, dtype in state.autocast:
            stack.enter_context(torch.autocast(device_type, dtype=dtype, enabled=enabled))
        yield


def per_example_vjp(
    outputs: list[torch.Tensor],
    output_grads: list[torch.Tensor],
    parameters: list[torch.nn.Parameter],
    batch_size: int,
) -> list[torch.Tensor | None]:
    """Return, per parameter, the [n, *shape] gradients of `sum_i <outputs[i-th row], grads[i-th row]>`.

    `outputs` must come from a replay on the whole micro-batch, with the batch on dimension
    0. A parameter that the outputs do not depend on gets None.
    """
    output_size = sum(output.numel() for output in outputs)
    chunk_size = max(1, min(batch_size, _MAX_BATCHED_COTANGENT_ELEMENTS // max(output_size, 1)))
    chunks: list[tuple[torch.Tensor | None, ...]] = []

    for start in range(0, batch_size, chunk_size):
        rows = torch.arange(start, min(start + chunk_size, batch_size), device=output_grads[0].device)
        steps = torch.arange(rows.numel(), device=rows.device)
        batched_grads = []
        for grad in output_grads:
            # Entry j of the batch keeps row rows[j] of the output gradient and zeros elsewhere.
            batched = grad.new_zeros((rows.numel(),) + tuple(grad.shape))
            batched[steps, rows] = grad[rows]
            batched_grads.append(batched)
        chunks.append(
            torch.autograd.grad(
                outputs,
                parameters,
                grad_outputs=batched_grads,
                retain_graph=True,
                allow_unused=True,
                is_grads_batched=True,
            )
        )

    results: list[torch.Tensor | None] = []
    for index in range(len(parameters)):
        pieces = [chunk[index] for chunk in chunks]
        results.append(None if pieces[0] is None else torch.cat(pieces, dim=0))
    return results
