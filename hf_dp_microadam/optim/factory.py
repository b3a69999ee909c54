"""Construction of an update rule from its name, as configuration files spell it."""

from __future__ import annotations

import torch
from torch.optim import Optimizer

from hf_dp_microadam.optim.adambc import AdamBC
from hf_dp_microadam.optim.microadam import MicroAdam

UPDATE_RULES = ("microadam", "adamw", "adambc", "sgd")


def create_update_rule(
    name: str,
    params,
    *,
    lr: float,
    weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    momentum: float = 0.0,
    variance_offset: float = 0.0,
    gamma: float = 1e-8,
    density: float = 0.01,
    window: int = 10,
    quant_bucket: int = 64,
    block_size: int | None = None,
    error_feedback: str = "4bit",
) -> Optimizer:
    """Create the update rule `name` over `params`.

    Each rule receives only the arguments it takes, and ignores the others:

    - ``microadam``: `MicroAdam` (lr, betas, eps, weight_decay, density, window,
      quant_bucket, block_size, error_feedback);
    - ``adamw``: `torch.optim.AdamW` (lr, betas, eps, weight_decay);
    - ``adambc``: `AdamBC` (lr, betas, weight_decay, variance_offset, gamma);
    - ``sgd``: `torch.optim.SGD` (lr, momentum, weight_decay). It is plain SGD when
      momentum is 0, and its weight_decay is an L2 term added to the gradient.

    Raises:
        ValueError: `name` is not one of ``UPDATE_RULES``.
    """
    rule = name.lower() if isinstance(name, str) else name
    if rule == "microadam":
        return MicroAdam(
            params,
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            density=density,
            window=window,
            quant_bucket=quant_bucket,
            block_size=block_size,
            error_feedback=error_feedback,
        )
    if rule == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    if rule == "adambc":
        return AdamBC(
            params, lr=lr, betas=betas, weight_decay=weight_decay, variance_offset=variance_offset, gamma=gamma
        )
    if rule == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    raise ValueError(f"unknown update rule {name!r}. Valid names: {', '.join(UPDATE_RULES)}.")
