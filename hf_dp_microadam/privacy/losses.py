"""Per-example losses for Hugging Face models.

DP-SGD clips each example's gradient, so each example needs its own loss, and no example's
loss may depend on another one. The losses that transformers models compute from `labels`
break this for causal LMs. They average the token losses of the whole batch, or divide by
`num_items_in_batch` (the token count of the whole accumulated batch). Every example's
gradient then depends on the other examples' lengths. So `compute_per_example_losses`
runs the model WITHOUT `labels` and computes the losses from the logits here.

Tasks (the names follow `PretrainedConfig.problem_type`, plus "causal_lm"):

- "single_label_classification": cross-entropy of logits [n, C] against class ids [n];
- "multi_label_classification": binary cross-entropy of logits [n, C] against 0/1 targets,
  averaged over the C labels;
- "regression": squared error, averaged over the outputs (num_labels == 1 gives one);
- "causal_lm": next-token cross-entropy (logits at position t predict label t + 1).
  Labels equal to -100 and padding positions (attention_mask == 0) are ignored. The
  example's loss is the mean over its own valid tokens ("mean", the default) or their sum
  ("sum"). An example without a valid token has loss 0.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from transformers.models.auto import modeling_auto

SINGLE_LABEL = "single_label_classification"
MULTI_LABEL = "multi_label_classification"
REGRESSION = "regression"
CAUSAL_LM = "causal_lm"
TASKS = (SINGLE_LABEL, MULTI_LABEL, REGRESSION, CAUSAL_LM)
TOKEN_REDUCTIONS = ("mean", "sum")
IGNORE_INDEX = -100

_CLASSIFICATION_SUFFIXES = (
    "ForSequenceClassification",
    "ForImageClassification",
    "ForImageClassificationWithTeacher",
    "ForAudioClassification",
    "ForVideoClassification",
)
_CAUSAL_LM_SUFFIXES = ("ForCausalLM", "LMHeadModel")


def _class_names(mapping: Mapping) -> set[str]:
    names: set[str] = set()
    for value in mapping.values():
        names.update([value] if isinstance(value, str) else value)
    return names


_CAUSAL_LM_CLASSES = _class_names(modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
_CLASSIFICATION_CLASSES = (
    _class_names(modeling_auto.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES)
    | _class_names(modeling_auto.MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES)
    | _class_names(modeling_auto.MODEL_FOR_AUDIO_CLASSIFICATION_MAPPING_NAMES)
    | _class_names(modeling_auto.MODEL_FOR_VIDEO_CLASSIFICATION_MAPPING_NAMES)
)


def _base_model(model: torch.nn.Module) -> torch.nn.Module:
    """Return the transformers model inside a PEFT model, or the model itself."""
    get_base_model = getattr(model, "get_base_model", None)
    return get_base_model() if callable(get_base_model) else model


def infer_task(model: torch.nn.Module, labels: torch.Tensor | None = None) -> str:
    """Return the task of `model` (PEFT models included) as one of `TASKS`.

    Classification follows transformers: `config.problem_type` if set, else regression for
    num_labels == 1, else single-label for integer labels and multi-label for float labels.
    Raises ValueError for a model class that is neither a causal LM nor a classifier.
    """
    base = _base_model(model)
    class_name = type(base).__name__
    if class_name in _CAUSAL_LM_CLASSES or class_name.endswith(_CAUSAL_LM_SUFFIXES):
        return CAUSAL_LM
    if class_name in _CLASSIFICATION_CLASSES or class_name.endswith(_CLASSIFICATION_SUFFIXES):
        config = getattr(base, "config", None)
        problem_type = getattr(config, "problem_type", None)
        if problem_type is not None:
            if problem_type not in TASKS:
                raise ValueError(f"config.problem_type={problem_type!r} is not one of {TASKS}")
            return problem_type
        if getattr(config, "num_labels", None) == 1:
            return REGRESSION
        if labels is not None and labels.is_floating_point():
            return MULTI_LABEL
        return SINGLE_LABEL
    raise ValueError(
        f"cannot infer the training task of {class_name}: pass task= one of {TASKS}"
    )


def _causal_lm_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    attention_mask: torch.Tensor | None,
    token_reduction: str,
) -> torch.Tensor:
    if logits.dim() != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(
            f"causal LM logits must be [n, T, vocab] and labels [n, T], got {tuple(logits.shape)} "
            f"and {tuple(labels.shape)}"
        )
    # The logits at position t predict the token at position t + 1.
    shifted_logits = logits[:, :-1, :].float()
    shifted_labels = labels[:, 1:]
    valid = shifted_labels != IGNORE_INDEX
    if attention_mask is not None:
        valid = valid & attention_mask[:, 1:].bool()
    targets = torch.where(valid, shifted_labels, torch.zeros_like(shifted_labels))

    token_losses = F.cross_entropy(shifted_logits.transpose(1, 2), targets, reduction="none")
    token_losses = token_losses * valid
    losses = token_losses.sum(dim=1)
    if token_reduction == "mean":
        losses = losses / valid.sum(dim=1).clamp(min=1)
    return losses


def per_example_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    task: str,
    token_reduction: str = "mean",
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Return one loss per example, shape [n], computed in float32 at least.

    Args:
        logits: model output, [n, C] for classification and regression, [n, T, vocab]
            for causal LM.
        labels: class ids [n], targets [n, C] or [n], or token ids [n, T] (-100 = ignore).
        task: one of `TASKS`.
        token_reduction: causal LM only: "mean" (over the example's valid tokens) or "sum".
        attention_mask: causal LM only: positions with 0 are ignored like label -100.
    """
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    if token_reduction not in TOKEN_REDUCTIONS:
        raise ValueError(f"token_reduction must be one of {TOKEN_REDUCTIONS}, got {token_reduction!r}")
    batch_size = logits.shape[0]
    if labels.shape[0] != batch_size:
        raise ValueError(f"logits have {batch_size} examples but labels have {labels.shape[0]}")

    if task == CAUSAL_LM:
        return _causal_lm_loss(logits, labels, attention_mask, token_reduction)

    compute_dtype = torch.promote_types(logits.dtype, torch.float32)
    logits = logits.to(compute_dtype)
    if task == SINGLE_LABEL:
        return F.cross_entropy(logits.reshape(batch_size, -1), labels.reshape(batch_size).long(), reduction="none")
    if task == MULTI_LABEL:
        targets = labels.to(compute_dtype).reshape(batch_size, -1)
        losses = F.binary_cross_entropy_with_logits(logits.reshape(batch_size, -1), targets, reduction="none")
        return losses.mean(dim=1)
    predictions = logits.reshape(batch_size, -1)
    targets = labels.to(compute_dtype).reshape(batch_size, -1)
    if predictions.shape != targets.shape:
        raise ValueError(
            f"regression outputs have shape {tuple(predictions.shape)} but targets {tuple(targets.shape)}"
        )
    return (predictions - targets).pow(2).mean(dim=1)


def _logits_of(outputs) -> torch.Tensor:
    if isinstance(outputs, torch.Tensor):
        return outputs
    if isinstance(outputs, Mapping) and "logits" in outputs:
        return outputs["logits"]
    return outputs[0]


def compute_per_example_losses(
    model: torch.nn.Module,
    batch: Mapping,
    *,
    task: str | None = None,
    token_reduction: str = "mean",
    label_key: str = "labels",
) -> tuple[torch.Tensor, object]:
    """Run `model` on `batch` without passing the labels, and return (losses [n], outputs).

    The labels stay out of the model call so that transformers computes no loss of its
    own, and `num_items_in_batch` is dropped for the same reason. The task is inferred from
    the model when `task` is None (see `infer_task`). For causal LMs `use_cache=False` is
    passed unless the batch sets it, because training never reads the cache.
    """
    if label_key not in batch:
        raise ValueError(f"the batch has no {label_key!r} entry, which per-example losses need")
    labels = batch[label_key]
    inputs = {key: value for key, value in batch.items() if key not in (label_key, "num_items_in_batch")}
    if task is None:
        task = infer_task(model, labels)

    if task == CAUSAL_LM and getattr(getattr(_base_model(model), "config", None), "use_cache", None) is not None:
        inputs.setdefault("use_cache", False)

    outputs = model(**inputs)
    attention_mask = inputs.get("attention_mask") if task == CAUSAL_LM else None
    losses = per_example_loss(
        _logits_of(outputs), labels, task=task, token_reduction=token_reduction, attention_mask=attention_mask
    )
    return losses, outputs
