"""DPMicroAdamPlugin: configuration from arguments and environment, and a custom accelerate loop."""

from __future__ import annotations

import pytest
import torch
from accelerate import Accelerator

from hf_dp_microadam import DPMicroAdamPlugin, DPMicroAdamTrainer, DPTrainingArguments
from trainer_helpers import pad_text_batch, text_classification_dataset, tiny_bert_classifier


def test_plugin_reads_environment_fallbacks(monkeypatch):
    monkeypatch.setenv("DP_MICROADAM_TARGET_EPSILON", "3.5")
    monkeypatch.setenv("DP_MICROADAM_EXPECTED_BATCH_SIZE", "64")
    monkeypatch.setenv("DP_MICROADAM_SECURE_MODE", "true")
    monkeypatch.setenv("DP_MICROADAM_OPTIMIZER", "dp-adam")

    plugin = DPMicroAdamPlugin()

    assert plugin.target_epsilon == 3.5
    assert plugin.expected_batch_size == 64
    assert plugin.secure_mode is True
    assert plugin.optimizer == "dp-adam"
    assert plugin.max_grad_norm == 1.0


def test_plugin_arguments_win_over_environment(monkeypatch):
    monkeypatch.setenv("DP_MICROADAM_TARGET_EPSILON", "3.5")
    plugin = DPMicroAdamPlugin(target_epsilon=8.0, expected_batch_size=16)
    assert plugin.target_epsilon == 8.0


def test_plugin_warns_on_misspelled_variable(monkeypatch, caplog):
    monkeypatch.setenv("DP_MICROADAM_TARGET_EPSLON", "3.5")
    with caplog.at_level("WARNING", logger="hf_dp_microadam.accelerate_plugin"):
        DPMicroAdamPlugin(target_epsilon=8.0, expected_batch_size=16)

    assert "DP_MICROADAM_TARGET_EPSLON" in caplog.text
    assert "did you mean DP_MICROADAM_TARGET_EPSILON" in caplog.text


def test_plugin_rejects_bad_environment_value(monkeypatch):
    monkeypatch.setenv("DP_MICROADAM_EXPECTED_BATCH_SIZE", "many")
    with pytest.raises(ValueError, match="DP_MICROADAM_EXPECTED_BATCH_SIZE"):
        DPMicroAdamPlugin(target_epsilon=1.0)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"target_epsilon": 1.0}, "expected_batch_size is required"),
        ({"expected_batch_size": 8}, "set target_epsilon"),
        ({"expected_batch_size": 8, "noise_multiplier": 1.0, "optimizer": "adam"}, "optimizer='adam'"),
        ({"expected_batch_size": 8, "noise_multiplier": 1.0, "max_grad_norm": -1.0}, "max_grad_norm"),
        ({"expected_batch_size": 8, "noise_multiplier": 1.0, "secure_mode": True, "seed": 1}, "cannot be seeded"),
    ],
)
def test_plugin_rejects_invalid_settings(settings, message):
    with pytest.raises(ValueError, match=message):
        DPMicroAdamPlugin(**settings)


def test_custom_loop_matches_the_trainer(tmp_path):
    """The plugin in a hand-written accelerate loop gives the Trainer's parameters, bit for bit."""
    dataset = text_classification_dataset()
    steps, lr = 3, 1e-2

    trainer_model = tiny_bert_classifier()
    trainer = DPMicroAdamTrainer(
        model=trainer_model,
        args=DPTrainingArguments(
            output_dir=str(tmp_path), logical_batch_size=8, per_device_train_batch_size=3, noise_multiplier=1.0,
            learning_rate=lr, max_steps=steps, lr_scheduler_type="constant", dp_seed=7, report_to="none",
            save_strategy="no", use_cpu=True, disable_tqdm=True,
        ),
        train_dataset=dataset,
        data_collator=pad_text_batch,
    )
    trainer.train()

    accelerator = Accelerator(cpu=True)
    plugin = DPMicroAdamPlugin(
        noise_multiplier=1.0, expected_batch_size=8, micro_batch_size=3, learning_rate=lr, seed=7
    )
    model = tiny_bert_classifier()
    model, optimizer, train_loader = plugin.prepare(
        model, dataset, max_steps=steps, collate_fn=pad_text_batch, accelerator=accelerator
    )
    model.train()
    for step, logical_batch in enumerate(train_loader):
        if step == steps:
            break
        for micro_batch in logical_batch:
            losses, _ = plugin.per_example_losses(model, micro_batch)
            plugin.backward(losses)
        optimizer.step()
        optimizer.zero_grad()

    for (name, expected), actual in zip(trainer_model.named_parameters(), model.parameters()):
        assert torch.equal(expected, actual), name
    assert plugin.privacy_report().epsilon == trainer.privacy_report().epsilon
    assert plugin.engine.accountant.steps == steps
