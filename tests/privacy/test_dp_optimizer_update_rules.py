"""Tests of the privatizer around the package's update rules: DPMicroAdam and the factory."""

import pytest
import torch
from opacus.grad_sample import GradSampleHooks
from privatizer_testing import set_grad_samples
from torch import nn

from hf_dp_microadam.optim import AdamBC, MicroAdam
from hf_dp_microadam.privacy.dp_optimizer import DPMicroAdam, DPOptimizer, make_dp_optimizer
from hf_dp_microadam.privacy.sampling import split_into_micro_batches

pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning")

PRIVACY = {"noise_multiplier": 1.2, "max_grad_norm": 0.8, "expected_batch_size": 16}


def _params(seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(6, 5, generator=generator)), nn.Parameter(torch.randn(5, generator=generator))]


def _factory(name, params, **overrides):
    settings = {"lr": 0.01, **PRIVACY, **overrides}
    return make_dp_optimizer(name, params, **settings)


@pytest.mark.parametrize(
    "name, update_rule",
    [("dp-microadam", MicroAdam), ("dp-adam", torch.optim.AdamW), ("dp-adambc", AdamBC), ("dp-sgd", torch.optim.SGD)],
)
def test_factory_builds_update_rule(name, update_rule):
    optimizer = _factory(name, _params())
    assert isinstance(optimizer, DPOptimizer)
    assert type(optimizer.original_optimizer) is update_rule
    assert optimizer.param_groups[0]["lr"] == 0.01
    assert optimizer.noise_multiplier == PRIVACY["noise_multiplier"]
    assert optimizer.max_grad_norm == PRIVACY["max_grad_norm"]
    assert optimizer.expected_batch_size == PRIVACY["expected_batch_size"]


def test_factory_adambc_variance_offset():
    optimizer = _factory("dp-adambc", _params(), adambc_gamma=1e-6, betas=(0.8, 0.99))
    group = optimizer.param_groups[0]
    expected = (1.2 * 0.8 / 16) ** 2
    assert group["variance_offset"] == pytest.approx(expected, rel=1e-12)
    assert group["gamma"] == 1e-6
    assert group["betas"] == (0.8, 0.99)


def test_factory_adambc_zero_noise_has_no_offset():
    optimizer = _factory("dp-adambc", _params(), noise_multiplier=0.0)
    assert optimizer.param_groups[0]["variance_offset"] == 0.0
    unclipped = _factory("dp-adambc", _params(), noise_multiplier=0.0, max_grad_norm=float("inf"))
    assert unclipped.param_groups[0]["variance_offset"] == 0.0


def test_factory_sgd_momentum():
    assert _factory("dp-sgd", _params()).param_groups[0]["momentum"] == 0.0
    assert _factory("dp-sgd", _params(), momentum=0.9).param_groups[0]["momentum"] == 0.9


def test_factory_microadam_settings():
    optimizer = _factory("dp-microadam", _params(), density=0.5, window=3, quant_bucket=16, error_feedback="fp32")
    group = optimizer.param_groups[0]
    assert (group["density"], group["window"], group["quant_bucket"], group["error_feedback"]) == (0.5, 3, 16, "fp32")


def test_factory_privacy_options():
    optimizer = _factory("dp-adam", _params(), clipping="per_layer", secure_mode=True)
    assert optimizer.clipping == "per_layer"
    assert optimizer.noise_source.restorable is False

    first, second = _params(), _params()
    for params in (first, second):
        seeded = _factory("dp-sgd", params, noise_seed=5)
        seeded.step()
    for param_first, param_second in zip(first, second):
        assert torch.equal(param_first, param_second)


def test_dp_microadam_matches_microadam():
    settings = {"lr": 0.05, "density": 0.5, "window": 3, "error_feedback": "fp32"}
    private_params, reference_params = _params(), _params()
    optimizer = DPMicroAdam(private_params, 0.0, 100.0, 4, **settings)
    reference = MicroAdam(reference_params, **settings)
    generator = torch.Generator().manual_seed(1)

    for _ in range(4):
        per_example = [torch.randn(3, *param.shape, generator=generator) for param in private_params]
        set_grad_samples(private_params, per_example)
        optimizer.step()
        for param, grads in zip(reference_params, per_example):
            param.grad = grads.sum(0) / 4
        reference.step()

    for private, expected in zip(private_params, reference_params):
        assert torch.allclose(private, expected, atol=1e-6)
    assert optimizer.state[private_params[0]]["step"] == 4


def test_dp_microadam_noise_reaches_update():
    params_without, params_with = _params(), _params()
    DPMicroAdam(params_without, 0.0, 1.0, 4, lr=0.05, density=0.5).step()
    DPMicroAdam(params_with, 1.0, 1.0, 4, lr=0.05, density=0.5, noise_seed=0).step()
    assert all(torch.equal(param, original) for param, original in zip(params_without, _params()))
    assert not torch.equal(params_with[0], _params()[0])


def test_dp_microadam_keyword_options():
    optimizer = DPMicroAdam(_params(), 1.0, 1.0, 8, clipping="per_layer", noise_seed=3, lr=0.1, window=4)
    assert optimizer.clipping == "per_layer"
    assert optimizer.param_groups[0]["window"] == 4
    with pytest.raises(ValueError, match="cannot be seeded"):
        DPMicroAdam(_params(), 1.0, 1.0, 8, secure_mode=True, noise_seed=3)
    with pytest.raises(TypeError):
        DPMicroAdam(_params(), 1.0, 1.0, 8, momentum=0.9)


def _hooked_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 3))
    GradSampleHooks(model, loss_reduction="sum")
    return model


@pytest.mark.parametrize("mode", ["clip_and_accumulate", "signal_skip_step"])
def test_dp_microadam_virtual_steps(mode):
    generator = torch.Generator().manual_seed(2)
    features, labels = torch.randn(6, 4, generator=generator), torch.randint(0, 3, (6,), generator=generator)

    def run(micro_batch_size, mode):
        model = _hooked_model()
        optimizer = DPMicroAdam(model.parameters(), 0.7, 1.0, 6, lr=0.05, density=0.5, noise_seed=11)
        for _ in range(3):
            micro_batches = split_into_micro_batches(list(range(6)), micro_batch_size)
            for position, indices in enumerate(micro_batches):
                losses = nn.functional.cross_entropy(model(features[indices]), labels[indices], reduction="none")
                losses.sum().backward()
                last = position == len(micro_batches) - 1
                if mode == "signal_skip_step":
                    optimizer.signal_skip_step(do_skip=not last)
                    optimizer.step()
                elif not last:
                    optimizer.clip_and_accumulate()
            if mode == "clip_and_accumulate":
                optimizer.step()
            model.zero_grad()
        return model, optimizer

    whole_model, _ = run(6, "clip_and_accumulate")
    split_model, optimizer = run(2, mode)
    assert optimizer.logical_steps == 3
    assert optimizer.noise_draws == 3
    for param in split_model.parameters():
        assert optimizer.state[param]["step"] == 3
    for expected, actual in zip(whole_model.parameters(), split_model.parameters()):
        assert torch.allclose(expected, actual, atol=1e-5)


@pytest.mark.parametrize("name", ["dp-microadam", "dp-adam", "dp-adambc", "dp-sgd"])
def test_factory_optimizers_reduce_loss(name):
    generator = torch.Generator().manual_seed(3)
    features = torch.randn(32, 4, generator=generator)
    labels = (features[:, 0] > 0).long()
    model = _hooked_model()
    optimizer = make_dp_optimizer(
        name,
        model.parameters(),
        lr=0.05,
        noise_multiplier=0.0,
        max_grad_norm=10.0,
        expected_batch_size=32,
        density=0.5,
    )

    def loss():
        return nn.functional.cross_entropy(model(features), labels, reduction="none")

    # Forward passes without a backward pass run under no_grad, because Opacus' hooks
    # would otherwise keep their activations and miss the next per-example gradient.
    with torch.no_grad():
        initial = loss().mean().item()
    for _ in range(30):
        loss().sum().backward()
        optimizer.step()
    with torch.no_grad():
        final = loss().mean().item()
    assert final < 0.9 * initial
