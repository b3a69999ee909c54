"""Process environment of a recipe run, set before transformers and datasets are imported.

huggingface_hub and datasets read `HF_HUB_OFFLINE`, `HF_DATASETS_OFFLINE` and `HF_HOME`
once, when they are imported. So the recipe scripts call `configure_environment` first,
and this module imports neither of them.
"""

from __future__ import annotations

import os
from pathlib import Path

import yaml

from hf_dp_microadam.assets.registry import OFFLINE_DATASETS, OFFLINE_MODELS

OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")


def _value_from_argv(argv: list[str], key: str, config: dict) -> object:
    """Return the value of `--key` in `argv` (last one wins), else the config's value."""
    value = config.get(key)
    for index, token in enumerate(argv):
        if token == f"--{key}" and index + 1 < len(argv):
            value = argv[index + 1]
        elif token.startswith(f"--{key}="):
            value = token.split("=", 1)[1]
    return value


def uses_only_offline_assets(argv: list[str]) -> bool:
    """Return whether the run's model and dataset are both offline asset names.

    `argv` is the recipe's argument list: the config file, then the overrides. A config
    file that cannot be read counts as not offline; the argument parser reports it later.
    """
    if not argv or argv[0].startswith("-"):
        return False
    try:
        config = yaml.safe_load(Path(argv[0]).read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError):
        return False
    if not isinstance(config, dict):
        return False
    model = _value_from_argv(argv[1:], "model_name_or_path", config)
    dataset = _value_from_argv(argv[1:], "dataset_name", config)
    return model in OFFLINE_MODELS and dataset in OFFLINE_DATASETS


def configure_environment(argv: list[str], hf_home: str | Path | None = None) -> bool:
    """Set the environment of a run; return whether it was put in offline mode.

    When both the model and the dataset are offline asset names, the hub is switched off
    (`HF_HUB_OFFLINE=1`, `HF_DATASETS_OFFLINE=1`, `TRANSFORMERS_OFFLINE=1`), so that no
    request leaves the machine, and `HF_HOME` defaults to `hf_home`. A hub id or path
    leaves those variables as they are, so that an online machine can download it.
    Variables already set in the environment always win. `TOKENIZERS_PARALLELISM`
    defaults to false, because the tokenizers library otherwise warns after every fork
    of a data loader worker.
    """
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    offline = uses_only_offline_assets(argv)
    if offline:
        for name in OFFLINE_VARIABLES:
            os.environ.setdefault(name, "1")
        if hf_home is not None:
            os.environ.setdefault("HF_HOME", str(hf_home))
    return offline
