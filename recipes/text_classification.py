#!/usr/bin/env python
"""Differentially private fine-tuning of a text encoder for sequence classification.

    python recipes/text_classification.py configs/text_classification/cpu.yaml
    python recipes/text_classification.py configs/text_classification/cpu.yaml --target_epsilon 3 --lora_r 4
    accelerate launch --config_file configs/accelerate/cpu.yaml \
        recipes/text_classification.py configs/text_classification/cpu.yaml

The model (an encoder with a sequence-classification head) is trained with LoRA plus the
head, or in full (`finetuning: full`). The final metrics are the test accuracy and the
privacy spent; see `hf_dp_microadam.recipes.run` for the files written to output_dir.
"""

import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path

from hf_dp_microadam.recipes.environment import configure_environment

# Before transformers and datasets are imported: they read the offline switches once.
configure_environment(sys.argv[1:], hf_home=Path(__file__).resolve().parent.parent / ".hf_home")

from transformers import DataCollatorWithPadding, set_seed  # noqa: E402

from hf_dp_microadam import DPMicroAdamTrainer  # noqa: E402
from hf_dp_microadam.assets import CLASSIFIER_POOLINGS, load_model  # noqa: E402
from hf_dp_microadam.recipes import run  # noqa: E402
from hf_dp_microadam.recipes.arguments import (  # noqa: E402
    DataArguments,
    LoraArguments,
    ModelArguments,
    RecipeTrainingArguments,
)
from hf_dp_microadam.recipes.config import parse_recipe_args  # noqa: E402
from hf_dp_microadam.recipes.classification import HEADLINE_KEYS, evaluate_and_save, label_settings  # noqa: E402
from hf_dp_microadam.recipes.data import load_splits  # noqa: E402
from hf_dp_microadam.recipes.metrics import classification_metrics, logits_to_class_ids  # noqa: E402
from hf_dp_microadam.recipes.modeling import prepare_trainable_model  # noqa: E402

logger = logging.getLogger(__name__)

# The module names of the classification head in transformers' encoders (BERT, RoBERTa,
# DeBERTa: classifier; Llama, GPT-2 and other decoders: score).
HEAD_MODULES = {"classifier", "score"}


@dataclass
class TextArguments:
    """Tokenization and classification-head settings."""

    max_seq_length: int = field(
        default=128, metadata={"help": "Texts longer than this many tokens are truncated; batches are padded "
                               "to their longest text."}
    )
    classifier_pooling: str | None = field(
        default=None,
        metadata={
            "help": "'mean' classifies the masked mean of the last token states (BERT encoders only; right for "
            "sentence encoders such as all-MiniLM-L6-v2). 'none' or unset: the architecture's own head, e.g. "
            "BERT's pooler output on [CLS]."
        },
    )

    def __post_init__(self):
        if isinstance(self.classifier_pooling, str) and self.classifier_pooling.lower() == "none":
            self.classifier_pooling = None
        if self.classifier_pooling not in (None, *CLASSIFIER_POOLINGS):
            raise ValueError(
                f"classifier_pooling must be one of {', '.join(CLASSIFIER_POOLINGS)}, or none for the model's own "
                f"head; got {self.classifier_pooling!r}"
            )


ARGUMENT_TYPES = (ModelArguments, DataArguments, LoraArguments, TextArguments, RecipeTrainingArguments)


def main(argv=None):
    arguments = parse_recipe_args(ARGUMENT_TYPES, argv)
    model_args, data_args, lora_args, text_args, training_args = arguments
    options = run.recipe_options(arguments)
    run.setup_logging(training_args)
    checkpoint = run.detect_last_checkpoint(training_args)
    if run.is_final_checkpoint(checkpoint):
        return run.report_finished_run(training_args, checkpoint, HEADLINE_KEYS, options)
    set_seed(training_args.seed)

    splits = load_splits(data_args, required_columns=("text", "label"))
    model, tokenizer = load_model(
        model_args.model_name_or_path, "sequence-classification", classifier_pooling=text_args.classifier_pooling,
        **label_settings(splits["train"]),
    )
    default_head = [name for name, _ in model.named_children() if name in HEAD_MODULES]
    model = prepare_trainable_model(
        model, model_args, lora_args, peft_task_type="SEQ_CLS", default_trainable_modules=default_head
    )

    def tokenize(batch):
        return tokenizer(batch["text"], truncation=True, max_length=text_args.max_seq_length)

    with training_args.main_process_first(desc="tokenization"):
        splits = splits.map(tokenize, batched=True, remove_columns=["text"], desc="Tokenizing")

    trainer = DPMicroAdamTrainer(
        model=model,
        args=training_args,
        train_dataset=splits["train"],
        eval_dataset=splits["validation"],
        processing_class=tokenizer,
        data_collator=DataCollatorWithPadding(tokenizer),
        compute_metrics=classification_metrics,
        preprocess_logits_for_metrics=logits_to_class_ids,
    )
    train_metrics = run.train(trainer, checkpoint)
    return evaluate_and_save(
        trainer, splits["test"], recipe="text_classification", model_args=model_args, data_args=data_args,
        train_metrics=train_metrics, options=options,
        extra={"max_seq_length": text_args.max_seq_length, "classifier_pooling": text_args.classifier_pooling},
    )


if __name__ == "__main__":
    run.run_recipe_main(main)
