"""Evaluation metrics computed locally (`evaluate.load` downloads its metric scripts from the hub)."""

from __future__ import annotations

import math

import numpy as np
import torch
from tqdm.auto import tqdm


def accuracy(predictions, labels) -> float:
    """Return the share of `predictions` equal to `labels` (class ids of the same shape)."""
    predictions, labels = np.asarray(predictions), np.asarray(labels)
    if predictions.shape != labels.shape:
        raise ValueError(f"predictions of shape {predictions.shape} do not match labels of shape {labels.shape}")
    if predictions.size == 0:
        raise ValueError("cannot compute accuracy on zero examples")
    return float((predictions == labels).mean())


def logits_to_class_ids(logits, labels=None):
    """Reduce classification logits to class ids.

    Used as the Trainer's `preprocess_logits_for_metrics`, so that evaluation gathers one
    id per example instead of the full logits. The `labels` argument is part of that
    interface and unused.
    """
    del labels
    if isinstance(logits, tuple):
        logits = logits[0]
    return logits.argmax(dim=-1)


def classification_metrics(eval_prediction) -> dict[str, float]:
    """Return `{"accuracy": ...}` for the Trainer's `compute_metrics`.

    Accepts predictions that are class ids (from `logits_to_class_ids`) or logits [n, C].
    """
    predictions = np.asarray(eval_prediction.predictions)
    labels = np.asarray(eval_prediction.label_ids)
    if predictions.ndim == labels.ndim + 1:
        predictions = predictions.argmax(axis=-1)
    return {"accuracy": accuracy(predictions, labels)}


def perplexity(mean_token_loss: float) -> float:
    """Return exp(loss) for a mean next-token cross-entropy in nats; inf when it overflows."""
    try:
        return math.exp(mean_token_loss)
    except OverflowError:
        return math.inf


@torch.no_grad()
def evaluate_perplexity(model, data_loader, *, device=None, description: str = "perplexity") -> dict[str, float]:
    """Return the token-level perplexity of a causal LM over `data_loader`.

    The loss is the sum of next-token cross-entropies over all predicted tokens divided by
    their count, so long texts weigh in proportion to their tokens (unlike the mean of
    per-example mean losses that the Trainer reports as `eval_loss`). Batches need
    `input_ids`, `attention_mask` and `labels`; labels of -100 and padded positions are
    ignored. Returns `{"loss": ..., "perplexity": ..., "tokens": ...}`.
    """
    was_training = model.training
    model.eval()
    if device is None:
        device = next(model.parameters()).device
    total_loss, total_tokens = 0.0, 0
    try:
        for batch in tqdm(data_loader, desc=description):
            batch = {key: value.to(device) for key, value in batch.items()}
            labels = batch.pop("labels")
            logits = model(**batch, use_cache=False).logits
            shifted_logits = logits[:, :-1, :].float()
            shifted_labels = labels[:, 1:]
            valid = (shifted_labels != -100) & batch["attention_mask"][:, 1:].bool()
            token_losses = torch.nn.functional.cross_entropy(
                shifted_logits.transpose(1, 2), shifted_labels.masked_fill(~valid, 0), reduction="none"
            )
            total_loss += float((token_losses * valid).sum())
            total_tokens += int(valid.sum())
    finally:
        model.train(was_training)
    if total_tokens == 0:
        raise ValueError("the evaluation data has no token to predict")
    mean_loss = total_loss / total_tokens
    return {"loss": mean_loss, "perplexity": perplexity(mean_loss), "tokens": total_tokens}
