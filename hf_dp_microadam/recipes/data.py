"""Dataset loading and batch collation for the recipes."""

from __future__ import annotations

import logging

import torch

from hf_dp_microadam.assets import load_dataset_dict

from .arguments import DataArguments

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100


def load_splits(data_args: DataArguments, required_columns: tuple[str, ...]):
    """Load the train, validation and test splits named by `data_args` and check their columns.

    Offline names and hub ids both go through `hf_dp_microadam.assets.load_dataset_dict`.
    """
    splits = load_dataset_dict(
        data_args.dataset_name,
        max_samples_per_split=data_args.max_samples_per_split() or None,
        split_seed=data_args.split_seed,
        **data_args.load_kwargs(),
    )
    for split, dataset in splits.items():
        missing = [column for column in required_columns if column not in dataset.column_names]
        if missing:
            raise ValueError(
                f"the {split} split of {data_args.dataset_name!r} has no column(s) {missing}; its columns are "
                f"{dataset.column_names}. Name the source columns with text_column, image_column or label_column"
            )
    logger.info(
        "Dataset %s: %s", data_args.dataset_name,
        ", ".join(f"{split} {len(dataset):,}" for split, dataset in splits.items()),
    )
    return splits


class ImageClassificationCollator:
    """Turn rows with a PIL `image` and an integer `label` into `pixel_values` and `labels`.

    The image processor resizes, rescales and normalizes the whole micro-batch in one call,
    so the dataset keeps its compact source images.
    """

    def __init__(self, image_processor):
        self.image_processor = image_processor

    def __call__(self, examples: list[dict]) -> dict:
        images = [example["image"] for example in examples]
        pixel_values = self.image_processor(images, return_tensors="pt")["pixel_values"]
        labels = torch.tensor([example["label"] for example in examples], dtype=torch.long)
        return {"pixel_values": pixel_values, "labels": labels}


class CausalLMCollator:
    """Right-pad token sequences; the labels are the input ids with padding set to -100.

    transformers' DataCollatorForLanguageModeling masks every position whose token equals
    the pad token. When the pad token is the EOS token, as for SmolLM2, that would also
    drop the EOS that ends each text, so padding is found from the attention mask here.
    """

    def __init__(self, tokenizer):
        if tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer has no pad token; set tokenizer.pad_token before batching")
        self.pad_token_id = tokenizer.pad_token_id

    def __call__(self, examples: list[dict]) -> dict:
        longest = max(len(example["input_ids"]) for example in examples)
        input_ids = torch.full((len(examples), longest), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(examples), longest), dtype=torch.long)
        for row, example in enumerate(examples):
            ids = torch.as_tensor(example["input_ids"], dtype=torch.long)
            input_ids[row, : len(ids)] = ids
            attention_mask[row, : len(ids)] = 1
        labels = input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
