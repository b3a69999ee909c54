"""The model keeps its transformers/PEFT API while per-example gradient hooks are attached."""

import inspect

import pytest
import torch
from grad_sample_helpers import (
    assert_gradients_match,
    build_model,
    engine_per_example_gradients,
    make_batch,
    reference_per_example_gradients,
    trainable_parameters,
)
from peft import PeftModel
from transformers import GPT2LMHeadModel

from hf_dp_microadam.privacy.grad_sample import PerExampleGradients


def test_model_object_unchanged():
    model = build_model("gpt2")
    signature = inspect.signature(model.forward)
    config = model.config

    engine = PerExampleGradients(model)

    assert type(model) is GPT2LMHeadModel
    assert engine.model is model
    assert model.config is config
    assert inspect.signature(model.forward) == signature
    for name in ("save_pretrained", "generate", "gradient_checkpointing_enable", "push_to_hub"):
        assert callable(getattr(model, name))


def test_save_and_load_round_trip(tmp_path):
    model = build_model("gpt2")
    PerExampleGradients(model)
    engine_per_example_gradients(model, make_batch("gpt2"))

    model.save_pretrained(tmp_path)
    loaded = GPT2LMHeadModel.from_pretrained(tmp_path, dtype=torch.float64)

    expected = model.state_dict()
    for name, value in loaded.state_dict().items():
        torch.testing.assert_close(value, expected[name], rtol=0, atol=0)
    assert not any(hasattr(p, "grad_sample") for p in loaded.parameters())


def test_peft_adapter_save_and_load(tmp_path):
    model = build_model("llama", lora=True)
    PerExampleGradients(model)
    engine_per_example_gradients(model, make_batch("llama"))

    model.save_pretrained(tmp_path)
    base = build_model("llama")
    loaded = PeftModel.from_pretrained(base, tmp_path)

    adapters = {name: p for name, p in model.named_parameters() if "lora_" in name}
    assert adapters
    loaded_parameters = dict(loaded.named_parameters())
    for name, value in adapters.items():
        torch.testing.assert_close(loaded_parameters[name].double(), value.detach(), rtol=0, atol=0)


@pytest.mark.parametrize("architecture", ["gpt2", "llama"])
@pytest.mark.parametrize("training", [False, True])
def test_generate_with_hooks(architecture, training):
    model = build_model(architecture)
    model.train(training)
    prompt = make_batch(architecture, 2)
    inputs = {"input_ids": prompt["input_ids"][:, :3], "attention_mask": prompt["attention_mask"][:, :3]}
    settings = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    expected = model.generate(**inputs, **settings)

    PerExampleGradients(model)
    generated = model.generate(**inputs, **settings)

    assert torch.equal(generated, expected)
    assert all(p.grad_sample is None for p in trainable_parameters(model).values())


@pytest.mark.parametrize("use_reentrant", [False, True])
@pytest.mark.parametrize(("architecture", "lora"), [("gpt2", False), ("llama", True)])
def test_gradient_checkpointing_keeps_gradients_exact(architecture, lora, use_reentrant):
    model = build_model(architecture, lora=lora)
    batch = make_batch(architecture)
    expected = reference_per_example_gradients(model, batch)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    layers = model.get_base_model().model.layers if lora else model.transformer.h
    assert all(layer.gradient_checkpointing for layer in layers)

    PerExampleGradients(model)
    actual = engine_per_example_gradients(model, batch)

    assert_gradients_match(actual, expected)
