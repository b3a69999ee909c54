"""Bookkeeping of module calls between a forward and its backward."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from .replay import ForwardState
from .samplers import GradSampler


@dataclass
class HookedModule:
    """A module that owns trainable parameters, with the hooks that compute their per-example gradients."""

    name: str
    module: nn.Module
    parameters: list[nn.Parameter]
    # (owner module, attribute name) of each parameter, for swapping it during a replay.
    slots: list[tuple[nn.Module, str]]
    sampler: GradSampler | None
    # Calls whose forward hook has not run yet: their sequence number and forward state.
    pending_calls: list[tuple[int, ForwardState | None]] = field(default_factory=list)
    # During a replay, for each call in progress, the parameters it swapped for proxies.
    replay_swaps: list[list[tuple[nn.Module, str, nn.Parameter]] | None] = field(default_factory=list)


@dataclass
class Frame:
    """A call in progress of a module that encloses hooked modules.

    If a hooked call inside it has outputs without the batch on dimension 0, that call is
    deferred here, and this call replays for it in the backward.
    """

    name: str
    module: nn.Module
    state: ForwardState
    # Sequence number of the first hooked call inside this call.
    start: int
    # Deferred hooked calls: (sequence number, hooked module).
    deferred: list[tuple[int, HookedModule]] = field(default_factory=list)


@dataclass
class CapturedCall:
    """Inputs and bookkeeping that a forward hook keeps for the backward of one module call."""

    hooked: HookedModule
    args: tuple
    kwargs: dict
    versions: list[tuple[torch.Tensor, int]]
    batch_size: int
    generation: int
    state: ForwardState | None = None
    output_leaf_indices: list[int] = field(default_factory=list)
    # For a frame replay: hooked module to run with proxy parameters, by call index in the replay.
    deferred_calls: dict[int, HookedModule] = field(default_factory=dict)


def parameter_slots(module: nn.Module, names: list[str]) -> list[tuple[nn.Module, str]]:
    """Return (owner module, attribute) for parameter names relative to `module` ("weight", "lora_A.default")."""
    slots = []
    for name in names:
        owner_name, _, attribute = name.rpartition(".")
        slots.append((module.get_submodule(owner_name) if owner_name else module, attribute))
    return slots


def swap_in_proxies(hooked: HookedModule, proxies: dict[int, torch.Tensor]) -> list[tuple[nn.Module, str, nn.Parameter]]:
    """Replace the module's parameters by their proxies and return what to restore."""
    swapped = []
    for parameter, (owner, attribute) in zip(hooked.parameters, hooked.slots):
        proxy = proxies.get(id(parameter))
        if proxy is not None:
            swapped.append((owner, attribute, owner._parameters[attribute]))
            owner._parameters[attribute] = proxy
    return swapped


def restore_parameters(swapped: list[tuple[nn.Module, str, nn.Parameter]]) -> None:
    for owner, attribute, parameter in swapped:
        owner._parameters[attribute] = parameter


@contextlib.contextmanager
def restoring_swaps(hooked_modules: list[HookedModule]):
    """Restore parameters that a replay swapped, if the replayed forward raised midway."""
    try:
        yield
    finally:
        for hooked in hooked_modules:
            while hooked.replay_swaps:
                swapped = hooked.replay_swaps.pop()
                if swapped:
                    restore_parameters(swapped)
