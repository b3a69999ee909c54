"""Import the recipe scripts of the top-level recipes/ folder as modules."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
RECIPES_DIR = REPO_ROOT / "recipes"
CONFIGS_DIR = REPO_ROOT / "configs"


def load_recipe_module(name: str):
    """Import recipes/<name>.py; its module-level environment setup sees no config argument."""
    module_name = f"recipe_{name}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, RECIPES_DIR / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    saved_argv = sys.argv
    sys.argv = [str(RECIPES_DIR / f"{name}.py")]
    try:
        spec.loader.exec_module(module)
    finally:
        sys.argv = saved_argv
    sys.modules[module_name] = module
    return module
