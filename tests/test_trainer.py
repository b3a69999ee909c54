"""DPMicroAdamTrainer end to end on tiny random models: training, evaluation, checkpoints, budget."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import (
    AutoModelForSequenceClassification,
    GPT2LMHeadModel,
    TrainerCallback,
    ViTForImageClassification,
)

from hf_dp_microadam import DPMicroAdamTrainer, DPTrainingArguments
from hf_dp_microadam.engine import DP_STATE_FILE, DPSettingsChangedError
from trainer_helpers import (
    causal_lm_dataset,
    image_dataset,
    pad_text_batch,
    stack_image_batch,
    text_classification_dataset,
    tiny_bert_classifier,
    tiny_gpt2,
    tiny_vit,
)


def dp_args(tmp_path, **overrides) -> DPTrainingArguments:
    settings = dict(
        output_dir=str(tmp_path / "run"),
        logical_batch_size=8,
        per_device_train_batch_size=3,
        per_device_eval_batch_size=8,
        noise_multiplier=1.0,
        per_sample_max_grad_norm=1.0,
        learning_rate=1e-2,
        max_steps=4,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        dp_seed=1234,
        seed=0,
        use_cpu=True,
        disable_tqdm=True,
    )
    settings.update(overrides)
    return DPTrainingArguments(**settings)


def accuracy(eval_prediction) -> dict:
    predictions = np.argmax(eval_prediction.predictions, axis=-1)
    return {"accuracy": float((predictions == eval_prediction.label_ids).mean())}


def trainable_snapshot(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


# ---- End to end ----


def test_sequence_classification_full_finetuning(tmp_path):
    model = tiny_bert_classifier()
    before = trainable_snapshot(model)
    trainer = DPMicroAdamTrainer(
        model=model,
        args=dp_args(tmp_path),
        train_dataset=text_classification_dataset(),
        eval_dataset=text_classification_dataset(16, seed=1),
        data_collator=pad_text_batch,
        compute_metrics=accuracy,
    )
    trainer.train()

    changed = [name for name, p in model.named_parameters() if not torch.equal(p, before[name])]
    assert changed, "no parameter changed"
    metrics = trainer.evaluate()
    assert 0.0 <= metrics["eval_accuracy"] <= 1.0
    assert math.isfinite(metrics["eval_loss"])

    trainer.save_model(str(tmp_path / "saved"))
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "saved")
    for name, p in reloaded.named_parameters():
        assert torch.equal(p, dict(model.named_parameters())[name]), name


def test_sequence_classification_lora_updates_every_adapter(tmp_path):
    base = tiny_bert_classifier()
    model = get_peft_model(
        base,
        LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], task_type="SEQ_CLS"),
    )
    before = trainable_snapshot(model)
    trainer = DPMicroAdamTrainer(
        model=model,
        args=dp_args(tmp_path, dp_optimizer="dp-adam", max_steps=2),
        train_dataset=text_classification_dataset(),
        eval_dataset=text_classification_dataset(16, seed=1),
        data_collator=pad_text_batch,
        compute_metrics=accuracy,
    )
    trainer.train()

    after = dict(model.named_parameters())
    unchanged = [name for name, value in before.items() if torch.equal(after[name], value)]
    assert not unchanged, f"trainable tensors left unchanged: {unchanged}"
    assert any("classifier" in name for name in before), "the classification head should be trainable"
    assert "eval_accuracy" in trainer.evaluate()

    model.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(tiny_bert_classifier(), tmp_path / "adapter")
    reloaded_parameters = dict(reloaded.named_parameters())
    for name, value in after.items():
        if "lora_" in name:
            assert torch.equal(reloaded_parameters[name], value), name


def test_causal_lm_lora_trains_and_generates(tmp_path):
    model = get_peft_model(
        tiny_gpt2(),
        LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True, task_type="CAUSAL_LM"),
    )
    before = trainable_snapshot(model)
    trainer = DPMicroAdamTrainer(
        model=model,
        args=dp_args(tmp_path, max_steps=2, learning_rate=5e-2),
        train_dataset=causal_lm_dataset(),
        eval_dataset=causal_lm_dataset(16, seed=1),
        data_collator=pad_text_batch,
    )
    trainer.train()

    after = dict(model.named_parameters())
    assert all(not torch.equal(after[name], value) for name, value in before.items())
    assert math.isfinite(trainer.evaluate()["eval_loss"])
    generated = model.generate(input_ids=torch.tensor([[5, 6, 7]]), max_new_tokens=3, do_sample=False)
    assert generated.shape == (1, 6)

    model.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(tiny_gpt2(), tmp_path / "adapter")
    assert isinstance(reloaded.get_base_model(), GPT2LMHeadModel)


def test_image_classification(tmp_path):
    model = tiny_vit()
    before = trainable_snapshot(model)
    trainer = DPMicroAdamTrainer(
        model=model,
        args=dp_args(tmp_path, max_steps=2),
        train_dataset=image_dataset(),
        eval_dataset=image_dataset(16, seed=1),
        data_collator=stack_image_batch,
        compute_metrics=accuracy,
    )
    trainer.train()

    after = dict(model.named_parameters())
    assert not torch.equal(after["vit.embeddings.cls_token"], before["vit.embeddings.cls_token"])
    assert "eval_accuracy" in trainer.evaluate()
    trainer.save_model(str(tmp_path / "saved"))
    reloaded = ViTForImageClassification.from_pretrained(tmp_path / "saved")
    assert torch.equal(reloaded.vit.embeddings.cls_token, model.vit.embeddings.cls_token)


# ---- Privacy mechanics seen through the Trainer ----


def test_bf16_autocast_trains(tmp_path):
    model = tiny_bert_classifier()
    before = trainable_snapshot(model)
    trainer = DPMicroAdamTrainer(
        model=model,
        args=dp_args(tmp_path, bf16=True, max_steps=2),
        train_dataset=text_classification_dataset(),
        data_collator=pad_text_batch,
    )
    trainer.train()

    after = dict(model.named_parameters())
    assert all(p.dtype == torch.float32 for p in after.values())
    assert any(not torch.equal(after[name], value) for name, value in before.items())
    assert trainer.dp_engine.accountant.steps == 2


def test_log_history_has_epsilon_and_no_grad_norm(tmp_path):
    trainer = DPMicroAdamTrainer(
        model=tiny_bert_classifier(),
        args=dp_args(tmp_path),
        train_dataset=text_classification_dataset(),
        data_collator=pad_text_batch,
    )
    trainer.train()

    training_logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(training_logs) == 4
    epsilons = [entry["epsilon"] for entry in training_logs]
    assert all(math.isfinite(value) and value > 0 for value in epsilons)
    assert epsilons == sorted(epsilons)
    summary = trainer.state.log_history[-1]
    assert "train_loss" in summary
    assert summary["epsilon"] == epsilons[-1]
    assert not any("grad_norm" in entry for entry in trainer.state.log_history)


def test_one_trainer_step_is_one_noise_draw_and_one_accountant_step(tmp_path):
    trainer = DPMicroAdamTrainer(
        model=tiny_bert_classifier(),
        args=dp_args(tmp_path, per_device_train_batch_size=2, max_steps=5),
        train_dataset=text_classification_dataset(),
        data_collator=pad_text_batch,
    )
    trainer.train()

    engine = trainer.dp_engine
    assert trainer.state.global_step == 5
    assert engine.accountant.steps == 5
    assert engine.optimizer.privacy_state_dict()["noise_draws"] == 5
    assert trainer.privacy_report().steps == 5


def test_privacy_report_file(tmp_path):
    trainer = DPMicroAdamTrainer(
        model=tiny_bert_classifier(),
        args=dp_args(tmp_path),
        train_dataset=text_classification_dataset(),
        data_collator=pad_text_batch,
    )
    output = trainer.train()

    with open(os.path.join(trainer.args.output_dir, "privacy_report.json")) as handle:
        report = json.load(handle)
    assert report["steps"] == 4
    assert report["noise_multiplier"] == 1.0
    assert report["max_grad_norm"] == 1.0
    assert report["sample_rate"] == pytest.approx(8 / 48)
    assert report["epsilon"] == pytest.approx(output.metrics["epsilon"])


def test_log_metrics_prints_delta_unrounded(tmp_path, capsys):
    trainer = DPMicroAdamTrainer(
        model=tiny_bert_classifier(),
        args=dp_args(tmp_path),
        train_dataset=text_classification_dataset(),
        data_collator=pad_text_batch,
    )
    trainer.log_metrics("train", {"epsilon": 7.96, "delta": 3.894e-05})

    printed = capsys.readouterr().out
    assert "3.894e-05" in printed
    assert "7.96" in printed


def test_target_epsilon_calibrates_noise_for_the_planned_steps(tmp_path):
    trainer = DPMicroAdamTrainer(
        model=tiny_bert_classifier(),
        args=dp_args(tmp_path, noise_multiplier=None, target_epsilon=4.0, max_steps=6),
        train_dataset=text_classification_dataset(),
        data_collator=pad_text_batch,
    )
    trainer.train()

    report = trainer.privacy_report()
    assert trainer.state.global_step == 6
    assert report.epsilon <= 4.0
    assert report.epsilon == pytest.approx(4.0, rel=0.02)


def test_budget_stops_training_before_exceeding_target(tmp_path):
    # A fixed noise multiplier with a target epsilon: the target caps the number of steps.
    trainer = DPMicroAdamTrainer(
        model=tiny_bert_classifier(),
        args=dp_args(tmp_path, noise_multiplier=1.0, target_epsilon=2.0, max_steps=200),
        train_dataset=text_classification_dataset(),
        data_collator=pad_text_batch,
    )
    trainer.train()

    engine = trainer.dp_engine
    steps = trainer.state.global_step
    assert 0 < steps < 200
    assert engine.epsilon <= 2.0
    assert engine.accountant.epsilon_after(steps + 1) > 2.0


@pytest.mark.parametrize("gradient_checkpointing", [False, True], ids=["plain", "gradient_checkpointing"])
def test_noise_free_step_matches_a_per_example_loop(tmp_path, gradient_checkpointing):
    """With noise_multiplier=0 and dp-sgd, one step is theta - lr * sum_i clip(g_i) / B."""
    model = tiny_bert_classifier()
    reference = tiny_bert_classifier()
    dataset = text_classification_dataset()
    lr, clip, batch_size = 0.5, 0.1, 8
    trainer = DPMicroAdamTrainer(
        model=model,
        args=dp_args(tmp_path, noise_multiplier=0.0, dp_optimizer="dp-sgd", learning_rate=lr,
                     per_sample_max_grad_norm=clip, logical_batch_size=batch_size, max_steps=1,
                     lr_scheduler_type="constant", activation_checkpointing=gradient_checkpointing),
        train_dataset=dataset,
        data_collator=pad_text_batch,
    )
    # The first logical batch the trainer will draw, from an identical sampler.
    indices = next(iter(trainer.get_train_dataloader().batch_sampler))
    trainer.dp_plugin.engine = None
    trainer.dp_engine = None
    trainer.train()

    reference.train()
    parameters = [p for p in reference.parameters() if p.requires_grad]
    clipped_sum = [torch.zeros_like(p) for p in parameters]
    for index in indices:
        batch = pad_text_batch([dataset[index]])
        logits = reference(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss = torch.nn.functional.cross_entropy(logits, batch["labels"])
        gradients = torch.autograd.grad(loss, parameters)
        norm = torch.sqrt(sum(g.pow(2).sum() for g in gradients))
        factor = min(1.0, clip / (float(norm) + 1e-6))
        for total, gradient in zip(clipped_sum, gradients):
            total += factor * gradient
    with torch.no_grad():
        for p, total in zip(parameters, clipped_sum):
            p -= lr * total / batch_size

    assert len(indices) > 0
    for (name, p), expected in zip(
        [(n, p) for n, p in model.named_parameters() if p.requires_grad], parameters
    ):
        torch.testing.assert_close(p, expected, rtol=1e-5, atol=1e-6, msg=name)


# ---- Checkpoints ----


@pytest.mark.parametrize("num_workers", [0, 1], ids=["in_process", "prefetching_worker"])
def test_resume_is_bit_identical_to_an_uninterrupted_run(tmp_path, num_workers):
    # A worker process makes the loader draw batches ahead of training: the saved sampler
    # position must still be the number of batches really used.
    dataset = text_classification_dataset()

    straight_model = tiny_bert_classifier()
    straight = DPMicroAdamTrainer(
        model=straight_model,
        args=dp_args(tmp_path / "straight", max_steps=4, dataloader_num_workers=num_workers),
        train_dataset=dataset,
        data_collator=pad_text_batch,
    )
    straight.train()

    first_model = tiny_bert_classifier()
    first = DPMicroAdamTrainer(
        model=first_model,
        args=dp_args(tmp_path / "resumed", max_steps=4, save_strategy="steps", save_steps=2,
                     dataloader_num_workers=num_workers),
        train_dataset=dataset,
        data_collator=pad_text_batch,
    )
    # Stop after step 2 as if the job had been killed right after the checkpoint.
    first.add_callback(_StopAfter(2))
    first.train()
    checkpoint = os.path.join(first.args.output_dir, "checkpoint-2")
    assert os.path.isfile(os.path.join(checkpoint, DP_STATE_FILE))

    resumed_model = tiny_bert_classifier(seed=99)
    resumed = DPMicroAdamTrainer(
        model=resumed_model,
        args=dp_args(tmp_path / "resumed", max_steps=4, save_strategy="steps", save_steps=2,
                     dataloader_num_workers=num_workers),
        train_dataset=dataset,
        data_collator=pad_text_batch,
    )
    resumed.train(resume_from_checkpoint=checkpoint)

    assert resumed.state.global_step == 4
    for (name, p), q in zip(straight_model.named_parameters(), resumed_model.parameters()):
        assert torch.equal(p, q), name
    assert resumed.dp_engine.accountant.steps == 4
    assert resumed.privacy_report().epsilon == straight.privacy_report().epsilon


def test_resume_without_privacy_state_is_rejected(tmp_path):
    args = dp_args(tmp_path, max_steps=2, save_strategy="steps", save_steps=2)
    trainer = DPMicroAdamTrainer(
        model=tiny_bert_classifier(), args=args, train_dataset=text_classification_dataset(),
        data_collator=pad_text_batch,
    )
    trainer.train()
    checkpoint = os.path.join(args.output_dir, "checkpoint-2")
    os.remove(os.path.join(checkpoint, DP_STATE_FILE))

    again = DPMicroAdamTrainer(
        model=tiny_bert_classifier(), args=dp_args(tmp_path, max_steps=4), train_dataset=text_classification_dataset(),
        data_collator=pad_text_batch,
    )
    with pytest.raises(FileNotFoundError, match="restart epsilon at 0"):
        again.train(resume_from_checkpoint=checkpoint)


def _checkpoint_after_two_steps(tmp_path, **overrides) -> str:
    """Run two of four planned steps and return the checkpoint saved after step 2."""
    args = dp_args(tmp_path, max_steps=4, save_strategy="steps", save_steps=2, **overrides)
    trainer = DPMicroAdamTrainer(
        model=tiny_bert_classifier(), args=args, train_dataset=text_classification_dataset(),
        data_collator=pad_text_batch,
    )
    trainer.add_callback(_StopAfter(2))
    trainer.train()
    return os.path.join(args.output_dir, "checkpoint-2")


def _resume(tmp_path, checkpoint: str, **overrides) -> DPMicroAdamTrainer:
    trainer = DPMicroAdamTrainer(
        model=tiny_bert_classifier(), args=dp_args(tmp_path, **overrides), train_dataset=text_classification_dataset(),
        data_collator=pad_text_batch,
    )
    trainer.train(resume_from_checkpoint=checkpoint)
    return trainer


@pytest.mark.parametrize("changed, named", [
    ({"target_epsilon": 3.0}, "target_epsilon: saved 8.0, now 3.0"),
    ({"max_steps": 6}, "planned_steps: saved 4, now 6"),
    ({"per_sample_max_grad_norm": 0.5}, "max_grad_norm: saved 1.0, now 0.5"),
])
def test_resume_error_names_changed_option(tmp_path, changed, named):
    calibrated = {"noise_multiplier": None, "target_epsilon": 8.0}
    checkpoint = _checkpoint_after_two_steps(tmp_path, **calibrated)

    with pytest.raises(DPSettingsChangedError, match=named) as raised:
        _resume(tmp_path, checkpoint, **{**calibrated, **changed})
    # The calibrated noise multiplier changes with target_epsilon and the planned steps, not with the clipping norm.
    assert str(raised.value).count("saved") == (1 if "max_grad_norm" in named else 2)


def test_resume_fixed_noise_extends_training(tmp_path):
    checkpoint = _checkpoint_after_two_steps(tmp_path)

    resumed = _resume(tmp_path, checkpoint, max_steps=6)

    assert resumed.dp_engine.accountant.steps == 6


class _StopAfter(TrainerCallback):
    """Stop training after a given step, as if the job had been killed there."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True
        return control


# ---- Rejections ----


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"max_grad_norm": 1.0}, "per_sample_max_grad_norm"),
        ({"gradient_accumulation_steps": 2}, "raise logical_batch_size"),
        ({"fp16": True}, "use bf16=True"),
        ({"auto_find_batch_size": True}, "auto_find_batch_size"),
        ({"noise_multiplier": None}, "set target_epsilon"),
        ({"noise_multiplier": -1.0}, "noise_multiplier must be >= 0"),
        ({"per_sample_max_grad_norm": 0.0}, "per_sample_max_grad_norm must be a positive"),
        ({"dp_optimizer": "dp-lion"}, "dp_optimizer"),
        ({"logical_batch_size": 0}, "logical_batch_size must be at least 1"),
        ({"secure_mode": True, "dp_seed": 3}, "cannot be seeded"),
    ],
)
def test_arguments_reject_settings_that_break_accounting(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        dp_args(tmp_path, **overrides)


def test_trainer_rejects_plain_training_arguments(tmp_path):
    from transformers import TrainingArguments

    with pytest.raises(TypeError, match="DPTrainingArguments"):
        DPMicroAdamTrainer(model=tiny_bert_classifier(), args=TrainingArguments(output_dir=str(tmp_path)))


def test_trainer_rejects_custom_optimizer(tmp_path):
    model = tiny_bert_classifier()
    with pytest.raises(ValueError, match="builds its own DP optimizer"):
        DPMicroAdamTrainer(
            model=model, args=dp_args(tmp_path), optimizers=(torch.optim.SGD(model.parameters(), lr=0.1), None)
        )


def test_trainer_rejects_compute_loss_func(tmp_path):
    with pytest.raises(ValueError, match="compute_loss_func"):
        DPMicroAdamTrainer(
            model=tiny_bert_classifier(), args=dp_args(tmp_path), compute_loss_func=lambda *args, **kw: 0.0
        )


def test_trainer_rejects_iterable_dataset(tmp_path):
    iterable = text_classification_dataset().to_iterable_dataset()
    trainer = DPMicroAdamTrainer(
        model=tiny_bert_classifier(), args=dp_args(tmp_path), train_dataset=iterable, data_collator=pad_text_batch
    )
    with pytest.raises(ValueError, match="IterableDataset"):
        trainer.train()


def test_trainer_rejects_batch_larger_than_dataset(tmp_path):
    trainer = DPMicroAdamTrainer(
        model=tiny_bert_classifier(), args=dp_args(tmp_path, logical_batch_size=100),
        train_dataset=text_classification_dataset(), data_collator=pad_text_batch,
    )
    with pytest.raises(ValueError, match="larger than the training set"):
        trainer.train()


def test_second_train_call_is_rejected(tmp_path):
    trainer = DPMicroAdamTrainer(
        model=tiny_bert_classifier(), args=dp_args(tmp_path, max_steps=1),
        train_dataset=text_classification_dataset(), data_collator=pad_text_batch,
    )
    trainer.train()
    with pytest.raises(RuntimeError, match="restart epsilon at 0"):
        trainer.train()


def test_disable_dp_reports_infinite_epsilon(tmp_path):
    trainer = DPMicroAdamTrainer(
        model=tiny_bert_classifier(), args=dp_args(tmp_path, noise_multiplier=None, disable_dp=True, max_steps=2),
        train_dataset=text_classification_dataset(), data_collator=pad_text_batch,
    )
    output = trainer.train()
    assert output.metrics["epsilon"] == math.inf
    assert trainer.privacy_report().epsilon == math.inf


def test_secure_mode_trains_and_reports(tmp_path):
    trainer = DPMicroAdamTrainer(
        model=tiny_bert_classifier(), args=dp_args(tmp_path, secure_mode=True, dp_seed=None, max_steps=2),
        train_dataset=text_classification_dataset(), data_collator=pad_text_batch,
    )
    trainer.train()

    report = trainer.privacy_report()
    assert report.secure_mode is True
    assert report.steps == 2
    assert trainer.dp_engine.sampler.secure_mode is True
