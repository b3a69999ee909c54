"""load_model on tiny local folders (the hub-id path), and the GGUF quantizer marks."""

import json

import pytest
import torch

from hf_dp_microadam import assets
from hf_dp_microadam.assets.errors import UnknownAssetError


def test_local_folder_sequence_classification(tiny_bert_dir):
    model, tokenizer = assets.load_model(str(tiny_bert_dir), "sequence-classification", num_labels=3)

    assert type(model).__name__ == "BertForSequenceClassification"
    assert model.config.num_labels == 3
    batch = tokenizer(["a good movie", "bad"], padding=True, return_tensors="pt")
    assert model(**batch).logits.shape == (2, 3)


def test_mean_pooling_reloads(tiny_bert_dir, tmp_path):
    model, tokenizer = assets.load_model(tiny_bert_dir, "sequence-classification", num_labels=2,
                                         classifier_pooling="mean")

    assert type(model).__name__ == "MeanPooledBertForSequenceClassification"
    assert model.bert.pooler is None
    model.eval()
    batch = tokenizer(["a good movie", "bad"], padding=True, return_tensors="pt")
    logits = model(**batch).logits
    model.save_pretrained(tmp_path)
    reloaded, _ = assets.load_model(tmp_path, "sequence-classification", num_labels=2)
    reloaded.eval()

    assert type(reloaded).__name__ == "MeanPooledBertForSequenceClassification"
    assert torch.equal(reloaded(**batch).logits, logits)


def test_mean_pooling_rejected_elsewhere(tiny_bert_dir, tiny_llama_dir):
    with pytest.raises(ValueError, match="BERT encoders.*'llama'"):
        assets.load_model(tiny_llama_dir, "sequence-classification", num_labels=2, classifier_pooling="mean")
    with pytest.raises(ValueError, match="applies to 'sequence-classification' only"):
        assets.load_model(tiny_bert_dir, "feature-extraction", classifier_pooling="mean")
    with pytest.raises(ValueError, match="'max' is not one of mean"):
        assets.load_model(tiny_bert_dir, "sequence-classification", num_labels=2, classifier_pooling="max")


def test_mismatched_head_size_error_on_request(tiny_bert_dir):
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
        assets.load_model(tiny_bert_dir, "sequence-classification", num_labels=3, ignore_mismatched_sizes=False)


def test_local_folder_defaults_to_float32(tiny_bert_dir):
    model, _ = assets.load_model(tiny_bert_dir, "text-classification", num_labels=2)
    assert {parameter.dtype for parameter in model.parameters()} == {torch.float32}


def test_local_folder_dtype_auto_keeps_checkpoint(tiny_bert_dir):
    model, _ = assets.load_model(tiny_bert_dir, "sequence-classification", num_labels=2, dtype="auto")
    assert {parameter.dtype for parameter in model.parameters()} == {torch.bfloat16}


def test_local_folder_feature_extraction(tiny_bert_dir):
    model, processor = assets.load_model(tiny_bert_dir, "feature-extraction")

    assert type(model).__name__ == "BertModel"
    batch = processor(["the movie"], return_tensors="pt")
    assert model(**batch).last_hidden_state.shape == (1, 2, 16)


def test_local_folder_causal_lm_gets_pad_token(tiny_llama_dir):
    model, tokenizer = assets.load_model(tiny_llama_dir, "causal-lm")

    assert type(model).__name__ == "LlamaForCausalLM"
    assert tokenizer.pad_token == "</s>"
    assert model.config.pad_token_id == tokenizer.eos_token_id
    batch = tokenizer(["a good movie", "bad"], padding=True, return_tensors="pt")
    assert model(**batch).logits.shape == (2, 3, 10)


def test_local_folder_image_classification(tiny_vit_dir):
    from PIL import Image

    model, processor = assets.load_model(tiny_vit_dir, "image-classification", num_labels=4)

    assert type(model).__name__ == "ViTForImageClassification"
    images = [Image.new("L", (28, 28), color=value) for value in (0, 200)]
    pixel_values = processor(images, return_tensors="pt")["pixel_values"]
    assert pixel_values.shape == (2, 3, 32, 32)
    assert model(pixel_values=pixel_values).logits.shape == (2, 4)


def test_model_kwargs_reach_from_pretrained(tiny_bert_dir):
    labels = {0: "negative", 1: "positive"}
    model, _ = assets.load_model(tiny_bert_dir, "sequence-classification", num_labels=2, id2label=labels)
    assert model.config.id2label == labels


def test_classification_needs_num_labels(tiny_bert_dir):
    with pytest.raises(ValueError, match="needs num_labels"):
        assets.load_model(tiny_bert_dir, "sequence-classification")


@pytest.mark.parametrize("num_labels", [0, -1, 2.0, True])
def test_invalid_num_labels(tiny_bert_dir, num_labels):
    with pytest.raises(ValueError, match="positive integer"):
        assets.load_model(tiny_bert_dir, "sequence-classification", num_labels=num_labels)


def test_num_labels_rejected_for_causal_lm(tiny_llama_dir):
    with pytest.raises(ValueError, match="classification tasks only"):
        assets.load_model(tiny_llama_dir, "causal-lm", num_labels=2)


def test_unknown_task_rejected(tiny_bert_dir):
    with pytest.raises(ValueError, match="unknown task"):
        assets.load_model(tiny_bert_dir, "summarization")


def test_offline_model_rejects_unsupported_task():
    with pytest.raises(ValueError, match="supports the tasks causal-lm"):
        assets.load_model("smollm2-135m-instruct", "image-classification", num_labels=2)


def test_unreachable_hub_id_lists_offline_names():
    # tests/conftest.py sets HF_HUB_OFFLINE=1, so the hub is never contacted.
    with pytest.raises(UnknownAssetError) as raised:
        assets.load_model("no-such-model-xyz", "causal-lm")
    message = str(raised.value)
    assert "'no-such-model-xyz'" in message
    assert "smollm2-135m-instruct" in message
    assert isinstance(raised.value, OSError)


def test_broken_local_folder_error_unchanged(tmp_path):
    # transformers 5.25 raises ValueError for a folder without tokenizer files.
    with pytest.raises((OSError, ValueError)) as raised:
        assets.load_model(tmp_path, "causal-lm")
    assert not isinstance(raised.value, UnknownAssetError)


def _mark_as_gguf(model):
    """Attach the attributes that transformers 5.25 leaves on a model read from a GGUF file."""
    from transformers import GgufConfig
    from transformers.quantizers.quantizer_gguf import GgufHfQuantizer
    from transformers.utils.quantization_config import QuantizationMethod

    quantization_config = GgufConfig(gguf_file="model.Q4_1.gguf")
    model.hf_quantizer = GgufHfQuantizer(quantization_config)
    model.quantization_method = QuantizationMethod.GGUF
    model.is_quantized = True
    model.config.quantization_config = quantization_config
    model.config._is_quantized = True


def test_gguf_marks_block_save_until_dropped(tiny_llama_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    _mark_as_gguf(model)
    with pytest.raises(ValueError, match="not serializable"):
        model.save_pretrained(tmp_path / "before")

    assert assets.drop_gguf_quantizer_marks(model) is model
    model.save_pretrained(tmp_path / "after")

    assert getattr(model, "hf_quantizer", None) is None
    assert model.is_quantized is False
    saved_config = json.loads((tmp_path / "after" / "config.json").read_text())
    assert "quantization_config" not in saved_config
    assert "_is_quantized" not in saved_config
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "after")
    input_ids = torch.tensor([[5, 6, 8]])
    torch.testing.assert_close(reloaded(input_ids).logits, model(input_ids).logits)


def test_gguf_marks_dropped_trainer_accepts_model(tiny_llama_dir):
    from transformers import AutoModelForCausalLM
    from transformers.trainer_utils import validate_quantization_for_training

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    _mark_as_gguf(model)
    with pytest.raises(ValueError, match="purely quantized"):
        validate_quantization_for_training(model)

    assets.drop_gguf_quantizer_marks(model)
    validate_quantization_for_training(model)


def test_drop_marks_without_marks_is_noop(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    assert assets.drop_gguf_quantizer_marks(model) is model
    assert getattr(model, "hf_quantizer", None) is None


def test_drop_marks_rejects_other_quantization(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    model.config.quantization_config = {"quant_method": "bitsandbytes"}
    with pytest.raises(ValueError, match="'bitsandbytes'"):
        assets.drop_gguf_quantizer_marks(model)


def test_drop_marks_rejects_packed_layers(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    class GgufLinear(torch.nn.Linear):
        pass

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    _mark_as_gguf(model)
    model.lm_head = GgufLinear(16, 10, bias=False)
    with pytest.raises(ValueError, match="packed GGUF weights"):
        assets.drop_gguf_quantizer_marks(model)
    assert model.hf_quantizer is not None
