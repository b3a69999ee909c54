"""Per-example losses: one loss per example, never normalized over the batch."""

import pytest
import torch
import torch.nn.functional as F
from grad_sample_helpers import build_model, make_batch, select_examples, text_batch
from peft import LoraConfig, get_peft_model
from transformers import BertConfig, BertForSequenceClassification, BertModel

from hf_dp_microadam.privacy.losses import (
    CAUSAL_LM,
    MULTI_LABEL,
    REGRESSION,
    SINGLE_LABEL,
    compute_per_example_losses,
    infer_task,
    per_example_loss,
)


def test_single_label_classification():
    logits = torch.randn(4, 3)
    labels = torch.tensor([0, 2, 1, 2])
    losses = per_example_loss(logits, labels, task=SINGLE_LABEL)
    expected = torch.stack([F.cross_entropy(logits[i : i + 1], labels[i : i + 1]) for i in range(4)])
    torch.testing.assert_close(losses, expected)


def test_multi_label_classification_averages_labels():
    logits = torch.randn(2, 5)
    targets = torch.randint(0, 2, (2, 5)).float()
    losses = per_example_loss(logits, targets, task=MULTI_LABEL)
    expected = F.binary_cross_entropy_with_logits(logits, targets, reduction="none").mean(dim=1)
    torch.testing.assert_close(losses, expected)


def test_regression_single_output():
    predictions = torch.tensor([[1.0], [2.0], [0.5]])
    targets = torch.tensor([0.0, 2.0, 1.5])
    losses = per_example_loss(predictions, targets, task=REGRESSION)
    torch.testing.assert_close(losses, torch.tensor([1.0, 0.0, 1.0]))


def test_causal_lm_shifts_and_ignores_padding():
    vocab = 7
    logits = torch.randn(2, 5, vocab)
    labels = torch.tensor([[3, 4, 5, 6, 1], [2, 3, -100, -100, -100]])
    losses = per_example_loss(logits, labels, task=CAUSAL_LM)

    first = F.cross_entropy(logits[0, :4], labels[0, 1:])
    second = F.cross_entropy(logits[1, :1], labels[1, 1:2])
    torch.testing.assert_close(losses, torch.stack([first, second]))


def test_causal_lm_sum_reduction():
    logits = torch.randn(2, 4, 6)
    labels = torch.tensor([[1, 2, 3, 4], [5, 1, 2, -100]])
    mean = per_example_loss(logits, labels, task=CAUSAL_LM, token_reduction="mean")
    total = per_example_loss(logits, labels, task=CAUSAL_LM, token_reduction="sum")
    torch.testing.assert_close(total, mean * torch.tensor([3.0, 2.0]))


def test_causal_lm_attention_mask_ignores_positions():
    logits = torch.randn(1, 4, 6)
    labels = torch.tensor([[1, 2, 3, 4]])
    attention_mask = torch.tensor([[1, 1, 0, 0]])
    losses = per_example_loss(logits, labels, task=CAUSAL_LM, attention_mask=attention_mask)
    torch.testing.assert_close(losses, F.cross_entropy(logits[0, :1], labels[0, 1:2]).reshape(1))


def test_causal_lm_example_without_tokens_has_zero_loss():
    logits = torch.randn(2, 3, 6, requires_grad=True)
    labels = torch.tensor([[1, 2, 3], [4, -100, -100]])
    losses = per_example_loss(logits, labels, task=CAUSAL_LM)
    losses.sum().backward()

    assert losses[1].item() == 0.0
    assert torch.isfinite(logits.grad).all()
    assert torch.count_nonzero(logits.grad[1]) == 0


def test_invalid_arguments_raise():
    with pytest.raises(ValueError, match="task must be one of"):
        per_example_loss(torch.randn(2, 3), torch.tensor([0, 1]), task="translation")
    with pytest.raises(ValueError, match="token_reduction"):
        per_example_loss(torch.randn(2, 3, 4), torch.zeros(2, 3, dtype=torch.long), task=CAUSAL_LM, token_reduction="max")


def test_labels_never_reach_the_model():
    model = build_model("gpt2")
    seen_keys = []
    model.register_forward_pre_hook(lambda module, args, kwargs: seen_keys.append(set(kwargs)), with_kwargs=True)
    batch = make_batch("gpt2")
    batch["num_items_in_batch"] = torch.tensor(17)

    losses, outputs = compute_per_example_losses(model, batch)

    assert losses.shape == (3,)
    assert outputs.loss is None
    assert "labels" not in seen_keys[0]
    assert "num_items_in_batch" not in seen_keys[0]


@pytest.mark.parametrize("architecture", ["gpt2", "llama"])
def test_causal_lm_loss_matches_transformers_on_one_example(architecture):
    model = build_model(architecture)
    batch = make_batch(architecture)
    losses, _ = compute_per_example_losses(model, batch)
    for index in range(3):
        single = select_examples(batch, slice(index, index + 1))
        transformers_loss = model(**single).loss
        torch.testing.assert_close(losses[index], transformers_loss.to(losses.dtype))


@pytest.mark.parametrize("architecture", ["gpt2", "bert", "deit"])
def test_other_example_does_not_change_loss(architecture):
    model = build_model(architecture)
    batch = make_batch(architecture, seed=3)
    if architecture == "deit":
        changed = make_batch(architecture, seed=9)
    else:
        # The third example changes content and length (7 tokens instead of 2).
        changed = text_batch([7, 4, 7], architecture=architecture, seed=9)
    for key in batch:
        changed[key][:2] = batch[key][:2]

    losses, _ = compute_per_example_losses(model, batch)
    changed_losses, _ = compute_per_example_losses(model, changed)

    torch.testing.assert_close(changed_losses[:2], losses[:2], rtol=1e-12, atol=0)
    assert changed_losses[2] != losses[2]


def test_infer_task():
    assert infer_task(build_model("gpt2")) == CAUSAL_LM
    assert infer_task(build_model("llama", lora=True)) == CAUSAL_LM
    assert infer_task(build_model("bert", lora=True)) == SINGLE_LABEL
    assert infer_task(build_model("deit")) == SINGLE_LABEL
    assert infer_task(build_model("vit"), torch.zeros(2, 3)) == MULTI_LABEL
    assert infer_task(_bert(num_labels=1)) == REGRESSION
    assert infer_task(_bert(num_labels=4, problem_type=MULTI_LABEL)) == MULTI_LABEL


def _bert(**settings):
    config = BertConfig(vocab_size=20, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8, **settings)
    return BertForSequenceClassification(config)


def test_infer_task_rejects_model_without_head():
    config = BertConfig(vocab_size=20, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8)
    with pytest.raises(ValueError, match="pass task="):
        infer_task(BertModel(config))


def test_peft_regression_model_loss():
    model = get_peft_model(_bert(num_labels=1), LoraConfig(task_type="SEQ_CLS", r=2, target_modules=["query"]))
    batch = {"input_ids": torch.randint(0, 20, (3, 5)), "labels": torch.tensor([0.5, -1.0, 2.0])}
    losses, outputs = compute_per_example_losses(model, batch)
    expected = (outputs.logits.squeeze(-1) - batch["labels"]).pow(2)
    torch.testing.assert_close(losses, expected)


def test_missing_labels_raise():
    model = build_model("gpt2")
    with pytest.raises(ValueError, match="no 'labels' entry"):
        compute_per_example_losses(model, {"input_ids": torch.ones(1, 3, dtype=torch.long)})
