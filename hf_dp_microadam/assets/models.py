"""Load a model and its tokenizer or image processor by offline name, hub id or local path."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .dinov2_conversion import DINOV2_NAME, ensure_dinov2_model
from .errors import UnknownAssetError
from .locate import locate_packaged_model
from .registry import (
    OFFLINE_MODELS,
    TASK_CAUSAL_LM,
    TASK_FEATURE_EXTRACTION,
    TASK_IMAGE_CLASSIFICATION,
    TASK_SEQUENCE_CLASSIFICATION,
    OfflineModel,
    normalize_task,
)

logger = logging.getLogger(__name__)

_CLASSIFICATION_TASKS = (TASK_SEQUENCE_CLASSIFICATION, TASK_IMAGE_CLASSIFICATION)

# Values of load_model's classifier_pooling; None keeps the architecture's own head.
CLASSIFIER_POOLINGS = ("mean",)


def load_model(
    name_or_path: str | os.PathLike,
    task: str,
    *,
    num_labels: int | None = None,
    dtype: torch.dtype | str | None = torch.float32,
    processor_kwargs: Mapping[str, Any] | None = None,
    classifier_pooling: str | None = None,
    **model_kwargs: Any,
):
    """Load a model for `task` and return `(model, processor)`.

    `name_or_path` is an offline name (see `list_offline_models()`), a hub id or a local
    folder; the last two go to `from_pretrained` unchanged. An offline name takes
    precedence over a local folder of the same name. `task` is one of
    "sequence-classification" (alias "text-classification"), "causal-lm" (alias
    "text-generation"), "image-classification" or "feature-extraction" (the bare encoder,
    `AutoModel`). The two classification tasks need `num_labels`. For them
    `ignore_mismatched_sizes` defaults to True, so the head is newly initialized unless
    the checkpoint has one of that size.

    The processor is a tokenizer for text models and an image processor for image models.
    For "feature-extraction" on a hub id or folder it is whatever `AutoProcessor` returns.
    For "image-classification" the image processor converts images to RGB
    (`do_convert_rgb=True`) unless `processor_kwargs` sets otherwise. A text model whose
    tokenizer has no pad token gets the EOS token as pad token, in the tokenizer and in
    `model.config.pad_token_id`, so that batches can be padded.

    `classifier_pooling="mean"` (sequence classification of a BERT encoder only) builds
    `MeanPooledBertForSequenceClassification`, which classifies the masked mean of the
    token states instead of the pooler output on [CLS]; use it for sentence encoders such
    as all-MiniLM-L6-v2. A folder saved from that class is loaded with it again without
    the option, from `classifier_pooling` in its config.

    `dtype` defaults to float32 for every path, because transformers 5.25 otherwise loads
    a half-precision checkpoint in half precision. Pass `dtype="auto"` for the
    checkpoint's own dtype. `processor_kwargs` go to the processor's `from_pretrained`
    (for example `size` and `crop_size` of an image processor), and every other keyword
    argument goes to the model's `from_pretrained`.

    Raises MissingAssetError when an offline asset is not installed and
    UnknownAssetError when a name is neither an offline name nor loadable by
    `from_pretrained`.
    """
    task = normalize_task(task)
    _check_num_labels(task, num_labels)
    _check_classifier_pooling(task, classifier_pooling)
    processor_kwargs = dict(processor_kwargs or {})
    if task == TASK_IMAGE_CLASSIFICATION:
        # Grayscale images, such as Fashion-MNIST's, become the 3 channels the models expect.
        processor_kwargs.setdefault("do_convert_rgb", True)
    model_kwargs = dict(model_kwargs)
    if num_labels is not None:
        model_kwargs["num_labels"] = num_labels
        # A checkpoint with a head for another number of classes (an ImageNet classifier,
        # say) gets a new head instead of an error. transformers logs the replaced keys.
        model_kwargs.setdefault("ignore_mismatched_sizes", True)
    if dtype is not None:
        model_kwargs["dtype"] = dtype

    name = os.fspath(name_or_path)
    if name in OFFLINE_MODELS:
        model, processor = _load_offline_model(
            OFFLINE_MODELS[name], task, processor_kwargs, model_kwargs, classifier_pooling
        )
    else:
        model, processor = _load_pretrained(name, task, processor_kwargs, model_kwargs, classifier_pooling)

    if hasattr(processor, "pad_token"):
        _ensure_pad_token(model, processor)
    return model, processor


def offline_model_dir(name: str) -> Path:
    """Return the folder of an offline model, converting the DINOv2 backbone on first use.

    For the GGUF model the folder contains the `.gguf` file named by
    `OFFLINE_MODELS[name].gguf_file`. Raises UnknownAssetError or MissingAssetError.
    """
    if name not in OFFLINE_MODELS:
        raise UnknownAssetError(
            f"unknown offline model name {name!r}; known names: {', '.join(OFFLINE_MODELS)}"
        )
    if name == DINOV2_NAME:
        return ensure_dinov2_model()
    return locate_packaged_model(OFFLINE_MODELS[name])


def drop_gguf_quantizer_marks(model):
    """Turn a model loaded from a GGUF file into an ordinary dense model, in place.

    A GGUF load that dequantizes every weight can still leave `model.hf_quantizer`,
    `model.quantization_method`, `config.quantization_config` and `config._is_quantized`
    behind: transformers 5.25 does so unless `GgufConfig(dequantize=True)` is passed. With them, `save_pretrained` raises "The model is
    quantized with gguf and is not serializable", and `transformers.Trainer` rejects full
    fine-tuning of a "purely quantized model". Dropping them is correct only when no
    layer still holds packed GGUF blocks, which this checks. Returns the model.
    """
    quantizer = getattr(model, "hf_quantizer", None)
    config_quantization = getattr(model.config, "quantization_config", None)
    if quantizer is None and config_quantization is None:
        return model

    method = _quant_method(quantizer.quantization_config if quantizer is not None else config_quantization)
    if method != "gguf":
        raise ValueError(f"the model is quantized with {method!r}, not loaded from a GGUF file")
    packed = [name for name, module in model.named_modules() if type(module).__name__.lower().startswith("gguf")]
    if packed:
        raise ValueError(
            f"{len(packed)} layers still hold packed GGUF weights (first: {packed[0]!r}); load "
            f"the model with quantization_config=GgufConfig(dequantize=True)"
        )

    if "hf_quantizer" in vars(model):
        del model.hf_quantizer
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and "_is_quantized" in vars(config):
            del config._is_quantized
    if "quantization_method" in vars(model):
        del model.quantization_method
    model.is_quantized = False
    return model


def _check_num_labels(task: str, num_labels: int | None) -> None:
    if task in _CLASSIFICATION_TASKS:
        if num_labels is None:
            raise ValueError(f"task {task!r} needs num_labels, the number of classes")
        if isinstance(num_labels, bool) or not isinstance(num_labels, int) or num_labels < 1:
            raise ValueError(f"num_labels must be a positive integer, got {num_labels!r}")
    elif num_labels is not None:
        raise ValueError(f"num_labels applies to classification tasks only, not to {task!r}")


def _check_classifier_pooling(task: str, classifier_pooling: str | None) -> None:
    if classifier_pooling is None:
        return
    if classifier_pooling not in CLASSIFIER_POOLINGS:
        raise ValueError(
            f"classifier_pooling={classifier_pooling!r} is not one of {', '.join(CLASSIFIER_POOLINGS)}; "
            "leave it unset for the architecture's own classification head"
        )
    if task != TASK_SEQUENCE_CLASSIFICATION:
        raise ValueError(f"classifier_pooling applies to {TASK_SEQUENCE_CLASSIFICATION!r} only, not to {task!r}")


def _model_class(task: str, source: str | os.PathLike, classifier_pooling: str | None):
    """Return the model class for `task`: the auto class, or the mean-pooling classifier.

    The mean-pooling classifier is used when `classifier_pooling` is "mean" or when the
    checkpoint's config records that it was saved from that class.
    """
    if task != TASK_SEQUENCE_CLASSIFICATION:
        return _auto_model_class(task)
    import transformers

    from ..modeling_mean_pooling import CLASSIFIER_POOLING_KEY, MeanPooledBertForSequenceClassification

    config = transformers.AutoConfig.from_pretrained(source)
    saved_pooling = getattr(config, CLASSIFIER_POOLING_KEY, None)
    if classifier_pooling is None and config.model_type == "bert" and saved_pooling == "mean":
        return MeanPooledBertForSequenceClassification
    if classifier_pooling == "mean":
        if config.model_type != "bert":
            raise ValueError(
                f"classifier_pooling='mean' is implemented for BERT encoders (model_type 'bert'), and "
                f"{os.fspath(source)!r} is {config.model_type!r}; leave classifier_pooling unset to use its own head"
            )
        return MeanPooledBertForSequenceClassification
    return _auto_model_class(task)


def _auto_model_class(task: str):
    import transformers

    return {
        TASK_SEQUENCE_CLASSIFICATION: transformers.AutoModelForSequenceClassification,
        TASK_CAUSAL_LM: transformers.AutoModelForCausalLM,
        TASK_IMAGE_CLASSIFICATION: transformers.AutoModelForImageClassification,
        TASK_FEATURE_EXTRACTION: transformers.AutoModel,
    }[task]


def _load_offline_model(
    entry: OfflineModel, task: str, processor_kwargs: dict, model_kwargs: dict, classifier_pooling: str | None
):
    import transformers

    if task not in entry.tasks:
        raise ValueError(
            f"offline model {entry.name!r} supports the tasks {', '.join(entry.tasks)}, not {task!r}"
        )
    folder = offline_model_dir(entry.name)

    if entry.gguf_file is not None:
        if classifier_pooling is not None:
            raise ValueError(f"classifier_pooling is not available for the GGUF model {entry.name!r}")
        model_class = _auto_model_class(task)
        processor = transformers.AutoTokenizer.from_pretrained(
            folder, gguf_file=entry.gguf_file, **processor_kwargs
        )
        # dequantize=True unpacks every weight into a float tensor, so the model trains
        # like any other, whatever kernels are installed.
        model_kwargs.setdefault(
            "quantization_config", transformers.GgufConfig(dequantize=True)
        )
        model = model_class.from_pretrained(folder, gguf_file=entry.gguf_file, **model_kwargs)
        drop_gguf_quantizer_marks(model)
        return model, processor

    if entry.modality == "image":
        processor = transformers.AutoImageProcessor.from_pretrained(folder, **processor_kwargs)
    else:
        processor = transformers.AutoTokenizer.from_pretrained(folder, **processor_kwargs)
    model = _model_class(task, folder, classifier_pooling).from_pretrained(folder, **model_kwargs)
    return model, processor


def _load_pretrained(name: str, task: str, processor_kwargs: dict, model_kwargs: dict, classifier_pooling: str | None):
    import transformers

    processor_class = {
        TASK_SEQUENCE_CLASSIFICATION: transformers.AutoTokenizer,
        TASK_CAUSAL_LM: transformers.AutoTokenizer,
        TASK_IMAGE_CLASSIFICATION: transformers.AutoImageProcessor,
        TASK_FEATURE_EXTRACTION: transformers.AutoProcessor,
    }[task]
    try:
        processor = processor_class.from_pretrained(name, **processor_kwargs)
        model = _model_class(task, name, classifier_pooling).from_pretrained(name, **model_kwargs)
    except OSError as error:
        if Path(name).exists():
            raise
        raise UnknownAssetError(
            f"{name!r} is not an offline model name ({', '.join(OFFLINE_MODELS)}), and "
            f"from_pretrained could not load it as a hub id or local folder: {error}"
        ) from error
    return model, processor


def _ensure_pad_token(model, tokenizer) -> None:
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            logger.warning("The tokenizer has neither a pad token nor an EOS token; batches cannot be padded")
            return
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id


def _quant_method(quantization_config) -> str | None:
    if isinstance(quantization_config, Mapping):
        method = quantization_config.get("quant_method")
    else:
        method = getattr(quantization_config, "quant_method", None)
    return getattr(method, "value", method)
