"""AdamBC against a float64 reference of its update rule."""

import io

import pytest
import torch
from torch import nn

from hf_dp_microadam.optim import AdamBC


def reference_run(start, gradients, lr, betas, weight_decay, variance_offset, gamma):
    """Yield (parameter, denominator) after every step, computed in float64."""
    beta1, beta2 = betas
    theta = start.double().clone()
    first = torch.zeros_like(theta)
    second = torch.zeros_like(theta)
    for step, gradient in enumerate(gradients, start=1):
        gradient = gradient.double()
        first = beta1 * first + (1 - beta1) * gradient
        second = beta2 * second + (1 - beta2) * gradient**2
        corrected_first = first / (1 - beta1**step)
        corrected_second = second / (1 - beta2**step)
        denominator = torch.sqrt(torch.clamp(corrected_second - variance_offset, min=gamma))
        theta = theta * (1 - lr * weight_decay) - lr * corrected_first / denominator
        yield theta.clone(), denominator


@pytest.mark.parametrize(
    ("variance_offset", "gamma"),
    [(0.0, 1e-8), (0.5, 1e-8), (0.5, 0.05), (100.0, 1e-3)],
    ids=["no_offset", "partly_floored", "large_gamma", "all_floored"],
)
def test_adambc_matches_reference(variance_offset, gamma):
    lr, betas, weight_decay = 1e-2, (0.9, 0.99), 0.1
    generator = torch.Generator().manual_seed(0)
    start = torch.randn(257, generator=generator)
    gradients = [torch.randn(257, generator=generator) * 1.5 for _ in range(25)]
    param = nn.Parameter(start.clone())
    optimizer = AdamBC(
        [param], lr=lr, betas=betas, weight_decay=weight_decay, variance_offset=variance_offset, gamma=gamma
    )
    floored_steps = 0
    for gradient, (expected, denominator) in zip(
        gradients, reference_run(start, gradients, lr, betas, weight_decay, variance_offset, gamma)
    ):
        param.grad = gradient.clone()
        optimizer.step()
        torch.testing.assert_close(param.detach().double(), expected, rtol=1e-5, atol=1e-6)
        floored_steps += int(bool((denominator == gamma**0.5).any()))
    if variance_offset == 0.0:
        assert floored_steps == 0
    else:
        assert floored_steps > 0


def test_gamma_floor_sets_denominator():
    """With every corrected variance below the offset, the step is lr * m_hat / sqrt(gamma)."""
    gamma, lr = 4e-2, 1e-3
    param = nn.Parameter(torch.zeros(10))
    optimizer = AdamBC([param], lr=lr, betas=(0.5, 0.5), variance_offset=1e6, gamma=gamma)
    gradient = torch.linspace(-1, 1, 10)
    param.grad = gradient.clone()
    optimizer.step()
    # Step 1: m_hat = g.
    torch.testing.assert_close(param.detach(), -lr * gradient / gamma**0.5)


def test_bfloat16_parameter_keeps_float32_moments_across_checkpoint():
    param = nn.Parameter(torch.randn(64).bfloat16())
    optimizer = AdamBC([param], variance_offset=1e-4)
    param.grad = torch.randn(64).bfloat16()
    optimizer.step()
    assert optimizer.state[param]["exp_avg"].dtype == torch.float32

    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    buffer.seek(0)
    resumed_param = nn.Parameter(param.detach().clone())
    resumed = AdamBC([resumed_param], variance_offset=1e-4)
    resumed.load_state_dict(torch.load(buffer))
    assert resumed.state[resumed_param]["exp_avg_sq"].dtype == torch.float32
    gradient = torch.randn(64).bfloat16()
    for p, opt in ((param, optimizer), (resumed_param, resumed)):
        p.grad = gradient.clone()
        opt.step()
    assert torch.equal(param, resumed_param)


@pytest.mark.parametrize(
    ("settings", "error", "match"),
    [
        ({"lr": -1e-3}, ValueError, "lr must be in"),
        ({"betas": (0.9, 1.0)}, ValueError, r"betas\[1\]"),
        ({"weight_decay": -1.0}, ValueError, "weight_decay must be in"),
        ({"variance_offset": -1e-6}, ValueError, "variance_offset must be in"),
        ({"gamma": 0.0}, ValueError, "gamma must be in"),
        ({"gamma": None}, TypeError, "gamma must be a real number"),
    ],
)
def test_invalid_settings_rejected(settings, error, match):
    with pytest.raises(error, match=match):
        AdamBC([nn.Parameter(torch.randn(3))], **settings)
