"""Tiny transformers/PEFT models, batches and a per-example reference for the privacy tests.

Every model is built from a small random config with dropout 0, in float64, so that the
per-example gradients of the engine can be compared tightly with a loop that runs one
backward per example.
"""

from __future__ import annotations

import torch
from peft import LoraConfig, get_peft_model
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    DeiTConfig,
    DeiTForImageClassificationWithTeacher,
    Dinov2Config,
    Dinov2ForImageClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    ViTConfig,
    ViTForImageClassification,
)

from hf_dp_microadam.modeling_mean_pooling import MeanPooledBertForSequenceClassification
from hf_dp_microadam.privacy.losses import compute_per_example_losses

VOCAB_SIZE = 40
PAD_TOKEN_ID = 0
NUM_LABELS = 3
# "bert-mean" is hf_dp_microadam's MeanPooledBertForSequenceClassification.
ARCHITECTURES = ("vit", "deit", "dinov2", "bert", "bert-mean", "gpt2", "llama")
TEXT_ARCHITECTURES = ("bert", "bert-mean", "gpt2", "llama")
CAUSAL_LM_ARCHITECTURES = ("gpt2", "llama")

_VISION = dict(
    image_size=8,
    patch_size=4,
    num_channels=3,
    hidden_size=16,
    num_hidden_layers=2,
    num_attention_heads=2,
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
    num_labels=NUM_LABELS,
)


def build_model(architecture: str, *, lora: bool = False, dora: bool = False, seed: int = 0, **overrides):
    """Return a tiny float64 model in training mode; with `lora`, wrapped by get_peft_model."""
    torch.manual_seed(seed)
    if architecture == "vit":
        model = ViTForImageClassification(ViTConfig(intermediate_size=32, **{**_VISION, **overrides}))
    elif architecture == "deit":
        model = DeiTForImageClassificationWithTeacher(DeiTConfig(intermediate_size=32, **{**_VISION, **overrides}))
    elif architecture == "dinov2":
        config = Dinov2Config(mlp_ratio=2, layerscale_value=0.5, **{**_VISION, **overrides})
        model = Dinov2ForImageClassification(config)
        # The mask token is read only with bool_masked_pos (masked-image pretraining).
        model.dinov2.embeddings.mask_token.requires_grad_(False)
    elif architecture in ("bert", "bert-mean"):
        config = BertConfig(
            vocab_size=VOCAB_SIZE,
            hidden_size=16,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=32,
            max_position_embeddings=16,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
            pad_token_id=PAD_TOKEN_ID,
            num_labels=NUM_LABELS,
            **overrides,
        )
        model_class = MeanPooledBertForSequenceClassification if architecture == "bert-mean" else BertForSequenceClassification
        model = model_class(config)
    elif architecture == "gpt2":
        config = GPT2Config(
            vocab_size=VOCAB_SIZE,
            n_positions=16,
            n_embd=16,
            n_layer=2,
            n_head=2,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=PAD_TOKEN_ID,
            **overrides,
        )
        model = GPT2LMHeadModel(config)
    elif architecture == "llama":
        config = LlamaConfig(
            vocab_size=VOCAB_SIZE,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            max_position_embeddings=32,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=PAD_TOKEN_ID,
            **overrides,
        )
        model = LlamaForCausalLM(config)
    else:
        raise ValueError(f"unknown architecture {architecture!r}")

    if lora or dora:
        model = get_peft_model(model, lora_config(architecture, dora=dora))
    return model.double().train()


def lora_config(architecture: str, *, dora: bool = False) -> LoraConfig:
    """LoRA on attention projections, with random A and B so that every factor gets a gradient.

    GPT-2 also gets LoRA on its Conv1D layers (fan_in_fan_out) and on both embeddings,
    whose factors PEFT keeps in a ParameterDict. Its wpe receives position_ids of shape
    [1, T]. The classifier heads are trained through modules_to_save.
    """
    common = dict(r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False, use_dora=dora)
    if architecture in ("vit", "dinov2"):
        return LoraConfig(target_modules=["q_proj", "v_proj"], modules_to_save=["classifier"], **common)
    if architecture == "deit":
        return LoraConfig(
            target_modules=["q_proj", "v_proj"],
            modules_to_save=["cls_classifier", "distillation_classifier"],
            **common,
        )
    if architecture in ("bert", "bert-mean"):
        return LoraConfig(task_type="SEQ_CLS", target_modules=["query", "value"], **common)
    if architecture == "gpt2":
        return LoraConfig(
            task_type="CAUSAL_LM", target_modules=["c_attn", "c_fc", "wte", "wpe"], fan_in_fan_out=True, **common
        )
    if architecture == "llama":
        return LoraConfig(task_type="CAUSAL_LM", target_modules=["q_proj", "v_proj"], **common)
    raise ValueError(f"unknown architecture {architecture!r}")


def text_batch(lengths: list[int], *, architecture: str, seed: int = 1, max_length: int | None = None) -> dict:
    """Right-padded token batch: padding has token PAD_TOKEN_ID, attention 0 and label -100."""
    generator = torch.Generator().manual_seed(seed)
    max_length = max_length or max(lengths)
    input_ids = torch.full((len(lengths), max_length), PAD_TOKEN_ID, dtype=torch.long)
    attention_mask = torch.zeros((len(lengths), max_length), dtype=torch.long)
    for row, length in enumerate(lengths):
        input_ids[row, :length] = torch.randint(3, VOCAB_SIZE, (length,), generator=generator)
        attention_mask[row, :length] = 1
    batch = {"input_ids": input_ids, "attention_mask": attention_mask}
    if architecture in CAUSAL_LM_ARCHITECTURES:
        batch["labels"] = input_ids.masked_fill(attention_mask == 0, -100)
    else:
        batch["labels"] = torch.randint(0, NUM_LABELS, (len(lengths),), generator=generator)
    return batch


def image_batch(size: int, *, seed: int = 1) -> dict:
    generator = torch.Generator().manual_seed(seed)
    return {
        "pixel_values": torch.randn(size, 3, 8, 8, generator=generator, dtype=torch.float64),
        "labels": torch.randint(0, NUM_LABELS, (size,), generator=generator),
    }


def make_batch(architecture: str, size: int = 3, *, seed: int = 1) -> dict:
    """A batch of `size` examples; text batches have lengths 7, 4, 2, ... (padding included)."""
    if architecture in TEXT_ARCHITECTURES:
        lengths = [max(2, 7 - 3 * row) for row in range(size)]
        return text_batch(lengths, architecture=architecture, seed=seed)
    return image_batch(size, seed=seed)


def select_examples(batch: dict, rows) -> dict:
    """Return the batch restricted to `rows` (a slice or a list of indices)."""
    return {key: value[rows] for key, value in batch.items()}


def per_example_losses(model, batch: dict) -> torch.Tensor:
    return compute_per_example_losses(model, batch)[0]


def trainable_parameters(model) -> dict[str, torch.nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def reference_per_example_gradients(model, batch: dict, loss_fn=per_example_losses) -> dict[str, torch.Tensor]:
    """Run one plain backward per example and stack the gradients: {name: [n, *shape]}.

    Call it before attaching an engine, or inside `engine.disabled()`.
    """
    parameters = trainable_parameters(model)
    size = batch["labels"].shape[0]
    rows: dict[str, list[torch.Tensor]] = {name: [] for name in parameters}
    for index in range(size):
        model.zero_grad(set_to_none=True)
        loss_fn(model, select_examples(batch, slice(index, index + 1))).sum().backward()
        for name, parameter in parameters.items():
            grad = parameter.grad if parameter.grad is not None else torch.zeros_like(parameter)
            rows[name].append(grad.detach().clone())
    model.zero_grad(set_to_none=True)
    return {name: torch.stack(values) for name, values in rows.items()}


def engine_per_example_gradients(model, batch: dict, loss_fn=per_example_losses) -> dict[str, torch.Tensor]:
    """Run one backward of the summed per-example losses and collect `p.grad_sample`."""
    model.zero_grad(set_to_none=True)
    loss_fn(model, batch).sum().backward()
    result = {name: parameter.grad_sample.detach().clone() for name, parameter in trainable_parameters(model).items()}
    for parameter in trainable_parameters(model).values():
        parameter.grad_sample = None
    model.zero_grad(set_to_none=True)
    return result


def assert_gradients_match(actual: dict, expected: dict, *, rtol: float = 1e-9) -> None:
    """Assert equal per-example gradients, with tolerance relative to the largest entry overall.

    Some gradients are zero in exact arithmetic (the key bias under softmax attention) and
    rounding noise in practice, so each tensor is compared against the global scale.
    """
    assert actual.keys() == expected.keys()
    scale = max(value.abs().max().item() for value in expected.values())
    assert scale > 0
    for name in expected:
        assert actual[name].shape == expected[name].shape, name
        torch.testing.assert_close(actual[name], expected[name], rtol=0.0, atol=rtol * scale, msg=lambda m: f"{name}: {m}")
