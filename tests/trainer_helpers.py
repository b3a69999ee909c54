"""Tiny random models and datasets for the Trainer and plugin tests (built in memory, no downloads)."""

from __future__ import annotations

import datasets
import torch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    ViTConfig,
    ViTForImageClassification,
)

VOCAB_SIZE = 50
PAD_ID = 0


def tiny_bert_classifier(seed: int = 0) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=VOCAB_SIZE, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=32, num_labels=2,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, pad_token_id=PAD_ID,
    )
    return BertForSequenceClassification(config)


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=VOCAB_SIZE, n_embd=16, n_layer=2, n_head=2, n_positions=32,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, pad_token_id=PAD_ID,
    )
    return GPT2LMHeadModel(config)


def tiny_vit(seed: int = 0) -> ViTForImageClassification:
    torch.manual_seed(seed)
    config = ViTConfig(
        image_size=8, patch_size=4, num_channels=1, hidden_size=16, num_hidden_layers=2,
        num_attention_heads=2, intermediate_size=32, num_labels=3,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    return ViTForImageClassification(config)


def text_classification_dataset(num_examples: int = 48, seed: int = 0) -> datasets.Dataset:
    """Token sequences of varying length; the label is whether token 7 occurs."""
    generator = torch.Generator().manual_seed(seed)
    rows = {"input_ids": [], "label": []}
    for _ in range(num_examples):
        length = int(torch.randint(3, 12, (1,), generator=generator))
        ids = torch.randint(1, VOCAB_SIZE, (length,), generator=generator).tolist()
        rows["input_ids"].append(ids)
        rows["label"].append(int(7 in ids))
    return datasets.Dataset.from_dict(rows)


def causal_lm_dataset(num_examples: int = 48, seed: int = 0) -> datasets.Dataset:
    generator = torch.Generator().manual_seed(seed)
    rows = {"input_ids": []}
    for _ in range(num_examples):
        length = int(torch.randint(4, 12, (1,), generator=generator))
        start = int(torch.randint(1, VOCAB_SIZE - 12, (1,), generator=generator))
        rows["input_ids"].append(list(range(start, start + length)))
    return datasets.Dataset.from_dict(rows)


def image_dataset(num_examples: int = 48, seed: int = 0) -> datasets.Dataset:
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 3, (num_examples,), generator=generator)
    pixels = torch.randn(num_examples, 1, 8, 8, generator=generator) + labels.view(-1, 1, 1, 1).float()
    return datasets.Dataset.from_dict({"pixel_values": pixels.tolist(), "label": labels.tolist()})


def pad_text_batch(examples: list[dict]) -> dict:
    """Right-pad `input_ids`; classification examples keep `labels`, LM examples get `labels` = ids."""
    longest = max(len(example["input_ids"]) for example in examples)
    input_ids = torch.full((len(examples), longest), PAD_ID, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), longest), dtype=torch.long)
    for row, example in enumerate(examples):
        ids = torch.as_tensor(example["input_ids"])
        input_ids[row, : len(ids)] = ids
        attention_mask[row, : len(ids)] = 1
    batch = {"input_ids": input_ids, "attention_mask": attention_mask}
    if "label" in examples[0] or "labels" in examples[0]:
        batch["labels"] = torch.tensor([example.get("label", example.get("labels")) for example in examples])
    else:
        labels = input_ids.clone()
        labels[attention_mask == 0] = -100
        batch["labels"] = labels
    return batch


def stack_image_batch(examples: list[dict]) -> dict:
    return {
        "pixel_values": torch.tensor([example["pixel_values"] for example in examples], dtype=torch.float32),
        "labels": torch.tensor([example["label"] for example in examples]),
    }
