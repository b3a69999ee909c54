"""AdamBC: Adam whose second moment is corrected for a known additive variance.

Tang, Shpilevskiy and Lecuyer, "DP-AdamBC: Your DP-Adam Is Actually DP-SGD (Unless You
Apply Bias Correction)", AAAI 2024.
"""

from __future__ import annotations

import math
from numbers import Real

import torch
from torch import Tensor
from torch.optim import Optimizer


class AdamBC(Optimizer):
    r"""Adam with decoupled weight decay and a bias-corrected, floored denominator.

    At step t (counted per parameter, from 1), with gradient g:

    .. math::
        m &\leftarrow \beta_1 m + (1 - \beta_1) g, \qquad
        v \leftarrow \beta_2 v + (1 - \beta_2) g^2 \\
        \hat m &= m / (1 - \beta_1^t), \qquad \hat v = v / (1 - \beta_2^t) \\
        \theta &\leftarrow \theta (1 - lr \cdot wd)
            - lr \cdot \hat m / \sqrt{\max(\hat v - \text{variance\_offset}, \gamma)}

    There is no eps term: gamma is the floor under the corrected variance. When g is a
    noisy gradient whose noise has known variance sigma_g^2 per coordinate, passing
    variance_offset = sigma_g^2 removes that noise from the second moment. For DP-SGD
    noise that is (noise_multiplier * max_grad_norm / expected_batch_size)^2.

    m and v are float32 (float64 for float64 parameters), whatever the parameter dtype,
    because the subtraction of a small offset needs more precision than bfloat16 gives.

    Args:
        params: parameters or parameter groups.
        lr: learning rate (>= 0).
        betas: (beta1, beta2), each in [0, 1).
        weight_decay: decoupled weight decay coefficient (>= 0), multiplied by lr.
        variance_offset: variance subtracted from the bias-corrected second moment (>= 0),
            in squared gradient units.
        gamma: floor of the corrected variance (> 0), in squared gradient units.
    """

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        weight_decay: float = 0.0,
        variance_offset: float = 0.0,
        gamma: float = 1e-8,
    ) -> None:
        defaults = {
            "lr": lr,
            "betas": betas,
            "weight_decay": weight_decay,
            "variance_offset": variance_offset,
            "gamma": gamma,
        }
        _validate_settings(defaults)
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict) -> None:
        settings = {**self.defaults, **param_group}
        settings.pop("params", None)
        _validate_settings(settings)
        super().add_param_group(param_group)

    @torch.no_grad()
    def step(self, closure=None):
        """Update every parameter that has a gradient, and return the closure's loss if given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                if param.grad.is_sparse:
                    raise RuntimeError("AdamBC does not support sparse gradients. Use dense ones, e.g. nn.Embedding(sparse=False).")
                state = self.state[param]
                compute_dtype = torch.float64 if param.dtype == torch.float64 else torch.float32
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(param, dtype=compute_dtype, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(param, dtype=compute_dtype, memory_format=torch.preserve_format)
                state["step"] += 1
                step = state["step"]
                grad = param.grad.to(compute_dtype)
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                exp_avg.lerp_(grad, 1 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)

                corrected_variance = exp_avg_sq / (1 - beta2**step)
                denominator = corrected_variance.sub_(group["variance_offset"]).clamp_(min=group["gamma"]).sqrt_()
                update = (exp_avg / (1 - beta1**step)).div_(denominator)

                new_param = param.to(compute_dtype)
                if group["weight_decay"]:
                    new_param = new_param.mul(1 - group["lr"] * group["weight_decay"])
                new_param = new_param.add_(update, alpha=-group["lr"])
                param.copy_(new_param)
        return loss

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a state from `state_dict()`, keeping the float32 moments of 16-bit parameters."""
        saved_state = state_dict["state"]
        super().load_state_dict({**state_dict, "state": {}})
        saved_ids = [index for group in state_dict["param_groups"] for index in group["params"]]
        params = [param for group in self.param_groups for param in group["params"]]
        for saved_id, param in zip(saved_ids, params, strict=True):
            if saved_id in saved_state:
                self.state[param] = {
                    key: value.to(device=param.device, copy=True) if isinstance(value, Tensor) else value
                    for key, value in saved_state[saved_id].items()
                }


def _validate_settings(settings: dict) -> None:
    """Raise ValueError or TypeError naming the first invalid hyperparameter."""
    betas = settings["betas"]
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
    checks = [
        ("lr", settings["lr"], 0.0, True),
        ("betas[0]", betas[0], 0.0, True),
        ("betas[1]", betas[1], 0.0, True),
        ("weight_decay", settings["weight_decay"], 0.0, True),
        ("variance_offset", settings["variance_offset"], 0.0, True),
        ("gamma", settings["gamma"], 0.0, False),
    ]
    for name, value, low, low_inclusive in checks:
        if isinstance(value, bool) or not isinstance(value, Real) or math.isnan(value):
            raise TypeError(f"{name} must be a real number, got {value!r}")
        if value < low or (value == low and not low_inclusive):
            bracket = "[" if low_inclusive else "("
            raise ValueError(f"{name} must be in {bracket}{low}, inf), got {value!r}")
    for position, beta in enumerate(betas):
        if beta >= 1.0:
            raise ValueError(f"betas[{position}] must be in [0, 1), got {beta!r}")
