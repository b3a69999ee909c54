"""MicroAdam state: memory per parameter, checkpoints, parameter groups and the Optimizer API."""

import copy
import io

import pytest
import torch
from torch import nn

import hf_dp_microadam.optim.microadam as microadam_module
from hf_dp_microadam.optim import MicroAdam


def mixed_model() -> nn.Module:
    """About 1.2M parameters: an embedding, square and rectangular matrices, biases, norms."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Embedding(3000, 128),
        nn.Linear(128, 512),
        nn.GELU(),
        nn.Linear(512, 512),
        nn.LayerNorm(512),
        nn.Linear(512, 768),
        nn.Linear(768, 129),
        nn.Conv1d(129, 33, kernel_size=3),
    )


def small_model() -> nn.Module:
    """About 60k parameters with the same kinds of layers as `mixed_model`."""
    torch.manual_seed(1)
    return nn.Sequential(
        nn.Embedding(3000, 16),
        nn.Linear(16, 64),
        nn.GELU(),
        nn.Linear(64, 64),
        nn.LayerNorm(64),
        nn.Linear(64, 96),
        nn.Linear(96, 129),
        nn.Conv1d(129, 33, kernel_size=3),
    )


def fill_gradients(model: nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    for param in model.parameters():
        param.grad = torch.randn(param.shape, generator=generator).to(param.dtype)


def state_bytes_per_parameter(optimizer: torch.optim.Optimizer, model: nn.Module) -> float:
    total = sum(
        value.numel() * value.element_size()
        for state in optimizer.state.values()
        for value in state.values()
        if isinstance(value, torch.Tensor)
    )
    return total / sum(param.numel() for param in model.parameters())


@pytest.mark.parametrize(
    ("settings", "limit"),
    [({}, 0.97), ({"quant_bucket": 4096}, 0.91)],
    ids=["defaults", "bucket_4096"],
)
def test_state_memory_per_parameter(settings, limit):
    model = mixed_model()
    assert sum(param.numel() for param in model.parameters()) >= 1_000_000
    optimizer = MicroAdam(model.parameters(), **settings)
    fill_gradients(model, 0)
    optimizer.step()
    ratio = state_bytes_per_parameter(optimizer, model)
    # 0.5 (codes) + 0.4 (window) + 4 / quant_bucket (bounds) is the floor.
    floor = 0.5 + 4 * 10 * 0.01 + 4 / settings.get("quant_bucket", 64)
    assert floor <= ratio <= limit, f"{ratio:.4f} bytes per parameter"


def test_adam_state_memory_for_contrast():
    model = mixed_model()
    optimizer = torch.optim.Adam(model.parameters())
    fill_gradients(model, 0)
    optimizer.step()
    assert 7.99 <= state_bytes_per_parameter(optimizer, model) <= 8.01


def test_state_layout_and_dtypes():
    param = nn.Parameter(torch.randn(100, 401))
    optimizer = MicroAdam([param], window=4)
    param.grad = torch.randn_like(param)
    optimizer.step()
    state = optimizer.state[param]
    # 40100 entries: one block of 32768 (k = 328) and a tail of 7332 (k = 74).
    assert state["window_indices"].dtype == torch.int16
    assert state["window_indices"].shape == (4, 402)
    assert state["window_values"].dtype == torch.bfloat16
    assert state["window_values"].shape == (4, 402)
    assert state["error_codes"].dtype == torch.uint8
    assert state["error_codes"].shape == (20050,)
    assert state["error_bounds"].dtype == torch.bfloat16
    assert state["error_bounds"].shape == (2, 627)
    assert state["step"] == 1


def run_steps(model: nn.Module, optimizer: torch.optim.Optimizer, steps: range) -> list[float]:
    losses = []
    for step in steps:
        generator = torch.Generator().manual_seed(step)
        inputs = torch.randint(0, 3000, (4, 6), generator=generator)

        def closure():
            optimizer.zero_grad()
            hidden = model[0](inputs).mean(dim=1)
            for layer in list(model)[1:7]:
                hidden = layer(hidden)
            loss = hidden.pow(2).mean() + model[7].weight.pow(2).sum() * 1e-3
            loss.backward()
            return loss

        losses.append(float(optimizer.step(closure).detach()))
    return losses


def two_group_optimizer(model: nn.Module, **settings) -> MicroAdam:
    params = list(model.parameters())
    return MicroAdam(
        [
            {"params": params[:3], "lr": 1e-2, "weight_decay": 0.1, "density": 0.05},
            {"params": params[3:], "lr": 3e-3, "error_feedback": "fp32", "window": 3},
        ],
        **settings,
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_state_dict_round_trip_bit_identical(dtype):
    model = small_model().to(dtype)
    optimizer = two_group_optimizer(model)
    run_steps(model, optimizer, range(10))

    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer)

    resumed_model = small_model().to(dtype)
    resumed_model.load_state_dict(checkpoint["model"])
    resumed = two_group_optimizer(resumed_model)
    resumed.load_state_dict(checkpoint["optimizer"])

    for param, resumed_param in zip(model.parameters(), resumed_model.parameters()):
        for key, value in optimizer.state[param].items():
            loaded = resumed.state[resumed_param][key]
            if isinstance(value, torch.Tensor):
                assert loaded.dtype == value.dtype, key
                assert torch.equal(loaded, value), key
            else:
                assert loaded == value, key

    expected_losses = run_steps(model, optimizer, range(10, 20))
    resumed_losses = run_steps(resumed_model, resumed, range(10, 20))
    assert resumed_losses == expected_losses
    for param, resumed_param in zip(model.parameters(), resumed_model.parameters()):
        assert torch.equal(param, resumed_param)


def test_groups_keep_their_settings():
    model = mixed_model()
    optimizer = two_group_optimizer(model)
    fill_gradients(model, 1)
    optimizer.step()
    params = list(model.parameters())
    embedding_state = optimizer.state[params[0]]
    assert "error_codes" in embedding_state
    # 384000 entries, density 0.05: 11 full blocks with k = 1639 and a tail of 23552 with k = 1178.
    assert embedding_state["window_indices"].shape == (10, 11 * 1639 + 1178)
    last_state = optimizer.state[params[-1]]
    assert "error" in last_state
    assert last_state["error"].dtype == torch.float32
    assert last_state["window_indices"].shape[0] == 3


def test_parameters_without_gradient_skipped():
    used, unused = nn.Parameter(torch.randn(50)), nn.Parameter(torch.randn(50))
    optimizer = MicroAdam([used, unused])
    before = unused.detach().clone()
    used.grad = torch.randn(50)
    optimizer.step()
    assert unused not in optimizer.state
    assert torch.equal(unused, before)
    assert optimizer.state[used]["step"] == 1


def test_zero_grad_and_closure_loss():
    param = nn.Parameter(torch.randn(30))
    optimizer = MicroAdam([param], lr=0.1)

    def closure():
        optimizer.zero_grad()
        loss = (param**2).sum()
        loss.backward()
        return loss

    first = optimizer.step(closure)
    assert isinstance(first, torch.Tensor)
    optimizer.zero_grad()
    assert param.grad is None
    losses = [float(optimizer.step(closure).detach()) for _ in range(30)]
    assert losses[-1] < float(first.detach())


def test_chunking_does_not_change_result(monkeypatch):
    start = torch.randn(60, 50, generator=torch.Generator().manual_seed(5))
    results = []
    for chunk_target in (microadam_module._CPU_CHUNK_TARGET, 1000):
        monkeypatch.setattr(microadam_module, "_CPU_CHUNK_TARGET", chunk_target)
        param = nn.Parameter(start.clone())
        optimizer = MicroAdam([param], block_size=256, weight_decay=0.1, window=3)
        generator = torch.Generator().manual_seed(6)
        for _ in range(5):
            param.grad = torch.randn(param.shape, generator=generator)
            optimizer.step()
        results.append((param.detach().clone(), copy.deepcopy(optimizer.state[param])))
    assert torch.equal(results[0][0], results[1][0])
    for key in ("window_indices", "window_values", "error_codes", "error_bounds"):
        assert torch.equal(results[0][1][key], results[1][1][key]), key


def test_non_contiguous_parameter_matches_contiguous():
    start = torch.randn(40, 30, generator=torch.Generator().manual_seed(9))
    transposed = nn.Parameter(start.t().contiguous().t())  # same values, column-major
    assert not transposed.is_contiguous()
    plain = nn.Parameter(start.clone())
    optimizers = [MicroAdam([transposed], weight_decay=0.1), MicroAdam([plain], weight_decay=0.1)]
    generator = torch.Generator().manual_seed(10)
    for _ in range(4):
        gradient = torch.randn(start.shape, generator=generator)
        transposed.grad = gradient.t().contiguous().t()
        plain.grad = gradient.clone()
        for optimizer in optimizers:
            optimizer.step()
    # Both flatten to the same row-major order, so the updates agree exactly.
    assert torch.equal(transposed.detach(), plain.detach())


def test_float64_parameter_keeps_precision():
    param = nn.Parameter(torch.full((100,), 1.0 + 2.0**-40, dtype=torch.float64))
    optimizer = MicroAdam([param], lr=1e-12, density=1.0)
    param.grad = torch.ones(100, dtype=torch.float64)
    optimizer.step()
    assert param.dtype == torch.float64
    # A float32 update path would round 1 + 2^-40 to 1.
    assert bool((param.detach() != 1.0).all())


def test_float16_parameter_tracks_float32_run():
    start = torch.randn(3000, generator=torch.Generator().manual_seed(13))
    half = nn.Parameter(start.half())
    full = nn.Parameter(start.half().float())
    optimizers = [MicroAdam([half], lr=1e-2, density=0.05), MicroAdam([full], lr=1e-2, density=0.05)]
    generator = torch.Generator().manual_seed(14)
    for _ in range(5):
        gradient = torch.randn(start.shape, generator=generator).half()
        half.grad = gradient.clone()
        full.grad = gradient.float()
        for optimizer in optimizers:
            optimizer.step()
    assert half.dtype == torch.float16
    assert optimizers[0].state[half]["window_values"].dtype == torch.bfloat16
    # Same selections and float32 arithmetic. Only theta's rounding to float16 differs:
    # at most half an ulp (2^-11 relative) per step, so below 5 * 2^-11 after 5 steps.
    torch.testing.assert_close(half.detach().float(), full.detach(), rtol=2.0**-8, atol=1e-6)


def test_changed_layout_settings_rejected():
    param = nn.Parameter(torch.randn(100))
    optimizer = MicroAdam([param], density=0.1)
    param.grad = torch.randn(100)
    optimizer.step()
    optimizer.param_groups[0]["density"] = 0.2
    with pytest.raises(ValueError, match="cannot change once a parameter has state"):
        optimizer.step()


def test_sparse_gradient_rejected():
    embedding = nn.Embedding(10, 4, sparse=True)
    optimizer = MicroAdam(embedding.parameters())
    embedding(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse gradients"):
        optimizer.step()


@pytest.mark.parametrize(
    ("settings", "error", "match"),
    [
        ({"lr": -1.0}, ValueError, "lr must be in"),
        ({"betas": (1.0, 0.999)}, ValueError, r"betas\[0\]"),
        ({"betas": (0.9,)}, ValueError, "betas must be a pair"),
        ({"eps": 0.0}, ValueError, "eps must be in"),
        ({"weight_decay": -0.1}, ValueError, "weight_decay must be in"),
        ({"density": 0.0}, ValueError, "density must be in"),
        ({"density": 1.5}, ValueError, "density must be in"),
        ({"window": 0}, ValueError, "window must be in"),
        ({"window": 2.0}, TypeError, "window must be an int"),
        ({"quant_bucket": 0}, ValueError, "quant_bucket must be in"),
        ({"block_size": 32769}, ValueError, "block_size must be in"),
        ({"block_size": True}, TypeError, "block_size must be an int"),
        ({"error_feedback": "8bit"}, ValueError, "error_feedback must be one of"),
        ({"lr": "fast"}, TypeError, "lr must be a real number"),
    ],
)
def test_invalid_settings_rejected(settings, error, match):
    with pytest.raises(error, match=match):
        MicroAdam([nn.Parameter(torch.randn(3))], **settings)


def test_invalid_group_setting_rejected():
    with pytest.raises(ValueError, match="density must be in"):
        MicroAdam([{"params": [nn.Parameter(torch.randn(3))], "density": 2.0}])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_cuda_matches_cpu(dtype):
    start = torch.randn(70000, generator=torch.Generator().manual_seed(11)).to(dtype)
    params = [nn.Parameter(start.clone()), nn.Parameter(start.clone().cuda())]
    optimizers = [MicroAdam([param], weight_decay=0.1) for param in params]
    generator = torch.Generator().manual_seed(12)
    for _ in range(5):
        gradient = torch.randn(start.shape, generator=generator).to(dtype)
        for param, optimizer in zip(params, optimizers):
            param.grad = gradient.to(param.device)
            optimizer.step()
    cpu_state = optimizers[0].state[params[0]]
    cuda_state = optimizers[1].state[params[1]]
    assert cuda_state["window_indices"].device.type == "cuda"
    # Top-k ties and the last bit of float32 may differ between devices.
    agreement = (cpu_state["window_indices"] == cuda_state["window_indices"].cpu()).float().mean()
    assert float(agreement) > 0.95
    torch.testing.assert_close(params[1].detach().cpu(), params[0].detach(), rtol=1e-2, atol=1e-3)


def test_profiler_sees_stage_labels():
    param = nn.Parameter(torch.randn(5000))
    optimizer = MicroAdam([param])
    param.grad = torch.randn(5000)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
        optimizer.step()
    labels = {event.key for event in profiler.key_averages() if event.key.startswith("microadam::")}
    assert labels == {
        "microadam::add_error",
        "microadam::topk",
        "microadam::quantize_error",
        "microadam::window_moments",
        "microadam::param_update",
    }
