"""Tests of the privatizer: clipping, noise, normalization and one update per logical batch."""

import math

import pytest
import torch
from opacus.grad_sample import GradSampleHooks
from privatizer_testing import RecordingSGD, set_grad_samples
from torch import nn

from hf_dp_microadam.privacy.accounting import PrivacyAccountant
from hf_dp_microadam.privacy.dp_optimizer import DPOptimizer, make_dp_optimizer
from hf_dp_microadam.privacy.sampling import PoissonBatchSampler, split_into_micro_batches

pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning")


def _privatizer(params, *, noise_multiplier=0.0, max_grad_norm=1.0, expected_batch_size=4, **kwargs):
    inner = RecordingSGD(params, lr=0.1)
    optimizer = DPOptimizer(
        inner,
        noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm,
        expected_batch_size=expected_batch_size,
        **kwargs,
    )
    return optimizer, inner


def _joint_norm(tensors):
    return torch.sqrt(sum((tensor.double() ** 2).sum() for tensor in tensors)).item()


def _tiny_model(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    GradSampleHooks(model, loss_reduction="sum")
    return model


def _dataset(size, seed=1):
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(size, 4, generator=generator)
    labels = torch.randint(0, 3, (size,), generator=generator)
    return features, labels


def _accumulate(model, optimizer, features, labels, micro_batch_size):
    """Run forward and backward on each micro-batch and clip it into p.summed_grad."""
    for indices in split_into_micro_batches(list(range(len(features))), micro_batch_size):
        losses = nn.functional.cross_entropy(model(features[indices]), labels[indices], reduction="none")
        losses.sum().backward()
        optimizer.clip_and_accumulate()


# Noise


def test_noise_only_gradient_has_expected_std():
    param = nn.Parameter(torch.zeros(200_000))
    optimizer, inner = _privatizer([param], noise_multiplier=2.0, max_grad_norm=0.5, expected_batch_size=8, noise_seed=0)
    set_grad_samples([param], [torch.zeros(4, 200_000)])
    optimizer.step()

    privatized = inner.received[0][0]
    expected_std = 2.0 * 0.5 / 8
    # Relative standard error of the sample std: 1 / sqrt(2 * 200_000) = 0.16%.
    assert privatized.std().item() == pytest.approx(expected_std, rel=0.02)
    assert abs(privatized.mean().item()) < expected_std * 0.02


def test_secure_mode_gradient_has_expected_std():
    param = nn.Parameter(torch.zeros(100_000))
    optimizer, inner = _privatizer([param], noise_multiplier=1.5, max_grad_norm=2.0, expected_batch_size=10, secure_mode=True)
    optimizer.step()
    assert inner.received[0][0].std().item() == pytest.approx(1.5 * 2.0 / 10, rel=0.03)
    with pytest.raises(ValueError, match="cannot be seeded"):
        _privatizer([param], noise_multiplier=1.0, secure_mode=True, noise_seed=3)


def test_default_noise_ignores_global_seed():
    received = []
    for _ in range(2):
        torch.manual_seed(0)
        param = nn.Parameter(torch.zeros(16))
        optimizer, inner = _privatizer([param], noise_multiplier=1.0)
        optimizer.step()
        received.append(inner.received[0][0])
    assert not torch.equal(received[0], received[1])


def test_noise_seed_reproduces():
    received = []
    for _ in range(2):
        param = nn.Parameter(torch.zeros(16))
        optimizer, inner = _privatizer([param], noise_multiplier=1.0, noise_seed=123)
        optimizer.step()
        received.append(inner.received[0][0])
    assert torch.equal(received[0], received[1])


def test_zero_noise_multiplier_keeps_clipping():
    param = nn.Parameter(torch.zeros(3))
    optimizer, inner = _privatizer([param], noise_multiplier=0.0, max_grad_norm=1.0, expected_batch_size=4)
    set_grad_samples([param], [torch.tensor([[30.0, 40.0, 0.0], [0.3, 0.4, 0.0]])])
    optimizer.step()
    # Example 0 is clipped from norm 50 to 1, example 1 (norm 0.5) is unchanged.
    expected = (torch.tensor([0.6, 0.8, 0.0]) * 50 / (50 + 1e-6) + torch.tensor([0.3, 0.4, 0.0])) / 4
    assert torch.allclose(inner.received[0][0], expected, atol=1e-6)
    assert optimizer.noise_draws == 0


# Clipping


def test_infinite_clip_norm_without_noise():
    param = nn.Parameter(torch.zeros(2))
    optimizer, inner = _privatizer([param], max_grad_norm=float("inf"), expected_batch_size=2)
    param.grad_sample = torch.tensor([[300.0, 400.0], [1.0, 0.0]])
    optimizer.step()
    assert torch.equal(inner.received[0][0], torch.tensor([150.5, 200.0]))
    assert optimizer.noise_draws == 0


def test_huge_gradient_clipped_to_norm():
    weight, bias = nn.Parameter(torch.zeros(5, 3)), nn.Parameter(torch.zeros(5))
    optimizer, inner = _privatizer([weight, bias], max_grad_norm=0.7, expected_batch_size=1)
    huge = [torch.full((1, 5, 3), 1e6), torch.full((1, 5), -3e5)]
    set_grad_samples([weight, bias], huge)
    optimizer.step()

    contribution = inner.received[0]
    norm = _joint_norm(contribution)
    assert norm <= 0.7 * (1 + 1e-6)
    assert norm == pytest.approx(0.7, rel=1e-5)
    # Flat clipping rescales, so the direction is unchanged.
    direction = torch.cat([grad.flatten() for grad in huge]) / _joint_norm(huge)
    assert torch.allclose(torch.cat([grad.flatten() for grad in contribution]) / norm, direction, atol=1e-6)


def test_flat_and_per_layer_clipping_norms():
    # One example whose gradient has norm 3 on the first tensor and 4 on the second.
    grads = [torch.tensor([[3.0, 0.0]]), torch.tensor([[0.0, 4.0]])]
    results = {}
    for clipping in ("flat", "per_layer"):
        params = [nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(2))]
        optimizer, inner = _privatizer(params, max_grad_norm=1.0, expected_batch_size=1, clipping=clipping)
        set_grad_samples(params, grads)
        optimizer.step()
        results[clipping] = [grad.norm().item() for grad in inner.received[0]]

    # Flat: the joint norm 5 is scaled to 1, keeping the 3:4 ratio.
    assert results["flat"] == pytest.approx([0.6, 0.8], rel=1e-5)
    # Per layer: each of the 2 tensors is clipped to 1 / sqrt(2), so the joint norm is 1.
    assert results["per_layer"] == pytest.approx([1 / math.sqrt(2)] * 2, rel=1e-5)
    assert math.hypot(*results["per_layer"]) <= 1.0 + 1e-6


def test_small_gradients_are_not_changed():
    for clipping in ("flat", "per_layer"):
        params = [nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(2))]
        optimizer, inner = _privatizer(params, max_grad_norm=1.0, expected_batch_size=2, clipping=clipping)
        grads = [torch.tensor([[0.1, 0.2], [0.0, -0.3]]), torch.tensor([[0.2, 0.0], [0.1, 0.1]])]
        set_grad_samples(params, grads)
        optimizer.step()
        for received, grad in zip(inner.received[0], grads):
            assert torch.allclose(received, grad.sum(0) / 2, atol=1e-6)


@pytest.mark.parametrize("clipping", ["flat", "per_layer"])
@pytest.mark.parametrize("num_micro_batches", [1, 2, 3])
def test_sensitivity_of_clipped_sum(clipping, num_micro_batches):
    features, labels = _dataset(7)
    # The neighbouring dataset adds one example with a very large gradient.
    extra_features, extra_labels = torch.full((1, 4), 50.0), torch.tensor([2])
    neighbour_features = torch.cat([features[:3], extra_features, features[3:]])
    neighbour_labels = torch.cat([labels[:3], extra_labels, labels[3:]])

    sums = []
    for data_features, data_labels in ((features, labels), (neighbour_features, neighbour_labels)):
        model = _tiny_model()
        optimizer, _ = _privatizer(list(model.parameters()), max_grad_norm=0.5, clipping=clipping)
        micro_batch_size = math.ceil(len(data_features) / num_micro_batches)
        _accumulate(model, optimizer, data_features, data_labels, micro_batch_size)
        sums.append([param.summed_grad.clone() for param in model.parameters()])

    difference = _joint_norm([neighbour - base for base, neighbour in zip(*sums)])
    assert difference <= 0.5 * (1 + 1e-5)
    assert difference > 0.25  # the extra example is clipped, not dropped


def test_clipped_sum_independent_of_split():
    features, labels = _dataset(9)
    sums = []
    for micro_batch_size in (9, 5, 3, 1):
        model = _tiny_model()
        optimizer, _ = _privatizer(list(model.parameters()), max_grad_norm=0.3)
        _accumulate(model, optimizer, features, labels, micro_batch_size)
        sums.append([param.summed_grad.clone() for param in model.parameters()])
    for other in sums[1:]:
        for expected, actual in zip(sums[0], other):
            assert torch.allclose(expected, actual, atol=1e-6)


# One logical step = one noise draw = one update = one accountant step


def _run_logical_step(model, optimizer, features, labels, micro_batch_size, use_skip_signal):
    micro_batches = split_into_micro_batches(list(range(len(features))), micro_batch_size)
    for position, indices in enumerate(micro_batches):
        losses = nn.functional.cross_entropy(model(features[indices]), labels[indices], reduction="none")
        losses.sum().backward()
        last = position == len(micro_batches) - 1
        if use_skip_signal:
            optimizer.signal_skip_step(do_skip=not last)
            optimizer.step()
        elif not last:
            optimizer.clip_and_accumulate()
    if not micro_batches or not use_skip_signal:
        optimizer.step()
    model.zero_grad()


@pytest.mark.parametrize("use_skip_signal", [False, True])
@pytest.mark.parametrize("num_micro_batches", [1, 2, 3])
def test_one_step_per_logical_batch(num_micro_batches, use_skip_signal):
    features, labels = _dataset(6)
    model = _tiny_model()
    optimizer, inner = _privatizer(
        list(model.parameters()), noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=6, noise_seed=4
    )
    accountant = PrivacyAccountant(sample_rate=0.1)
    accountant.attach(optimizer)

    for step in range(1, 4):
        _run_logical_step(model, optimizer, features, labels, 6 // num_micro_batches, use_skip_signal)
        assert optimizer.logical_steps == step
        assert optimizer.noise_draws == step
        assert len(inner.received) == step
        assert accountant.steps == step
        assert accountant.history == [(1.0, 0.1, step)]


def test_privatized_gradient_independent_of_split():
    features, labels = _dataset(6)
    received = []
    for micro_batch_size, use_skip_signal in ((6, False), (3, False), (2, True), (1, True)):
        model = _tiny_model()
        optimizer, inner = _privatizer(
            list(model.parameters()), noise_multiplier=0.5, expected_batch_size=5, noise_seed=9
        )
        _run_logical_step(model, optimizer, features, labels, micro_batch_size, use_skip_signal)
        received.append(inner.received[0])
    for other in received[1:]:
        for expected, actual in zip(received[0], other):
            assert torch.allclose(expected, actual, atol=1e-6)


def test_empty_logical_batch_gives_noise_only_step():
    model = _tiny_model()
    optimizer, inner = _privatizer(list(model.parameters()), noise_multiplier=1.0, expected_batch_size=4)
    accountant = PrivacyAccountant(sample_rate=0.1)
    accountant.attach(optimizer)
    before = [param.detach().clone() for param in model.parameters()]

    optimizer.step()  # no micro-batch at all: p.grad_sample was never set

    assert (optimizer.logical_steps, optimizer.noise_draws, len(inner.received), accountant.steps) == (1, 1, 1, 1)
    for grad, param in zip(inner.received[0], model.parameters()):
        assert grad.shape == param.shape
        assert grad.abs().sum() > 0
    assert all(not torch.equal(old, new) for old, new in zip(before, model.parameters()))


def test_micro_batch_of_size_zero():
    model = _tiny_model()
    optimizer, inner = _privatizer(list(model.parameters()), noise_multiplier=0.0, expected_batch_size=4)
    features, labels = _dataset(3)
    empty = nn.functional.cross_entropy(model(features[:0]), labels[:0], reduction="none")
    empty.sum().backward()
    optimizer.clip_and_accumulate()
    _accumulate(model, optimizer, features, labels, 3)
    optimizer.step()

    reference_model = _tiny_model()
    reference, reference_inner = _privatizer(list(reference_model.parameters()), noise_multiplier=0.0, expected_batch_size=4)
    _accumulate(reference_model, reference, features, labels, 3)
    reference.step()
    for expected, actual in zip(reference_inner.received[0], inner.received[0]):
        assert torch.allclose(expected, actual, atol=1e-7)
    assert optimizer.logical_steps == 1


def test_epoch_with_variable_and_short_batches():
    features, labels = _dataset(40)
    sampler = PoissonBatchSampler(40, 8, seed=2)
    model = _tiny_model()
    optimizer, inner = _privatizer(list(model.parameters()), noise_multiplier=1.0, expected_batch_size=8)
    accountant = PrivacyAccountant(sample_rate=sampler.sample_rate)
    accountant.attach(optimizer)

    micro_batch_counts = []
    for logical_batch in sampler:
        micro_batches = split_into_micro_batches(logical_batch, 3)
        micro_batch_counts.append(len(micro_batches))
        for indices in micro_batches:
            losses = nn.functional.cross_entropy(model(features[indices]), labels[indices], reduction="none")
            losses.sum().backward()
            optimizer.clip_and_accumulate()
        optimizer.step()
        model.zero_grad()

    steps = len(sampler)
    assert len(set(micro_batch_counts)) > 1
    assert (optimizer.logical_steps, optimizer.noise_draws, len(inner.received), accountant.steps) == (steps,) * 4


def test_no_stale_sum_after_model_zero_grad():
    model = _tiny_model()
    optimizer, inner = _privatizer(list(model.parameters()), noise_multiplier=0.0, max_grad_norm=1.0, expected_batch_size=4)
    features, labels = _dataset(5)
    _accumulate(model, optimizer, features, labels, 2)
    optimizer.step()
    assert any(grad.abs().sum() > 0 for grad in inner.received[0])

    for param in model.parameters():
        assert param.grad_sample is None
        assert param.summed_grad is None
        assert param.grad is None

    model.zero_grad()  # what transformers.Trainer calls between steps
    optimizer.step()  # an empty logical batch without noise must give exactly zero
    for grad in inner.received[1]:
        assert torch.count_nonzero(grad) == 0


def test_no_stale_gradient_without_zero_grad():
    model = _tiny_model()
    optimizer, inner = _privatizer(list(model.parameters()), noise_multiplier=0.0, expected_batch_size=1)
    first_features, first_labels = _dataset(2)
    nn.functional.cross_entropy(model(first_features), first_labels, reduction="none").sum().backward()
    optimizer.step()
    after_first_step = {name: value.clone() for name, value in model.state_dict().items()}

    # No zero_grad of any kind before the second step.
    second_features, second_labels = _dataset(1, seed=5)
    nn.functional.cross_entropy(model(second_features), second_labels, reduction="none").sum().backward()
    optimizer.step()

    reference_model = _tiny_model()
    reference_model.load_state_dict(after_first_step)
    reference, reference_inner = _privatizer(list(reference_model.parameters()), noise_multiplier=0.0, expected_batch_size=1)
    nn.functional.cross_entropy(reference_model(second_features), second_labels, reduction="none").sum().backward()
    reference.step()
    for expected, actual in zip(reference_inner.received[0], inner.received[1]):
        assert torch.allclose(expected, actual, atol=1e-7)


def test_zero_grad_keeps_pending_sum():
    param = nn.Parameter(torch.zeros(2))
    optimizer, inner = _privatizer([param], noise_multiplier=0.0, expected_batch_size=2)
    set_grad_samples([param], [torch.tensor([[0.2, 0.0]])])
    optimizer.clip_and_accumulate()
    optimizer.zero_grad()
    set_grad_samples([param], [torch.tensor([[0.0, 0.4]])])
    optimizer.step()
    assert torch.allclose(inner.received[0][0], torch.tensor([0.1, 0.2]))


# Normalization


def test_normalizer_is_configured_batch_size():
    # Neighbouring batches: the second adds one example whose gradient is zero. With
    # the realized batch size as divisor, the results would differ (sum/3 vs sum/4).
    grads = torch.tensor([[0.3, 0.1], [0.2, -0.4], [0.1, 0.1]])
    received = []
    for per_example in (grads, torch.cat([grads, torch.zeros(1, 2)])):
        param = nn.Parameter(torch.zeros(2))
        optimizer, inner = _privatizer([param], noise_multiplier=0.0, expected_batch_size=10)
        set_grad_samples([param], [per_example])
        optimizer.step()
        received.append(inner.received[0][0])
    assert torch.equal(received[0], received[1])
    assert torch.allclose(received[0], grads.sum(0) / 10)


def test_normalizer_ignores_number_of_micro_batches():
    grads = torch.tensor([[0.3, 0.1], [0.2, -0.4], [0.1, 0.1], [0.0, 0.2]])
    param = nn.Parameter(torch.zeros(2))
    optimizer, inner = _privatizer([param], noise_multiplier=0.0, expected_batch_size=3)
    for row in grads:
        set_grad_samples([param], [row.unsqueeze(0)])
        optimizer.clip_and_accumulate()
    optimizer.step()
    assert optimizer.accumulated_iterations == 1
    assert torch.allclose(inner.received[0][0], grads.sum(0) / 3)


# Parameters, dtypes and checks


def test_unused_parameter_gets_noise_only():
    used, unused = nn.Parameter(torch.zeros(3)), nn.Parameter(torch.zeros(4))
    optimizer, inner = _privatizer([used, unused], noise_multiplier=1.0, expected_batch_size=2, noise_seed=1)
    used.grad_sample = torch.ones(2, 3) * 0.1
    optimizer.step()
    assert inner.received[0][1].shape == (4,)
    assert inner.received[0][1].abs().sum() > 0


def test_missing_grad_sample_rejected():
    used, missed = nn.Parameter(torch.zeros(3)), nn.Parameter(torch.zeros(2))
    optimizer, _ = _privatizer([used, missed])
    used.grad_sample = torch.ones(2, 3)
    missed.grad = torch.ones(2)
    with pytest.raises(RuntimeError, match="no per-example gradient"):
        optimizer.step()


def test_mismatched_batch_sizes_rejected():
    first, second = nn.Parameter(torch.zeros(3)), nn.Parameter(torch.zeros(2))
    optimizer, _ = _privatizer([first, second])
    set_grad_samples([first, second], [torch.ones(2, 3), torch.ones(3, 2)])
    with pytest.raises(ValueError, match="different batch sizes"):
        optimizer.clip_and_accumulate()
    first.grad_sample = torch.ones(2, 4)
    second.grad_sample = None
    with pytest.raises(ValueError, match="has shape"):
        optimizer.clip_and_accumulate()


def test_frozen_parameter_ignored():
    trained, frozen = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(2), requires_grad=False)
    optimizer, inner = _privatizer([trained, frozen], noise_multiplier=1.0)
    optimizer.step()
    assert torch.equal(frozen, torch.zeros(2))
    assert inner.received[0][1] is None


def test_bfloat16_parameters():
    param = nn.Parameter(torch.zeros(4, dtype=torch.bfloat16))
    optimizer, inner = _privatizer([param], noise_multiplier=0.0, max_grad_norm=1.0, expected_batch_size=2)
    param.grad_sample = torch.tensor([[300.0, 400.0, 0.0, 0.0], [0.1, 0.0, 0.0, 0.0]], dtype=torch.bfloat16)
    optimizer.step()
    grad = inner.received[0][0]
    assert grad.dtype == torch.bfloat16
    assert torch.allclose(grad.float(), torch.tensor([0.35, 0.4, 0.0, 0.0]), rtol=1e-2)


def test_invalid_arguments_rejected():
    param = nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError, match="noise_multiplier"):
        _privatizer([param], noise_multiplier=-1.0)
    with pytest.raises(ValueError, match="max_grad_norm"):
        _privatizer([param], max_grad_norm=0.0)
    with pytest.raises(ValueError, match="max_grad_norm"):
        _privatizer([param], max_grad_norm=float("nan"))
    with pytest.raises(ValueError, match="only valid with noise_multiplier=0"):
        _privatizer([param], max_grad_norm=float("inf"), noise_multiplier=1.0)
    with pytest.raises(ValueError, match="expected_batch_size"):
        _privatizer([param], expected_batch_size=0)
    with pytest.raises(ValueError, match="clipping"):
        _privatizer([param], clipping="automatic")


def test_step_hooks_run_in_order_and_detach():
    param = nn.Parameter(torch.zeros(2))
    optimizer, _ = _privatizer([param])
    calls = []
    first = optimizer.attach_step_hook(lambda opt: calls.append(("first", opt.logical_steps)))
    optimizer.attach_step_hook(lambda opt: calls.append(("second", opt.logical_steps)))
    optimizer.step()
    first.remove()
    optimizer.step()
    assert calls == [("first", 0), ("second", 0), ("second", 1)]


def test_step_hook_runs_before_update():
    param = nn.Parameter(torch.zeros(2))
    optimizer, inner = _privatizer([param], expected_batch_size=2)
    seen = []

    def hook(opt):
        seen.append((param.detach().clone(), param.grad.clone(), len(inner.received)))

    optimizer.attach_step_hook(hook)
    param.grad_sample = torch.tensor([[0.2, 0.4]])
    optimizer.step()

    value, grad, updates = seen[0]
    assert torch.equal(value, torch.zeros(2))
    assert torch.allclose(grad, torch.tensor([0.1, 0.2]))
    assert updates == 0
    assert len(inner.received) == 1


def test_raising_step_hook_prevents_update():
    param = nn.Parameter(torch.zeros(2))
    optimizer, inner = _privatizer([param], noise_multiplier=1.0)

    def budget_check(opt):
        raise RuntimeError("budget exhausted")

    handle = optimizer.attach_step_hook(budget_check)
    param.grad_sample = torch.ones(3, 2)
    with pytest.raises(RuntimeError, match="budget exhausted"):
        optimizer.step()
    assert torch.equal(param, torch.zeros(2))
    assert inner.received == []
    assert optimizer.logical_steps == 0
    assert param.grad is None
    assert param.summed_grad is None

    handle.remove()
    optimizer.step()
    assert optimizer.logical_steps == 1
    assert len(inner.received) == 1


def test_closure_runs_before_privatization():
    model = _tiny_model()
    optimizer, inner = _privatizer(list(model.parameters()), noise_multiplier=0.0)
    features, labels = _dataset(3)

    def closure():
        loss = nn.functional.cross_entropy(model(features), labels, reduction="none").sum()
        loss.backward()
        return loss

    loss = optimizer.step(closure)
    assert loss.item() > 0
    assert any(grad.abs().sum() > 0 for grad in inner.received[0])


# Checkpoint state


def test_privacy_state_round_trip(tmp_path):
    param = nn.Parameter(torch.zeros(8))
    optimizer, _ = _privatizer([param], noise_multiplier=1.0, noise_seed=5)
    optimizer.step()
    optimizer.step()
    torch.save(optimizer.privacy_state_dict(), tmp_path / "privacy.pt")
    optimizer.step()
    expected_third = optimizer.original_optimizer.received[2][0]

    resumed_param = nn.Parameter(torch.zeros(8))
    resumed, resumed_inner = _privatizer([resumed_param], noise_multiplier=1.0, noise_seed=77)
    resumed.load_privacy_state_dict(torch.load(tmp_path / "privacy.pt"))
    assert resumed.logical_steps == 2
    resumed.step()
    assert torch.equal(resumed_inner.received[0][0], expected_third)
    assert resumed.logical_steps == 3


def test_privacy_state_separate_from_update_rule_state():
    param = nn.Parameter(torch.zeros(2))
    optimizer, inner = _privatizer([param], noise_multiplier=1.0, noise_seed=0)
    optimizer.step()
    assert optimizer.state_dict().keys() == inner.state_dict().keys()
    assert "noise" not in optimizer.state_dict()
    assert "noise" in optimizer.privacy_state_dict()


def test_privacy_state_mid_step_rejected():
    param = nn.Parameter(torch.zeros(2))
    optimizer, _ = _privatizer([param])
    param.grad_sample = torch.ones(1, 2)
    optimizer.clip_and_accumulate()
    with pytest.raises(RuntimeError, match="middle of a logical step"):
        optimizer.privacy_state_dict()


def test_secure_mode_state_mismatch_rejected():
    param = nn.Parameter(torch.zeros(2))
    secure, _ = _privatizer([param], noise_multiplier=1.0, secure_mode=True)
    secure.step()
    state = secure.privacy_state_dict()
    assert state["noise_restorable"] is False
    seeded, _ = _privatizer([nn.Parameter(torch.zeros(2))], noise_multiplier=1.0, noise_seed=0)
    with pytest.raises(ValueError, match="secure_mode"):
        seeded.load_privacy_state_dict(state)
    with pytest.raises(KeyError, match="noise"):
        seeded.load_privacy_state_dict({"logical_steps": 3})


# Factory


def test_unknown_optimizer_name_rejected():
    with pytest.raises(ValueError, match="dp-microadam"):
        make_dp_optimizer(
            "dp-rmsprop",
            [nn.Parameter(torch.zeros(2))],
            lr=0.1,
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            expected_batch_size=4,
        )
