"""MeanPooledBertForSequenceClassification: the pooled vector, padding, PEFT and the Trainer's loss."""

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import BertConfig

from hf_dp_microadam.modeling_mean_pooling import MeanPooledBertForSequenceClassification, masked_mean


def tiny_model(num_labels: int = 3) -> MeanPooledBertForSequenceClassification:
    torch.manual_seed(0)
    config = BertConfig(vocab_size=30, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, num_labels=num_labels, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    return MeanPooledBertForSequenceClassification(config).eval()


def test_masked_mean_ignores_masked_positions():
    hidden = torch.arange(24, dtype=torch.float32).reshape(2, 3, 4)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])

    pooled = masked_mean(hidden, mask)

    torch.testing.assert_close(pooled[0], hidden[0, :2].mean(0))
    torch.testing.assert_close(pooled[1], hidden[1, 0])
    torch.testing.assert_close(masked_mean(hidden, None), hidden.mean(1))


def test_logits_are_the_classifier_on_the_masked_mean():
    model = tiny_model()
    input_ids = torch.tensor([[5, 6, 7, 0, 0], [8, 9, 10, 11, 12]])
    attention_mask = (input_ids != 0).long()

    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits

    states = model.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    expected = torch.stack([model.classifier(states[0, :3].mean(0)), model.classifier(states[1].mean(0))])
    torch.testing.assert_close(logits, expected)
    assert model.bert.pooler is None
    assert model.config.classifier_pooling == "mean"


def test_padding_keeps_logits():
    model = tiny_model()
    alone = model(input_ids=torch.tensor([[5, 6, 7]]), attention_mask=torch.ones(1, 3, dtype=torch.long)).logits
    padded = model(input_ids=torch.tensor([[5, 6, 7, 0, 0, 0]]),
                   attention_mask=torch.tensor([[1, 1, 1, 0, 0, 0]])).logits
    torch.testing.assert_close(padded, alone)


@pytest.mark.parametrize("labels, problem_type", [
    (torch.tensor([0, 2]), "single_label_classification"),
    (torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]]), "multi_label_classification"),
])
def test_loss_follows_problem_type(labels, problem_type):
    model = tiny_model()
    batch = {"input_ids": torch.tensor([[5, 6], [7, 8]]), "attention_mask": torch.ones(2, 2, dtype=torch.long)}

    output = model(**batch, labels=labels)

    assert model.config.problem_type == problem_type
    if problem_type == "single_label_classification":
        expected = torch.nn.functional.cross_entropy(output.logits, labels)
    else:
        expected = torch.nn.functional.binary_cross_entropy_with_logits(output.logits, labels)
    torch.testing.assert_close(output.loss, expected)


def test_peft_wrapper_passes_return_dict():
    # PeftModelForSequenceClassification passes return_dict and the other output options on.
    model = get_peft_model(tiny_model(), LoraConfig(task_type="SEQ_CLS", target_modules=["query", "value"], r=2))
    batch = {"input_ids": torch.tensor([[5, 6, 0]]), "attention_mask": torch.tensor([[1, 1, 0]]),
             "labels": torch.tensor([1])}

    output = model(**batch)
    as_tuple = model(**batch, return_dict=False)

    torch.testing.assert_close(as_tuple[0], output.loss)
    torch.testing.assert_close(as_tuple[1], output.logits)
    trainable = [name for name, parameter in model.named_parameters() if parameter.requires_grad]
    assert any("classifier" in name for name in trainable)
