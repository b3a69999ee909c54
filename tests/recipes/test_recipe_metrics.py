"""Metric helpers of the recipes: accuracy, logits reduction, perplexity."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from transformers import EvalPrediction, GPT2Config, GPT2LMHeadModel

from hf_dp_microadam.recipes.data import CausalLMCollator
from hf_dp_microadam.recipes.metrics import (
    accuracy,
    classification_metrics,
    evaluate_perplexity,
    logits_to_class_ids,
    perplexity,
)


def test_accuracy_counts_matches():
    assert accuracy([0, 1, 1, 2], [0, 1, 0, 2]) == 0.75


def test_accuracy_rejects_shape_mismatch():
    with pytest.raises(ValueError, match="do not match"):
        accuracy([0, 1], [0, 1, 1])


def test_accuracy_rejects_empty_input():
    with pytest.raises(ValueError, match="zero examples"):
        accuracy([], [])


def test_classification_metrics_from_logits():
    logits = np.array([[2.0, 0.1], [0.3, 0.9], [1.0, -1.0]])
    labels = np.array([0, 1, 1])
    assert classification_metrics(EvalPrediction(predictions=logits, label_ids=labels)) == {
        "accuracy": pytest.approx(2 / 3)
    }


def test_classification_metrics_from_class_ids():
    ids = logits_to_class_ids(torch.tensor([[2.0, 0.1], [0.3, 0.9], [1.0, -1.0]]), None)
    assert ids.tolist() == [0, 1, 0]
    metrics = classification_metrics(EvalPrediction(predictions=ids.numpy(), label_ids=np.array([0, 1, 1])))
    assert metrics["accuracy"] == pytest.approx(2 / 3)


def test_logits_to_class_ids_takes_first_of_tuple():
    ids = logits_to_class_ids((torch.tensor([[0.0, 1.0]]), torch.zeros(1, 4)), None)
    assert ids.tolist() == [1]


def test_perplexity_of_loss():
    assert perplexity(0.0) == 1.0
    assert perplexity(math.log(20.0)) == pytest.approx(20.0)
    assert perplexity(1e6) == math.inf


class Tokenizer:
    pad_token_id = 0


def tiny_lm() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=30, n_embd=16, n_layer=1, n_head=2, n_positions=16, bos_token_id=1, eos_token_id=2, pad_token_id=0
    )
    return GPT2LMHeadModel(config)


def test_evaluate_perplexity_weights_tokens_equally():
    model = tiny_lm()
    examples = [{"input_ids": [3, 4, 5, 6, 7, 8]}, {"input_ids": [9, 10]}]
    collator = CausalLMCollator(Tokenizer())
    batch = collator(examples)

    result = evaluate_perplexity(model, [batch], device=torch.device("cpu"))

    expected_sum, expected_count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for example in examples:
            ids = torch.tensor([example["input_ids"]])
            logits = model(input_ids=ids).logits[0, :-1]
            expected_sum += float(torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum"))
            expected_count += ids.shape[1] - 1
    assert result["tokens"] == expected_count == 6
    assert result["loss"] == pytest.approx(expected_sum / expected_count, rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(expected_sum / expected_count), rel=1e-5)


def test_evaluate_perplexity_restores_training_mode():
    model = tiny_lm().train()
    batch = CausalLMCollator(Tokenizer())([{"input_ids": [1, 2, 3]}])
    evaluate_perplexity(model, [batch])
    assert model.training


def test_evaluate_perplexity_rejects_no_tokens():
    batch = CausalLMCollator(Tokenizer())([{"input_ids": [1]}])
    with pytest.raises(ValueError, match="no token"):
        evaluate_perplexity(tiny_lm(), [batch])
