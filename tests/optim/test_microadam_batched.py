"""MicroAdam's batched update of small tensors against the update of each tensor on its own.

A tensor with at most `block_size` entries is a single top-k block, and the tensors of
a parameter group that share device, dtypes and step are updated together. Putting
every tensor in a group of its own disables the batching, which gives the per-tensor
reference. The float64 reference tests in test_microadam_reference.py check the
per-tensor path against the update rule.
"""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

import hf_dp_microadam.optim._microadam_batched as batched_module
import hf_dp_microadam.optim.microadam as microadam_module
from hf_dp_microadam.optim import MicroAdam

# Tensor sizes: multiples of 64 (aligned with the default buckets and packing spans),
# odd sizes with partial spans and buckets, a tensor of one entry, and one of exactly
# the block size.
SIZES = [(768,), (768,), (3072,), (2, 768), (129,), (7,), (1,), (64, 64), (1000,), (33, 3), (512,)]


def make_params(dtype: torch.dtype, seed: int) -> list[nn.Parameter]:
    generator = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(shape, generator=generator).to(dtype)) for shape in SIZES]


def make_gradient(shape, dtype: torch.dtype, generator: torch.Generator) -> torch.Tensor:
    """Return a random gradient whose entries have distinct magnitudes.

    Where |a| ties at the k-th largest value of a block, either entry may be kept, and
    the two paths may keep different ones. Random bfloat16 values (8 significant bits)
    often tie, so the magnitudes here are distinct: 1 + j / 128 for a random order of j,
    halved for every further 128 entries, which bfloat16 represents exactly. The random
    float32 and float64 gradients get a random scale per entry on top. With these seeds
    a = g + E then has no ties either.
    """
    numel = torch.Size(shape).numel()
    order = torch.randperm(numel, generator=generator)
    magnitudes = (1 + (order % 128) / 128) * torch.exp2(-(order // 128).double())
    if dtype != torch.bfloat16:
        magnitudes *= torch.rand(numel, generator=generator, dtype=torch.float64) + 0.5
    signs = torch.randint(0, 2, (numel,), generator=generator) * 2 - 1
    return (magnitudes * signs * 4).to(dtype).view(shape)


def run_pair(settings: dict, dtype: torch.dtype, steps: int, skip=None):
    """Return the batched and per-tensor optimizers and parameters after `steps` identical steps.

    `skip(step, index)` returns True where a parameter gets no gradient at that step.
    """
    batched_params = make_params(dtype, 0)
    single_params = make_params(dtype, 0)
    batched = MicroAdam(batched_params, **settings)
    single = MicroAdam([{"params": [param]} for param in single_params], **settings)
    generator = torch.Generator().manual_seed(1)
    for step in range(steps):
        for index, (batched_param, single_param) in enumerate(zip(batched_params, single_params)):
            if skip is not None and skip(step, index):
                batched_param.grad = single_param.grad = None
                continue
            gradient = make_gradient(batched_param.shape, dtype, generator)
            batched_param.grad = gradient.clone()
            single_param.grad = gradient.clone()
        batched.step()
        single.step()
    return (batched, batched_params), (single, single_params)


def record_batches(monkeypatch) -> list[int]:
    """Return a list that receives the number of tensors of every batched update."""
    calls = []
    update = batched_module.update_small_tensors

    def recording_update(params, *args):
        calls.append(len(params))
        update(params, *args)

    monkeypatch.setattr(microadam_module, "update_small_tensors", recording_update)
    return calls


def assert_same_state(batched_state: dict, single_state: dict) -> None:
    """The states must be equal bit for bit, except for the order of a window slot's entries."""
    assert batched_state.keys() == single_state.keys()
    assert batched_state["step"] == single_state["step"]
    for key in ("error_codes", "error_bounds", "error"):
        if key in single_state:
            expected = single_state[key]
            assert torch.equal(batched_state[key].view(torch.uint8), expected.view(torch.uint8)), key
    batched_indices, batched_order = batched_state["window_indices"].sort(dim=1)
    single_indices, single_order = single_state["window_indices"].sort(dim=1)
    assert torch.equal(batched_indices, single_indices)
    batched_values = batched_state["window_values"].gather(1, batched_order)
    single_values = single_state["window_values"].gather(1, single_order)
    assert torch.equal(batched_values.view(torch.int16), single_values.view(torch.int16))


CASES = {
    "defaults": ({}, torch.float32),
    "bucket_4096": ({"quant_bucket": 4096}, torch.float32),
    "bucket_7_weight_decay": ({"quant_bucket": 7, "weight_decay": 0.1, "density": 0.05}, torch.float32),
    "fp32_error": ({"error_feedback": "fp32", "density": 0.1, "window": 3}, torch.float32),
    "bf16_weight_decay": ({"weight_decay": 0.1, "lr": 1e-2}, torch.bfloat16),
    "float64": ({"weight_decay": 0.1, "density": 0.05}, torch.float64),
    "small_blocks": ({"block_size": 4096, "window": 4}, torch.float32),
}


@pytest.mark.parametrize("case", list(CASES))
def test_batched_matches_per_tensor(case, monkeypatch):
    settings, dtype = CASES[case]
    calls = record_batches(monkeypatch)
    (batched, batched_params), (single, single_params) = run_pair({"lr": 1e-3, **settings}, dtype, steps=12)

    # Every tensor is a single block, except the one of 4096 entries with smaller blocks.
    single_block = sum(1 for param in batched_params if param.numel() <= settings.get("block_size", 32768))
    assert calls and calls[0] == single_block
    for batched_param, single_param in zip(batched_params, single_params):
        assert torch.equal(batched_param, single_param)
        assert_same_state(batched.state[batched_param], single.state[single_param])


def test_batched_tensors_at_different_steps():
    # Tensor 1 has no gradient every third step, so it falls behind and is batched apart.
    (batched, batched_params), (single, single_params) = run_pair(
        {"lr": 1e-3, "window": 4}, torch.float32, steps=10, skip=lambda step, index: index == 1 and step % 3 == 0
    )
    assert batched.state[batched_params[1]]["step"] == 6
    assert batched.state[batched_params[0]]["step"] == 10
    for batched_param, single_param in zip(batched_params, single_params):
        assert torch.equal(batched_param, single_param)
        assert_same_state(batched.state[batched_param], single.state[single_param])


def test_batched_non_contiguous_parameter():
    start = torch.randn(30, 20, generator=torch.Generator().manual_seed(2))
    transposed = nn.Parameter(start.t().contiguous().t())
    plain = nn.Parameter(start.clone())
    others = [make_params(torch.float32, 3)[:3] for _ in range(2)]
    optimizers = [MicroAdam([transposed, *others[0]]), MicroAdam([plain, *others[1]])]
    generator = torch.Generator().manual_seed(4)
    for _ in range(4):
        gradient = torch.randn(start.shape, generator=generator)
        transposed.grad = gradient.t().contiguous().t()
        plain.grad = gradient.clone()
        for first, second in zip(*others):
            first.grad = torch.randn(first.shape, generator=generator)
            second.grad = first.grad.clone()
        for optimizer in optimizers:
            optimizer.step()
    assert not transposed.is_contiguous()
    assert torch.equal(transposed.detach(), plain.detach())


def test_batches_split_at_chunk_target(monkeypatch):
    monkeypatch.setattr(microadam_module, "_CPU_CHUNK_TARGET", 2000)
    calls = record_batches(monkeypatch)
    (batched, batched_params), (single, single_params) = run_pair({"lr": 1e-3}, torch.float32, steps=3)
    assert len(calls) > 3
    for batched_param, single_param in zip(batched_params, single_params):
        assert torch.equal(batched_param, single_param)


def test_state_dict_round_trip_after_batched_steps():
    params = make_params(torch.float32, 5)
    optimizer = MicroAdam(params, weight_decay=0.1)
    generator = torch.Generator().manual_seed(6)
    gradients = [[torch.randn(param.shape, generator=generator) for param in params] for _ in range(8)]
    for step in range(4):
        for param, gradient in zip(params, gradients[step]):
            param.grad = gradient.clone()
        optimizer.step()

    buffer = io.BytesIO()
    torch.save({"params": [param.detach() for param in params], "optimizer": optimizer.state_dict()}, buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer)
    resumed_params = [nn.Parameter(value.clone()) for value in checkpoint["params"]]
    resumed = MicroAdam(resumed_params, weight_decay=0.1)
    resumed.load_state_dict(checkpoint["optimizer"])

    for step in range(4, 8):
        for param, resumed_param, gradient in zip(params, resumed_params, gradients[step]):
            param.grad = gradient.clone()
            resumed_param.grad = gradient.clone()
        optimizer.step()
        resumed.step()
    for param, resumed_param in zip(params, resumed_params):
        assert torch.equal(param, resumed_param)
        for key, value in optimizer.state[param].items():
            loaded = resumed.state[resumed_param][key]
            assert torch.equal(loaded, value) if isinstance(value, torch.Tensor) else loaded == value, key


def test_scratch_memory_is_not_state():
    params = make_params(torch.float32, 7)
    optimizer = MicroAdam(params)
    for param in params:
        param.grad = torch.randn(param.shape)
    optimizer.step()

    assert optimizer.workspace_bytes() > 0
    state_tensors = {
        id(value) for state in optimizer.state_dict()["state"].values() for value in state.values()
        if isinstance(value, torch.Tensor)
    }
    for state in optimizer.state.values():
        assert set(state) == {"step", "window_indices", "window_values", "error_codes", "error_bounds"}
    # The state contains exactly its documented tensors: K indices and values per slot,
    # ceil(d / 2) code bytes and 2 * ceil(d / 64) bounds per tensor.
    expected = 0
    for param in params:
        keep = microadam_module.keep_count(0.01, param.numel())
        buckets = -(-param.numel() // 64)
        expected += 10 * keep * 4 + -(-param.numel() // 2) + 2 * buckets * 2
    total = sum(
        value.numel() * value.element_size()
        for state in optimizer.state.values()
        for value in state.values()
        if isinstance(value, torch.Tensor)
    )
    assert len(state_tensors) == 4 * len(params)
    assert total == expected
