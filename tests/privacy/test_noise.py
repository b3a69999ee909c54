"""Tests of the Gaussian noise sources: distribution, seeding and saved state."""

import math

import pytest
import torch

from hf_dp_microadam.privacy.noise import (
    SecureGaussianNoise,
    TorchGaussianNoise,
    create_noise_source,
)

# With n draws the sample standard deviation has a relative standard error of about
# 1 / sqrt(2 n): 0.16% for n = 200_000, so a 2% tolerance is more than 12 standard errors.
NUM_DRAWS = 200_000
STD_TOLERANCE = 0.02


def _excess_kurtosis(values: torch.Tensor) -> float:
    centred = values.double() - values.double().mean()
    return float((centred**4).mean() / (centred**2).mean() ** 2 - 3.0)


def test_torch_noise_std_and_mean():
    noise = TorchGaussianNoise(seed=0).sample((NUM_DRAWS,), std=2.5)
    assert noise.dtype == torch.float32
    assert noise.std().item() == pytest.approx(2.5, rel=STD_TOLERANCE)
    # Standard error of the mean: 2.5 / sqrt(200_000) = 0.0056.
    assert abs(noise.mean().item()) < 0.06


def test_default_generator_ignores_global_seed():
    torch.manual_seed(1234)
    first = TorchGaussianNoise().sample((64,), std=1.0)
    torch.manual_seed(1234)
    second = TorchGaussianNoise().sample((64,), std=1.0)
    assert not torch.equal(first, second)


def test_default_generator_leaves_global_rng_alone():
    torch.manual_seed(7)
    expected = torch.rand(8)
    torch.manual_seed(7)
    TorchGaussianNoise().sample((1000,), std=1.0)
    assert torch.equal(torch.rand(8), expected)


def test_noise_seed_reproduces():
    first = TorchGaussianNoise(seed=42).sample((3, 5), std=0.7)
    second = TorchGaussianNoise(seed=42).sample((3, 5), std=0.7)
    other = TorchGaussianNoise(seed=43).sample((3, 5), std=0.7)
    assert torch.equal(first, second)
    assert not torch.equal(first, other)


def test_generator_state_round_trip():
    source = TorchGaussianNoise(seed=3)
    source.sample((10,), std=1.0)
    state = source.state_dict()
    expected = source.sample((10,), std=1.0)

    restored = TorchGaussianNoise(seed=999)
    restored.load_state_dict(state)
    assert restored.restorable
    assert torch.equal(restored.sample((10,), std=1.0), expected)


def test_zero_std_draws_nothing():
    source = TorchGaussianNoise(seed=5)
    state_before = source.state_dict()["generator_state"].clone()
    zeros = source.sample((4, 4), std=0.0, dtype=torch.float64)
    assert torch.equal(zeros, torch.zeros(4, 4, dtype=torch.float64))
    assert torch.equal(source.state_dict()["generator_state"], state_before)


def test_requested_dtype_and_shape():
    for source in (TorchGaussianNoise(seed=0), SecureGaussianNoise()):
        noise = source.sample((2, 3, 4), std=1.0, dtype=torch.float64)
        assert noise.shape == (2, 3, 4)
        assert noise.dtype == torch.float64


def test_secure_noise_std_mean_and_shape_of_tails():
    noise = SecureGaussianNoise(chunk_size=1 << 16).sample((NUM_DRAWS,), std=0.3)
    assert noise.std().item() == pytest.approx(0.3, rel=STD_TOLERANCE)
    assert abs(noise.mean().item()) < 0.3 * 0.025
    # A Gaussian has excess kurtosis 0 (uniform: -1.2). Its standard error here is
    # sqrt(24 / n) = 0.011, so 0.1 is about 9 standard errors.
    assert abs(_excess_kurtosis(noise)) < 0.1


def test_secure_noise_differs_between_sources_and_calls():
    source = SecureGaussianNoise()
    first = source.sample((32,), std=1.0)
    second = source.sample((32,), std=1.0)
    third = SecureGaussianNoise().sample((32,), std=1.0)
    assert not torch.equal(first, second)
    assert not torch.equal(first, third)


def test_secure_noise_ignores_global_seed():
    torch.manual_seed(0)
    first = SecureGaussianNoise().sample((16,), std=1.0)
    torch.manual_seed(0)
    second = SecureGaussianNoise().sample((16,), std=1.0)
    assert not torch.equal(first, second)


def test_secure_mode_not_seedable():
    with pytest.raises(ValueError, match="cannot be seeded"):
        create_noise_source(secure_mode=True, seed=1)
    assert isinstance(create_noise_source(secure_mode=True), SecureGaussianNoise)
    assert isinstance(create_noise_source(seed=1), TorchGaussianNoise)


def test_secure_state_is_not_restorable():
    source = SecureGaussianNoise()
    state = source.state_dict()
    assert source.restorable is False
    assert state == {"source": "secure", "restorable": False}
    source.load_state_dict(state)


def test_state_of_other_source_rejected():
    with pytest.raises(ValueError, match="secure_mode"):
        SecureGaussianNoise().load_state_dict(TorchGaussianNoise(seed=0).state_dict())
    with pytest.raises(ValueError, match="secure_mode"):
        TorchGaussianNoise(seed=0).load_state_dict(SecureGaussianNoise().state_dict())


def test_secure_noise_odd_sizes_across_chunks():
    source = SecureGaussianNoise(chunk_size=6)
    noise = source.sample((5, 7), std=1.0)
    assert noise.shape == (5, 7)
    assert torch.isfinite(noise).all()
    # 35 values from 6 chunks: no chunk may repeat another's values.
    assert len(set(noise.flatten().tolist())) == 35
    assert math.isfinite(noise.sum().item())
