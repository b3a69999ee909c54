"""Tests of Poisson sampling, micro-batch splitting and the sampler checks."""

import itertools

import pytest
import torch
from torch.utils.data import DataLoader, IterableDataset, TensorDataset, default_collate

from hf_dp_microadam.privacy.sampling import (
    PoissonBatchSampler,
    check_dataset_supports_poisson,
    check_poisson_data_loader,
    check_poisson_sampling,
    collate_allowing_empty,
    split_into_micro_batches,
)


def _batches(sampler, count):
    """Return the next `count` batches, crossing epoch boundaries."""
    result = []
    while len(result) < count:
        for batch in sampler:
            result.append(batch)
            if len(result) == count:
                break
    return result


def test_sample_rate_and_default_steps():
    sampler = PoissonBatchSampler(1000, 64, seed=0)
    assert sampler.sample_rate == 64 / 1000
    assert len(sampler) == round(1000 / 64) == 16
    assert len(list(sampler)) == 16
    assert len(PoissonBatchSampler(10, 10, seed=0)) == 1
    assert len(PoissonBatchSampler(1000, 64, steps_per_epoch=5, seed=0)) == 5


def test_inclusion_frequency_matches_sample_rate():
    num_examples, expected_batch_size, steps = 200, 20, 4000
    sampler = PoissonBatchSampler(
        num_examples, expected_batch_size, steps_per_epoch=steps, seed=11
    )
    counts = torch.zeros(num_examples)
    batch_sizes = []
    for batch in sampler:
        counts[batch] += 1
        batch_sizes.append(len(batch))
        assert len(set(batch)) == len(batch)

    # Each count is Binomial(4000, 0.1): mean 400, standard deviation 19.
    # 6 standard deviations (114) per example; the seed makes the test deterministic.
    assert (counts - 400).abs().max().item() < 114
    # Mean batch size: standard error sqrt(200 * 0.1 * 0.9 / 4000) = 0.067.
    assert sum(batch_sizes) / steps == pytest.approx(20, abs=0.5)
    # Batch sizes vary: they are not fixed-size batches.
    assert len(set(batch_sizes)) > 5


def test_empty_batches_are_yielded():
    # q = 0.1 over 10 examples: a batch is empty with probability 0.9^10 = 0.35.
    sampler = PoissonBatchSampler(10, 1, steps_per_epoch=60, seed=3)
    batches = list(sampler)
    assert len(batches) == 60
    assert [] in batches
    assert any(len(batch) > 0 for batch in batches)


def test_seed_reproduces_sequence():
    first = _batches(PoissonBatchSampler(500, 50, seed=21), 25)
    second = _batches(PoissonBatchSampler(500, 50, seed=21), 25)
    other = _batches(PoissonBatchSampler(500, 50, seed=22), 25)
    assert first == second
    assert first != other


def test_default_seed_ignores_global_seed():
    torch.manual_seed(0)
    first = list(PoissonBatchSampler(1000, 100, steps_per_epoch=3))
    torch.manual_seed(0)
    second = list(PoissonBatchSampler(1000, 100, steps_per_epoch=3))
    assert first != second


def test_epochs_continue_the_sequence():
    sampler = PoissonBatchSampler(300, 30, steps_per_epoch=4, seed=5)
    epoch_one, epoch_two = list(sampler), list(sampler)
    assert epoch_one != epoch_two
    assert epoch_one + epoch_two == _batches(PoissonBatchSampler(300, 30, steps_per_epoch=4, seed=5), 8)


@pytest.mark.parametrize("consumed_in_epoch", [0, 2, 3, 5])
def test_state_dict_resumes_exact_sequence(consumed_in_epoch):
    steps_per_epoch = 5
    reference = _batches(PoissonBatchSampler(400, 40, steps_per_epoch=steps_per_epoch, seed=8), 15)

    sampler = PoissonBatchSampler(400, 40, steps_per_epoch=steps_per_epoch, seed=8)
    list(sampler)  # epoch 0
    iterator = iter(sampler)
    for _ in range(consumed_in_epoch):
        next(iterator)
    state = sampler.state_dict()

    resumed = PoissonBatchSampler(400, 40, steps_per_epoch=steps_per_epoch, seed=12345)
    resumed.load_state_dict(state)
    done = steps_per_epoch + consumed_in_epoch
    assert _batches(resumed, 15 - done) == reference[done:]


def test_state_dict_with_prefetched_batches():
    reference = _batches(PoissonBatchSampler(400, 40, steps_per_epoch=6, seed=9), 12)
    sampler = PoissonBatchSampler(400, 40, steps_per_epoch=6, seed=9)
    iterator = iter(sampler)
    for _ in range(4):  # a loader fetched 4 batches, but training used only 3
        next(iterator)
    state = sampler.state_dict(batches_consumed=3)
    assert state["position"] == 3

    resumed = PoissonBatchSampler(400, 40, steps_per_epoch=6, seed=0)
    resumed.load_state_dict(state)
    assert _batches(resumed, 9) == reference[3:]

    with pytest.raises(ValueError, match="batches_consumed"):
        sampler.state_dict(batches_consumed=5)


def test_state_dict_before_first_epoch():
    reference = list(PoissonBatchSampler(100, 10, seed=4))
    state = PoissonBatchSampler(100, 10, seed=4).state_dict()
    resumed = PoissonBatchSampler(100, 10, seed=5)
    resumed.load_state_dict(state)
    assert list(resumed) == reference


def test_state_dict_survives_serialization(tmp_path):
    sampler = PoissonBatchSampler(100, 10, steps_per_epoch=4, seed=4)
    iterator = iter(sampler)
    next(iterator)
    torch.save(sampler.state_dict(), tmp_path / "sampler.pt")
    expected = list(iterator)

    resumed = PoissonBatchSampler(100, 10, steps_per_epoch=4)
    resumed.load_state_dict(torch.load(tmp_path / "sampler.pt"))
    assert list(resumed) == expected


def test_state_from_other_configuration_rejected():
    state = PoissonBatchSampler(100, 10, seed=1).state_dict()
    with pytest.raises(ValueError, match="expected_batch_size"):
        PoissonBatchSampler(100, 20, seed=1).load_state_dict(state)
    with pytest.raises(ValueError, match="num_examples"):
        PoissonBatchSampler(101, 10, seed=1).load_state_dict(state)


@pytest.mark.parametrize("num_replicas", [2, 3])
def test_replica_shares_disjoint_and_complete(num_replicas):
    steps = 30
    logical = list(PoissonBatchSampler(97, 12, steps_per_epoch=steps, seed=17))
    shares = [
        list(PoissonBatchSampler(97, 12, steps_per_epoch=steps, seed=17, num_replicas=num_replicas, rank=rank))
        for rank in range(num_replicas)
    ]
    for step in range(steps):
        per_rank = [set(shares[rank][step]) for rank in range(num_replicas)]
        for first, second in itertools.combinations(per_rank, 2):
            assert not first & second
        assert set().union(*per_rank) == set(logical[step])
        assert sum(len(share) for share in per_rank) == len(logical[step])
        sizes = [len(share) for share in per_rank]
        assert max(sizes) - min(sizes) <= 1


def test_replicas_need_shared_seed():
    with pytest.raises(ValueError, match="same sampler seed"):
        PoissonBatchSampler(100, 10, num_replicas=2, rank=0)


def test_invalid_arguments_rejected():
    with pytest.raises(ValueError, match="expected_batch_size"):
        PoissonBatchSampler(10, 11)
    with pytest.raises(ValueError, match="expected_batch_size"):
        PoissonBatchSampler(10, 0)
    with pytest.raises(ValueError, match="num_examples"):
        PoissonBatchSampler(0, 1)
    with pytest.raises(ValueError, match="rank"):
        PoissonBatchSampler(10, 1, num_replicas=2, rank=2, seed=0)


def test_split_into_micro_batches():
    assert split_into_micro_batches([4, 8, 15, 16, 23, 42, 7], 3) == [[4, 8, 15], [16, 23, 42], [7]]
    assert split_into_micro_batches([], 3) == []
    assert split_into_micro_batches([1, 2], 5) == [[1, 2]]

    tensors = split_into_micro_batches(torch.arange(5), 2)
    assert [chunk.tolist() for chunk in tensors] == [[0, 1], [2, 3], [4]]

    batch = {"input_ids": torch.ones(5, 3), "labels": torch.arange(5)}
    chunks = split_into_micro_batches(batch, 2)
    assert [chunk["labels"].tolist() for chunk in chunks] == [[0, 1], [2, 3], [4]]
    assert [chunk["input_ids"].shape[0] for chunk in chunks] == [2, 2, 1]

    with pytest.raises(ValueError, match="different lengths"):
        split_into_micro_batches({"a": torch.ones(2), "b": torch.ones(3)}, 2)
    with pytest.raises(ValueError, match="max_micro_batch_size"):
        split_into_micro_batches([1], 0)


def test_data_loader_with_empty_batches():
    dataset = TensorDataset(torch.arange(10.0).unsqueeze(1), torch.arange(10))
    sampler = PoissonBatchSampler(len(dataset), 1, steps_per_epoch=40, seed=3)
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_allowing_empty(default_collate))
    check_poisson_data_loader(loader, sample_rate=0.1)

    batches = list(loader)
    assert len(batches) == 40
    assert [] in batches
    features, labels = next(batch for batch in batches if len(batch) > 0)
    assert torch.equal(features.squeeze(1).long(), labels)


class _Stream(IterableDataset):
    def __iter__(self):
        return iter(range(10))


def test_iterable_dataset_rejected():
    with pytest.raises(TypeError, match="IterableDataset"):
        check_poisson_sampling(_Stream(), PoissonBatchSampler(10, 2, seed=0))
    with pytest.raises(TypeError, match="IterableDataset"):
        check_poisson_data_loader(DataLoader(_Stream(), batch_size=2))
    with pytest.raises(TypeError, match="map-style"):
        check_dataset_supports_poisson(_Stream())
    with pytest.raises(TypeError, match="map-style"):
        check_dataset_supports_poisson(iter(range(10)))
    check_dataset_supports_poisson(TensorDataset(torch.zeros(3, 1)))
    check_dataset_supports_poisson(list(range(3)))


def test_non_poisson_sampler_rejected():
    dataset = TensorDataset(torch.zeros(20, 1))
    with pytest.raises(TypeError, match="PoissonBatchSampler"):
        check_poisson_data_loader(DataLoader(dataset, batch_size=4, shuffle=True))
    with pytest.raises(TypeError, match="PoissonBatchSampler"):
        check_poisson_sampling(dataset, None)


def test_sample_rate_mismatch_rejected():
    sampler = PoissonBatchSampler(20, 4, seed=0)
    check_poisson_sampling(TensorDataset(torch.zeros(20, 1)), sampler, sample_rate=0.2)
    with pytest.raises(ValueError, match="sample rate"):
        check_poisson_sampling(TensorDataset(torch.zeros(20, 1)), sampler, sample_rate=0.25)


# ---- secure_mode sampling ----


def test_secure_sampler_inclusion_frequency():
    num_examples, batch_size, steps = 200, 20, 300
    sampler = PoissonBatchSampler(num_examples, batch_size, steps_per_epoch=steps, secure_mode=True)

    counts = torch.zeros(num_examples)
    for batch in sampler:
        counts[batch] += 1

    q = batch_size / num_examples
    mean, std = steps * q, (steps * q * (1 - q)) ** 0.5
    # The total over all examples: 8 standard deviations of the sum cannot flake.
    assert abs(counts.sum().item() - num_examples * mean) < 8 * std * num_examples**0.5
    assert counts.min().item() > 0


def test_secure_sampler_rejects_seed():
    with pytest.raises(ValueError, match="cannot be seeded"):
        PoissonBatchSampler(100, 10, seed=1, secure_mode=True)


def test_secure_sampler_ignores_torch_seed():
    torch.manual_seed(0)
    first = list(PoissonBatchSampler(100, 10, steps_per_epoch=3, secure_mode=True))
    torch.manual_seed(0)
    second = list(PoissonBatchSampler(100, 10, steps_per_epoch=3, secure_mode=True))
    assert first != second


def test_secure_sampler_resumes_exact_sequence():
    sampler = PoissonBatchSampler(100, 10, steps_per_epoch=6, secure_mode=True)
    iterator = iter(sampler)
    seen = [next(iterator) for _ in range(2)]
    state = sampler.state_dict()
    rest = list(iterator) + list(sampler)

    restored = PoissonBatchSampler(100, 10, steps_per_epoch=6, secure_mode=True)
    restored.load_state_dict(state)
    assert list(restored) + list(restored) == rest
    assert seen


def test_secure_sampler_state_rejected_by_plain_sampler():
    secure = PoissonBatchSampler(100, 10, steps_per_epoch=2, secure_mode=True)
    list(secure)
    plain = PoissonBatchSampler(100, 10, steps_per_epoch=2, seed=0)
    with pytest.raises((ValueError, RuntimeError)):
        plain.load_state_dict(secure.state_dict())
        list(plain)
