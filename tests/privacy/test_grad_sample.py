"""Per-example gradients of PerExampleGradients against one plain backward per example."""

import pytest
import torch
import torch.nn as nn
from grad_sample_helpers import (
    ARCHITECTURES,
    CAUSAL_LM_ARCHITECTURES,
    TEXT_ARCHITECTURES,
    assert_gradients_match,
    build_model,
    engine_per_example_gradients,
    make_batch,
    per_example_losses,
    reference_per_example_gradients,
    text_batch,
    trainable_parameters,
)
from peft import LoraConfig, get_peft_model
from transformers import BeitConfig, BeitForImageClassification, Dinov2Config, SwinConfig, SwinForImageClassification
from transformers.models.dinov2.modeling_dinov2 import Dinov2LayerScale
from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from hf_dp_microadam.privacy.grad_sample import PerExampleGradients, clear_grad_samples
from hf_dp_microadam.privacy.grad_sample.samplers import find_grad_sampler


@pytest.mark.parametrize("architecture", ARCHITECTURES)
@pytest.mark.parametrize("mode", ["full", "lora"])
def test_matches_per_example_loop(architecture, mode):
    model = build_model(architecture, lora=mode == "lora")
    batch = make_batch(architecture)
    expected = reference_per_example_gradients(model, batch)

    engine = PerExampleGradients(model)
    actual = engine_per_example_gradients(model, batch)

    assert_gradients_match(actual, expected)
    engine.remove()


def test_dora_matches_per_example_loop():
    model = build_model("llama", dora=True)
    assert any("lora_magnitude_vector" in name for name in trainable_parameters(model))
    batch = make_batch("llama")
    expected = reference_per_example_gradients(model, batch)

    PerExampleGradients(model)
    actual = engine_per_example_gradients(model, batch)

    assert_gradients_match(actual, expected)


def test_gpt2_tied_embedding_sums_both_uses():
    model = build_model("gpt2")
    assert model.lm_head.weight is model.transformer.wte.weight
    batch = make_batch("gpt2")
    expected = reference_per_example_gradients(model, batch)

    engine = PerExampleGradients(model)
    actual = engine_per_example_gradients(model, batch)

    assert engine.covered_parameter_names.count("transformer.wte.weight") == 1
    assert "lm_head.weight" not in engine.covered_parameter_names
    assert_gradients_match({"wte": actual["transformer.wte.weight"]}, {"wte": expected["transformer.wte.weight"]})


@pytest.mark.parametrize("architecture", ["gpt2", "bert"])
def test_position_embedding_separates_examples_without_position_ids(architecture):
    """HF builds position_ids of shape [1, T], and the engine still gives each example its own gradient."""
    model = build_model(architecture)
    batch = make_batch(architecture)
    assert "position_ids" not in batch
    name = "transformer.wpe.weight" if architecture == "gpt2" else "bert.embeddings.position_embeddings.weight"
    embedding = model.get_submodule(name.rsplit(".", 1)[0])
    seen_shapes = []
    embedding.register_forward_hook(lambda module, args, output: seen_shapes.append(tuple(args[0].shape)))
    expected = reference_per_example_gradients(model, batch)
    seen_shapes.clear()

    PerExampleGradients(model)
    actual = engine_per_example_gradients(model, batch)

    assert seen_shapes[0][0] == batch["input_ids"].shape[0]
    assert_gradients_match({name: actual[name]}, {name: expected[name]})
    rows_differ = not torch.allclose(actual[name][0], actual[name][1])
    assert rows_differ


@pytest.mark.parametrize("architecture", TEXT_ARCHITECTURES)
def test_padding_independence(architecture):
    model = build_model(architecture)
    PerExampleGradients(model)
    short = text_batch([4, 3, 2], architecture=architecture, seed=5)
    long = text_batch([4, 9, 8], architecture=architecture, seed=6, max_length=10)
    # Example 0 is the same four tokens in both batches, padded to 4 or to 10 positions.
    long["input_ids"][0, :4] = short["input_ids"][0]
    if architecture in CAUSAL_LM_ARCHITECTURES:
        long["labels"][0, :4] = short["labels"][0]
    else:
        long["labels"][0] = short["labels"][0]

    with_short = engine_per_example_gradients(model, short)
    with_long = engine_per_example_gradients(model, long)

    assert_gradients_match(
        {name: value[0] for name, value in with_long.items()},
        {name: value[0] for name, value in with_short.items()},
    )


@pytest.mark.parametrize("architecture", ["gpt2", "vit"])
def test_other_example_does_not_change_gradient(architecture):
    model = build_model(architecture)
    PerExampleGradients(model)
    batch = make_batch(architecture, seed=3)
    changed = make_batch(architecture, seed=3)
    other = make_batch(architecture, seed=11)
    for key in changed:
        changed[key][2] = other[key][2]

    first = engine_per_example_gradients(model, batch)
    second = engine_per_example_gradients(model, changed)

    for name in first:
        torch.testing.assert_close(second[name][:2], first[name][:2], rtol=0, atol=1e-12)
    assert any(not torch.allclose(second[name][2], first[name][2]) for name in first)


def test_batch_normalized_loss_is_detected_as_coupled():
    """The independence check above fails for a loss normalized by the batch's token count."""
    model = build_model("gpt2")
    PerExampleGradients(model)

    def token_count_normalized(model, batch):
        token_sums = per_example_losses(model, batch) * (batch["labels"][:, 1:] != -100).sum(dim=1)
        return token_sums / (batch["labels"][:, 1:] != -100).sum()

    batch = text_batch([6, 4, 3], architecture="gpt2", seed=3)
    changed = text_batch([6, 4, 7], architecture="gpt2", seed=3)
    changed["input_ids"][:2, :6] = batch["input_ids"][:2, :6]
    changed["labels"][:2, :6] = batch["labels"][:2, :6]

    first = engine_per_example_gradients(model, batch, token_count_normalized)
    second = engine_per_example_gradients(model, changed, token_count_normalized)

    name = "transformer.h.0.mlp.c_fc.weight"
    assert not torch.allclose(second[name][0], first[name][0])


def test_consecutive_micro_batches():
    model = build_model("gpt2", lora=True)
    first_batch = make_batch("gpt2", 3, seed=1)
    second_batch = make_batch("gpt2", 2, seed=2)
    expected_first = reference_per_example_gradients(model, first_batch)
    expected_second = reference_per_example_gradients(model, second_batch)
    engine = PerExampleGradients(model)

    per_example_losses(model, first_batch).sum().backward()
    actual_first = {name: p.grad_sample.clone() for name, p in trainable_parameters(model).items()}
    engine.clear_grad_samples()
    per_example_losses(model, second_batch).sum().backward()
    actual_second = {name: p.grad_sample.clone() for name, p in trainable_parameters(model).items()}

    assert_gradients_match(actual_first, expected_first)
    assert_gradients_match(actual_second, expected_second)


def test_uncleared_grad_sample_raises():
    model = build_model("vit")
    PerExampleGradients(model)
    batch = make_batch("vit")
    per_example_losses(model, batch).sum().backward()

    with pytest.raises(RuntimeError, match="earlier micro-batch"):
        per_example_losses(model, batch).sum().backward()

    clear_grad_samples(model)
    per_example_losses(model, batch).sum().backward()
    assert model.classifier.weight.grad_sample.shape == (3, 3, 16)


def test_hooks_inactive_in_eval_mode_and_no_grad():
    model = build_model("gpt2")
    PerExampleGradients(model)
    batch = make_batch("gpt2")

    model.eval()
    per_example_losses(model, batch).sum().backward()
    assert all(p.grad_sample is None for p in trainable_parameters(model).values())

    model.train()
    with torch.no_grad():
        per_example_losses(model, batch)
    assert all(p.grad_sample is None for p in trainable_parameters(model).values())


def test_disabled_context_records_nothing():
    model = build_model("bert")
    engine = PerExampleGradients(model)
    with engine.disabled():
        per_example_losses(model, make_batch("bert")).sum().backward()
    assert all(p.grad_sample is None for p in trainable_parameters(model).values())


def test_remove_detaches_everything():
    model = build_model("llama", lora=True)
    modules = list(model.modules())
    hook_counts = [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in modules]
    engine = PerExampleGradients(model)

    engine.remove()
    per_example_losses(model, make_batch("llama")).sum().backward()

    assert [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in modules] == hook_counts
    assert not any(hasattr(p, "grad_sample") for p in model.parameters())
    PerExampleGradients(model).remove()


def test_second_engine_on_same_model_raises():
    model = build_model("vit")
    PerExampleGradients(model)
    with pytest.raises(ValueError, match="already has a PerExampleGradients"):
        PerExampleGradients(model)


def test_unused_parameter_gets_zero_rows():
    model = build_model("dinov2")
    model.dinov2.embeddings.mask_token.requires_grad_(True)
    engine = PerExampleGradients(model)

    per_example_losses(model, make_batch("dinov2")).sum().backward()

    mask_token = model.dinov2.embeddings.mask_token
    assert mask_token.grad is None
    assert mask_token.grad_sample.shape == (3, *mask_token.shape)
    assert torch.count_nonzero(mask_token.grad_sample) == 0
    assert engine.unused_parameter_names == ["dinov2.embeddings.mask_token"]


def test_replay_under_dropout():
    """ViT embeddings (cls_token, position_embeddings) replay with the forward's dropout mask.

    The per-example gradients add up to the batch gradient, and the RNG stream after the
    backward is the same as without the engine.
    """
    batch = make_batch("vit")
    model = build_model("vit", hidden_dropout_prob=0.5)
    PerExampleGradients(model)

    torch.manual_seed(7)
    per_example_losses(model, batch).sum().backward()
    after_engine = torch.rand(4)
    embeddings = model.vit.embeddings
    for parameter in (embeddings.cls_token, embeddings.position_embeddings):
        torch.testing.assert_close(parameter.grad_sample.sum(dim=0), parameter.grad, rtol=1e-10, atol=1e-12)

    plain = build_model("vit", hidden_dropout_prob=0.5)
    torch.manual_seed(7)
    per_example_losses(plain, batch).sum().backward()
    torch.testing.assert_close(torch.rand(4), after_engine)
    torch.testing.assert_close(plain.vit.embeddings.cls_token.grad, embeddings.cls_token.grad)


def test_bf16_autocast_close_to_loop():
    model = build_model("vit").float()
    batch = make_batch("vit")
    batch["pixel_values"] = batch["pixel_values"].float()

    def autocast_losses(model, batch):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return per_example_losses(model, batch)

    expected = reference_per_example_gradients(model, batch, autocast_losses)
    PerExampleGradients(model)
    actual = engine_per_example_gradients(model, batch, autocast_losses)

    assert all(value.dtype == torch.float32 for value in actual.values())
    scale = max(value.abs().max().item() for value in expected.values())
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=0, atol=3e-2 * scale, msg=name)


def test_batch_size_override():
    model = build_model("vit")
    engine = PerExampleGradients(model)
    batch = make_batch("vit")

    engine.set_batch_size(2)
    with pytest.raises(RuntimeError, match="micro-batch of 2 examples"):
        per_example_losses(model, batch).sum().backward()
    clear_grad_samples(model)

    engine.set_batch_size(3)
    per_example_losses(model, batch).sum().backward()
    assert model.vit.embeddings.cls_token.grad_sample.shape[0] == 3


class _SharedInputModel(nn.Module):
    """Adds a trainable projection of one input shared by the whole batch."""

    def __init__(self):
        super().__init__()
        self.shared = nn.Parameter(torch.randn(1, 4), requires_grad=False)
        self.projection = nn.Linear(4, 4)

    def forward(self, inputs):
        return inputs * self.projection(self.shared)


def test_shared_computation_replayed_by_enclosing_call():
    model = _SharedInputModel().double().train()
    batch = {"inputs": torch.randn(3, 4, dtype=torch.float64), "labels": torch.zeros(3)}

    def loss_fn(model, batch):
        return model(batch["inputs"]).sum(dim=1)

    expected = reference_per_example_gradients(model, batch, loss_fn)
    PerExampleGradients(model)
    actual = engine_per_example_gradients(model, batch, loss_fn)

    assert_gradients_match(actual, expected)


class _SharedAndBatchedCalls(nn.Module):
    """Calls one Linear layer on a shared input and on the batch."""

    def __init__(self):
        super().__init__()
        self.shared = nn.Parameter(torch.randn(1, 4), requires_grad=False)
        self.projection = nn.Linear(4, 4)

    def forward(self, inputs):
        return self.projection(inputs) * self.projection(self.shared)


def test_shared_and_batched_calls_of_one_layer():
    model = _SharedAndBatchedCalls().double().train()
    batch = {"inputs": torch.randn(3, 4, dtype=torch.float64), "labels": torch.zeros(3)}

    def loss_fn(model, batch):
        return model(batch["inputs"]).pow(2).sum(dim=1)

    expected = reference_per_example_gradients(model, batch, loss_fn)
    PerExampleGradients(model)
    actual = engine_per_example_gradients(model, batch, loss_fn)

    assert_gradients_match(actual, expected)


class _HeadBias(nn.Module):
    """Returns a [heads, width] table without any input, like a relative position bias module."""

    def __init__(self, heads):
        super().__init__()
        self.table = nn.Parameter(torch.randn(heads, 4))

    def forward(self):
        return self.table * 2


class _BroadcastHeadBias(nn.Module):
    def __init__(self, heads):
        super().__init__()
        self.bias = _HeadBias(heads)

    def forward(self, inputs):
        return (inputs[:, None, :] + self.bias()[None]).tanh()


def test_shared_output_with_batch_sized_first_dimension():
    """The bias has 3 rows like the batch, but each row reaches every example."""
    model = _BroadcastHeadBias(heads=3).double().train()
    batch = {"inputs": torch.randn(3, 4, dtype=torch.float64), "labels": torch.zeros(3)}

    def loss_fn(model, batch):
        return model(batch["inputs"]).pow(2).sum(dim=(1, 2))

    expected = reference_per_example_gradients(model, batch, loss_fn)
    PerExampleGradients(model)
    actual = engine_per_example_gradients(model, batch, loss_fn)

    assert_gradients_match(actual, expected)


def _tiny_swin():
    torch.manual_seed(0)
    config = SwinConfig(
        image_size=8,
        patch_size=2,
        embed_dim=8,
        depths=[1, 1],
        num_heads=[2, 2],
        window_size=2,
        mlp_ratio=2.0,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        drop_path_rate=0.0,
        num_labels=3,
    )
    return SwinForImageClassification(config).double().train()


@pytest.mark.parametrize("mode", ["full", "lora", "checkpointing"])
def test_swin_relative_position_bias(mode):
    """Swin computes its relative position bias once per batch and attends within flattened windows."""
    model = _tiny_swin()
    if mode == "lora":
        config = LoraConfig(target_modules=["q_proj", "v_proj"], modules_to_save=["classifier"], init_lora_weights=False)
        model = get_peft_model(model, config)
    batch = make_batch("vit")
    expected = reference_per_example_gradients(model, batch)
    if mode == "checkpointing":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    PerExampleGradients(model)

    actual = engine_per_example_gradients(model, batch)

    assert any("relative_position_bias_table" in name for name in actual) == (mode != "lora")
    assert_gradients_match(actual, expected)


def test_swin_reentrant_checkpointing_raises():
    model = _tiny_swin()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    PerExampleGradients(model)
    with pytest.raises(RuntimeError, match="use_reentrant=True"):
        per_example_losses(model, make_batch("vit")).sum().backward()


def test_beit_layer_scale_and_relative_bias():
    torch.manual_seed(0)
    config = BeitConfig(
        image_size=8,
        patch_size=4,
        hidden_size=12,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        use_relative_position_bias=True,
        layer_scale_init_value=0.1,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        drop_path_rate=0.0,
        num_labels=3,
    )
    model = BeitForImageClassification(config).double().train()
    batch = make_batch("vit", 3)
    expected = reference_per_example_gradients(model, batch)
    PerExampleGradients(model)

    actual = engine_per_example_gradients(model, batch)

    assert "beit.layers.0.lambda_1" in actual
    assert_gradients_match(actual, expected)


class _WeightReadDirectly(nn.Module):
    """Reads an embedding table's weight without calling the embedding."""

    def __init__(self):
        super().__init__()
        self.table = nn.Embedding(5, 4)
        self.head = nn.Linear(4, 1)

    def forward(self, index):
        return self.head(self.table.weight[index]).squeeze(-1)


def test_parameter_used_outside_its_module_raises():
    model = _WeightReadDirectly().train()
    PerExampleGradients(model)
    with pytest.raises(RuntimeError, match="table.weight"):
        model(torch.tensor([1, 2, 3])).sum().backward()


def test_embedding_padding_row_has_zero_gradient():
    model = build_model("bert")
    batch = make_batch("bert")
    # The padding id also inside an attended span, where its embedding row receives a gradient.
    batch["input_ids"][0, 1] = model.config.pad_token_id
    assert batch["attention_mask"][0, 1] == 1
    expected = reference_per_example_gradients(model, batch)
    PerExampleGradients(model)

    actual = engine_per_example_gradients(model, batch)

    name = "bert.embeddings.word_embeddings.weight"
    assert torch.count_nonzero(actual[name][:, model.config.pad_token_id]) == 0
    assert_gradients_match({name: actual[name]}, {name: expected[name]})


_NORM_AND_SCALE_MODULES = {
    "llama_rms_norm": lambda: LlamaRMSNorm(6, eps=1e-5),
    "gemma_rms_norm": lambda: GemmaRMSNorm(6, eps=1e-6),
    "dinov2_layer_scale": lambda: Dinov2LayerScale(Dinov2Config(hidden_size=6, layerscale_value=0.3)),
}


@pytest.mark.parametrize("kind", sorted(_NORM_AND_SCALE_MODULES))
def test_recognised_norm_and_scale_modules(kind):
    # float32, because GemmaRMSNorm computes in float32 whatever the input dtype.
    module = _NORM_AND_SCALE_MODULES[kind]().train()
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.normal_()
    assert find_grad_sampler(module) is not None
    inputs = torch.randn(3, 5, 6)
    targets = torch.randn(3, 5, 6)

    def loss_fn(model, batch):
        return (model(batch["inputs"]) * batch["targets"]).sum(dim=(1, 2))

    batch = {"inputs": inputs, "targets": targets, "labels": torch.zeros(3)}
    expected = reference_per_example_gradients(module, batch, loss_fn)
    PerExampleGradients(module, batch_size=3)
    actual = engine_per_example_gradients(module, batch, loss_fn)

    assert_gradients_match(actual, expected, rtol=1e-5)


class _ShiftedRMSNorm(nn.Module):
    """An RMSNorm-like module with an extra shift: it must not get the RMSNorm formula."""

    def __init__(self, size):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(size))
        self.eps = 1e-6

    def forward(self, inputs):
        normalized = inputs * torch.rsqrt(inputs.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normalized + 0.1 * self.weight.pow(2)


def test_unrecognised_module_uses_replay():
    module = _ShiftedRMSNorm(6).double()
    assert find_grad_sampler(module) is None
    batch = {"inputs": torch.randn(3, 5, 6, dtype=torch.float64), "labels": torch.zeros(3)}

    def loss_fn(model, batch):
        return model(batch["inputs"]).pow(2).sum(dim=(1, 2))

    expected = reference_per_example_gradients(module, batch, loss_fn)
    PerExampleGradients(module)
    actual = engine_per_example_gradients(module, batch, loss_fn)

    assert_gradients_match(actual, expected)


@pytest.mark.parametrize("architecture", CAUSAL_LM_ARCHITECTURES)
def test_explicit_position_ids(architecture):
    model = build_model(architecture)
    batch = make_batch(architecture)
    batch["position_ids"] = torch.arange(batch["input_ids"].shape[1]).expand_as(batch["input_ids"]).clone()
    expected = reference_per_example_gradients(model, batch)
    PerExampleGradients(model)

    actual = engine_per_example_gradients(model, batch)

    assert_gradients_match(actual, expected)



class _KeywordCall(nn.Module):
    """Calls its Linear layer with a keyword argument."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(3, 2)

    def forward(self, inputs):
        return self.linear(input=inputs)


def test_layer_called_with_keyword_input():
    model = _KeywordCall().double().train()
    batch = {"inputs": torch.randn(4, 3, dtype=torch.float64), "labels": torch.zeros(4)}

    def loss_fn(model, batch):
        return model(batch["inputs"]).pow(2).sum(dim=1)

    expected = reference_per_example_gradients(model, batch, loss_fn)
    PerExampleGradients(model)
    actual = engine_per_example_gradients(model, batch, loss_fn)

    assert_gradients_match(actual, expected)
