"""Pre-flight checks: each rejection, its message, and a probe that leaves no trace."""

import pytest
import torch
import torch.nn as nn
from grad_sample_helpers import build_model, lora_config, make_batch, per_example_losses, trainable_parameters
from opacus.validators import ModuleValidator
from peft import IA3Config, LoraConfig, PromptTuningConfig, get_peft_model
from transformers import ResNetConfig, ResNetForImageClassification

from hf_dp_microadam.privacy.grad_sample import PerExampleGradients
from hf_dp_microadam.privacy.validation import (
    UnsupportedModelError,
    check_mixed_precision,
    check_model_for_dp,
    find_mixed_precision_problems,
)


def _problems(model, engine=None, **settings) -> list[str]:
    with pytest.raises(UnsupportedModelError) as error:
        check_model_for_dp(model, engine, **settings)
    message = str(error.value)
    for problem in error.value.problems:
        assert problem in message
    return error.value.problems


def _tiny_resnet():
    config = ResNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[8, 8], depths=[1, 1], num_labels=3)
    return ResNetForImageClassification(config).double().train()


@pytest.mark.parametrize("architecture", ["vit", "gpt2"])
def test_supported_models_pass(architecture):
    model = build_model(architecture, lora=architecture == "gpt2")
    engine = PerExampleGradients(model)
    check_model_for_dp(model, engine, probe_batch=make_batch(architecture))


def test_probe_leaves_no_trace():
    model = build_model("bert")
    engine = PerExampleGradients(model)
    model.bert.pooler.eval()
    model.bert.pooler.dense.requires_grad_(False)
    batch = make_batch("bert")
    per_example_losses(model, batch).sum().backward()
    grads = {name: p.grad.clone() for name, p in trainable_parameters(model).items()}
    engine.clear_grad_samples()
    modes = {name: module.training for name, module in model.named_modules()}
    rng_state = torch.get_rng_state()

    check_model_for_dp(model, engine, probe_batch=batch)

    assert {name: module.training for name, module in model.named_modules()} == modes
    assert torch.equal(torch.get_rng_state(), rng_state)
    for name, parameter in trainable_parameters(model).items():
        assert torch.equal(parameter.grad, grads[name])
        assert parameter.grad_sample is None


def test_eval_mode_rejected():
    model = build_model("vit").eval()
    problems = _problems(model, probe_batch=make_batch("vit"))
    assert len(problems) == 1
    assert "eval mode" in problems[0]
    assert "model.train()" in problems[0]


def test_trainable_submodule_in_eval_mode_rejected():
    model = build_model("vit")
    model.classifier.eval()
    problems = _problems(model)
    assert "classifier" in problems[0]
    assert "model.train()" in problems[0]


def test_trainable_batch_norm_rejected():
    problems = _problems(_tiny_resnet())
    assert len(problems) == 1
    assert "BatchNorm" in problems[0]
    assert "GroupNorm" in problems[0]
    assert "ModuleValidator.fix" in problems[0]


def test_frozen_batch_norm_in_training_mode_rejected():
    model = _tiny_resnet()
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.requires_grad_(False)
    problems = _problems(model)
    assert "BatchNorm" in problems[0]
    assert "eval mode" in problems[0]


def test_batch_norm_fixed_to_group_norm_passes():
    model = ModuleValidator.fix(_tiny_resnet()).double()
    batch = {"pixel_values": torch.randn(2, 3, 16, 16, dtype=torch.float64), "labels": torch.tensor([0, 2])}
    check_model_for_dp(model, probe_batch=batch)


def test_unused_parameter_rejected():
    model = build_model("dinov2")
    model.dinov2.embeddings.mask_token.requires_grad_(True)
    problems = _problems(model, probe_batch=make_batch("dinov2"))
    assert len(problems) == 1
    assert "dinov2.embeddings.mask_token" in problems[0]
    assert "requires_grad_(False)" in problems[0]


def test_fp16_grad_scaler_rejected():
    problems = find_mixed_precision_problems(fp16=True)
    assert "GradScaler" in problems[0]
    assert "bf16=True" in problems[0]
    with pytest.raises(UnsupportedModelError, match="loss scale before clipping"):
        check_mixed_precision(fp16=True)
    with pytest.raises(UnsupportedModelError, match="GradScaler"):
        check_mixed_precision(grad_scaler=torch.amp.GradScaler("cpu"))


def test_bf16_and_disabled_scaler_accepted():
    check_mixed_precision(bf16=True)
    check_mixed_precision(grad_scaler=torch.amp.GradScaler("cpu", enabled=False))


def test_fp16_listed_with_model_problems():
    problems = _problems(build_model("vit").eval(), fp16=True)
    assert len(problems) == 2
    assert "GradScaler" in problems[0]
    assert "eval mode" in problems[1]


def test_peft_wrapped_after_hooks_rejected():
    base = build_model("gpt2")
    engine = PerExampleGradients(base)
    model = get_peft_model(base, lora_config("gpt2"))
    problems = _problems(model, engine, probe_batch=make_batch("gpt2"))
    assert len(problems) == 1
    assert "lora_A" in problems[0]
    assert "before get_peft_model" in problems[0]


@pytest.mark.parametrize(
    ("architecture", "config", "expected"),
    [
        ("gpt2", LoraConfig(target_modules=["wte"], use_dora=True), "DoraEmbeddingVariant"),
        ("vit", LoraConfig(target_modules=["projection"]), "lora.layer.Conv2d"),
        ("llama", IA3Config(target_modules=["q_proj"], feedforward_modules=[]), "ia3"),
        ("llama", PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2), "prompt-learning"),
    ],
    ids=["dora_embedding", "lora_conv2d", "ia3", "prompt_tuning"],
)
def test_unsupported_peft_variants_rejected(architecture, config, expected):
    model = get_peft_model(build_model(architecture), config).train()
    problems = _problems(model, probe_batch=make_batch(architecture))
    assert any(expected in problem for problem in problems)


class _ReusedWeight(nn.Module):
    """Uses a Linear layer's weight a second time outside the layer."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, inputs):
        hidden = self.proj(inputs) + inputs @ self.proj.weight
        return self.head(hidden)


def test_parameter_used_outside_module_rejected():
    model = _ReusedWeight().double().train()

    def loss_fn(model, batch):
        return nn.functional.cross_entropy(model(batch["inputs"]), batch["labels"], reduction="none")

    batch = {"inputs": torch.randn(3, 4, dtype=torch.float64), "labels": torch.tensor([0, 1, 1])}
    problems = _problems(model, probe_batch=batch, loss_fn=loss_fn)
    assert "proj.weight" in problems[0]
    assert "do not add up" in problems[0]


def test_batch_normalized_loss_rejected():
    model = build_model("gpt2")

    def token_count_normalized(model, batch):
        valid = (batch["labels"][:, 1:] != -100).sum(dim=1)
        return per_example_losses(model, batch) * valid / valid.sum()

    problems = _problems(model, probe_batch=make_batch("gpt2"), loss_fn=token_count_normalized)
    assert "change when other examples are in the micro-batch" in problems[0]


def test_loss_with_wrong_shape_reported():
    model = build_model("vit")
    problems = _problems(model, probe_batch=make_batch("vit"), loss_fn=lambda model, batch: per_example_losses(model, batch).mean())
    assert "one loss per example" in problems[0]


def test_probe_with_fixed_batch_size():
    model = build_model("vit")
    engine = PerExampleGradients(model, batch_size=3)

    check_model_for_dp(model, engine, probe_batch=make_batch("vit", 3))

    per_example_losses(model, make_batch("vit", 3)).sum().backward()
    assert model.classifier.weight.grad_sample.shape[0] == 3
