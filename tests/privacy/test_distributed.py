"""Tests of the privatizer and sampler across two processes (gloo on loopback)."""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from privatizer_testing import RecordingSGD, set_grad_samples
from torch import nn

from hf_dp_microadam.privacy.dp_optimizer import DPOptimizer
from hf_dp_microadam.privacy.sampling import PoissonBatchSampler

pytestmark = pytest.mark.multiprocess

WORLD_SIZE = 2
NOISE_SEED = 31
SHAPES = [(3, 2), (3,)]
NOISE_MULTIPLIER, MAX_GRAD_NORM, EXPECTED_BATCH_SIZE = 0.8, 1.0, 4


def _per_example_grads():
    """Per-example gradients of two logical steps: 5 examples, then 1 (rank 1 empty)."""
    generator = torch.Generator().manual_seed(0)
    first = [torch.randn(5, *shape, generator=generator) for shape in SHAPES]
    first[0][2] *= 100  # one example is clipped
    second = [torch.randn(1, *shape, generator=generator) for shape in SHAPES]
    return [first, second]


def _share(grads, rank):
    """Rank 0 gets the examples at even positions, rank 1 those at odd positions."""
    return [grad[rank::WORLD_SIZE] for grad in grads]


def _make_optimizer(noise_seed):
    params = [nn.Parameter(torch.zeros(shape)) for shape in SHAPES]
    inner = RecordingSGD(params, lr=0.1)
    optimizer = DPOptimizer(
        inner,
        noise_multiplier=NOISE_MULTIPLIER,
        max_grad_norm=MAX_GRAD_NORM,
        expected_batch_size=EXPECTED_BATCH_SIZE,
        noise_seed=noise_seed,
    )
    return params, optimizer, inner


def _worker(rank, store_path, output_dir):
    dist.init_process_group(
        "gloo", init_method=f"file://{store_path}", rank=rank, world_size=WORLD_SIZE
    )
    try:
        # Only rank 0's generator matters; rank 1 uses an unseeded one.
        params, optimizer, inner = _make_optimizer(NOISE_SEED if rank == 0 else None)
        for logical_step in _per_example_grads():
            share = _share(logical_step, rank)
            # Two micro-batches per rank: the first example, then the rest.
            set_grad_samples(params, [grad[:1] for grad in share])
            optimizer.clip_and_accumulate()
            set_grad_samples(params, [grad[1:] for grad in share])
            optimizer.step()

        # The sampler shares a seed drawn from os.urandom on rank 0.
        sampler = PoissonBatchSampler(50, 10, steps_per_epoch=5, num_replicas=WORLD_SIZE, rank=rank)
        shares = list(sampler)
        all_shares = [None] * WORLD_SIZE
        dist.all_gather_object(all_shares, shares)

        # In secure_mode rank 0 shares a ChaCha20 key drawn from os.urandom instead.
        secure_sampler = PoissonBatchSampler(
            50, 10, steps_per_epoch=5, num_replicas=WORLD_SIZE, rank=rank, secure_mode=True
        )
        secure_shares = [None] * WORLD_SIZE
        dist.all_gather_object(secure_shares, list(secure_sampler))

        torch.save(
            {
                "received": inner.received,
                "params": [param.detach().clone() for param in params],
                "logical_steps": optimizer.logical_steps,
                "noise_draws": optimizer.noise_draws,
                "sampler_shares": all_shares,
                "secure_sampler_shares": secure_shares,
            },
            f"{output_dir}/rank{rank}.pt",
        )
    finally:
        dist.destroy_process_group()


def test_two_processes_match_single_process(tmp_path, monkeypatch):
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    mp.spawn(_worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=WORLD_SIZE, join=True)
    results = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(WORLD_SIZE)]

    # Every rank hands the identical privatized gradient to its update rule.
    for step in range(2):
        for grad_rank0, grad_rank1 in zip(results[0]["received"][step], results[1]["received"][step]):
            assert torch.equal(grad_rank0, grad_rank1)
    for param_rank0, param_rank1 in zip(results[0]["params"], results[1]["params"]):
        assert torch.equal(param_rank0, param_rank1)

    # One noise draw per logical step, on rank 0 only.
    assert results[0]["logical_steps"] == results[1]["logical_steps"] == 2
    assert results[0]["noise_draws"] == 2
    assert results[1]["noise_draws"] == 0

    # The same as one process on the union of the per-example gradients.
    params, optimizer, inner = _make_optimizer(NOISE_SEED)
    for logical_step in _per_example_grads():
        set_grad_samples(params, logical_step)
        optimizer.step()
    for step in range(2):
        for expected, actual in zip(inner.received[step], results[0]["received"][step]):
            assert torch.allclose(expected, actual, atol=1e-6)
    assert optimizer.noise_draws == 2

    # Sampler shares on the two ranks are disjoint and come from one shared seed (or key).
    for key in ("sampler_shares", "secure_sampler_shares"):
        shares_rank0, shares_rank1 = results[0][key]
        assert results[1][key] == results[0][key]
        for share0, share1 in zip(shares_rank0, shares_rank1):
            assert not set(share0) & set(share1)
            # Both shares come from one sorted logical batch, split by position.
            logical_batch = sorted(share0 + share1)
            assert share0 == logical_batch[0::2]
            assert share1 == logical_batch[1::2]
        assert sum(len(share) for share in shares_rank0 + shares_rank1) > 0
