"""PEFT order of operations: get_peft_model first, then hooks; every adapter tensor trains."""

import pytest
import torch
from grad_sample_helpers import build_model, lora_config, make_batch, per_example_losses, trainable_parameters
from peft import LoraConfig, get_peft_model

from hf_dp_microadam.privacy.grad_sample import PerExampleGradients


def _sgd_step_on_summed_per_example_gradients(model, engine, batch, optimizer) -> None:
    per_example_losses(model, batch).sum().backward()
    for parameter in trainable_parameters(model).values():
        parameter.grad = parameter.grad_sample.sum(dim=0)
    engine.clear_grad_samples()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def test_peft_applied_after_hooks_raises():
    base = build_model("gpt2")
    PerExampleGradients(base)
    model = get_peft_model(base, lora_config("gpt2"))

    with pytest.raises(RuntimeError, match="get_peft_model was applied afterwards") as error:
        per_example_losses(model, make_batch("gpt2"))
    assert "lora_A" in str(error.value)


def test_peft_applied_after_hooks_passes_in_eval():
    base = build_model("gpt2")
    PerExampleGradients(base)
    model = get_peft_model(base, lora_config("gpt2")).eval()
    with torch.no_grad():
        per_example_losses(model, make_batch("gpt2"))


@pytest.mark.parametrize("architecture", ["gpt2", "bert", "vit"])
def test_first_step_changes_every_trainable_tensor(architecture):
    model = build_model(architecture, lora=True)
    engine = PerExampleGradients(model)
    before = {name: p.detach().clone() for name, p in trainable_parameters(model).items()}
    optimizer = torch.optim.SGD(trainable_parameters(model).values(), lr=0.1)

    _sgd_step_on_summed_per_example_gradients(model, engine, make_batch(architecture), optimizer)

    unchanged = [name for name, p in trainable_parameters(model).items() if torch.equal(p, before[name])]
    assert unchanged == []
    assert any("lora_A" in name for name in before)
    assert any("lora_B" in name for name in before)


def test_zero_initialised_lora_b():
    """With PEFT's default init (B = 0) A's gradient is exactly zero at step 1, and nonzero after."""
    base = build_model("llama")
    model = get_peft_model(base, LoraConfig(task_type="CAUSAL_LM", r=4, target_modules=["q_proj", "v_proj"])).double()
    engine = PerExampleGradients(model)
    optimizer = torch.optim.SGD(trainable_parameters(model).values(), lr=0.5)
    initial = {name: p.detach().clone() for name, p in trainable_parameters(model).items()}
    batch = make_batch("llama")

    _sgd_step_on_summed_per_example_gradients(model, engine, batch, optimizer)
    changed = {name for name, p in trainable_parameters(model).items() if not torch.equal(p, initial[name])}
    assert changed == {name for name in initial if "lora_B" in name}

    _sgd_step_on_summed_per_example_gradients(model, engine, batch, optimizer)
    changed = {name for name, p in trainable_parameters(model).items() if not torch.equal(p, initial[name])}
    assert changed == set(initial)
