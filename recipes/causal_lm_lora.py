#!/usr/bin/env python
"""Differentially private LoRA fine-tuning of a causal language model.

    python recipes/causal_lm_lora.py configs/causal_lm/cpu.yaml
    python recipes/causal_lm_lora.py configs/causal_lm/cpu.yaml --lora_r 4 --target_epsilon 3

Each text of the dataset's `text` column is one training example, truncated to
max_seq_length tokens and ended with the EOS token, so the privacy guarantee is per
text. The held-out perplexity on the test split is measured before and after training,
and a few greedy generations are printed before and after. See
`hf_dp_microadam.recipes.run` for the files written to output_dir; this recipe adds
`generations.json`.
"""

import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path

from hf_dp_microadam.recipes.environment import configure_environment

# Before transformers and datasets are imported: they read the offline switches once.
configure_environment(sys.argv[1:], hf_home=Path(__file__).resolve().parent.parent / ".hf_home")

from torch.utils.data import DataLoader  # noqa: E402
from transformers import set_seed  # noqa: E402

from hf_dp_microadam import DPMicroAdamTrainer  # noqa: E402
from hf_dp_microadam.assets import load_model  # noqa: E402
from hf_dp_microadam.recipes import run  # noqa: E402
from hf_dp_microadam.recipes.arguments import (  # noqa: E402
    DataArguments,
    LoraArguments,
    ModelArguments,
    RecipeTrainingArguments,
)
from hf_dp_microadam.recipes.config import ConfigError, parse_recipe_args  # noqa: E402
from hf_dp_microadam.recipes.data import CausalLMCollator, load_splits  # noqa: E402
from hf_dp_microadam.recipes.generation import generate_texts, log_generations  # noqa: E402
from hf_dp_microadam.recipes.metrics import evaluate_perplexity  # noqa: E402
from hf_dp_microadam.recipes.modeling import count_parameters, prepare_trainable_model  # noqa: E402

logger = logging.getLogger(__name__)

HEADLINE_KEYS = ("perplexity_before", "perplexity_after", "epsilon", "delta", "steps")
GENERATIONS_FILE = "generations.json"


@dataclass
class LanguageModelingArguments:
    """Tokenization, evaluation and generation settings."""

    max_seq_length: int = field(
        default=64, metadata={"help": "Texts longer than this many tokens (EOS included) are truncated."}
    )
    generation_prompts: list[str] = field(
        default_factory=lambda: ["The movie", "I expected"],
        metadata={"help": "Prompts completed greedily before and after training."},
    )
    generation_max_new_tokens: int = field(
        default=32, metadata={"help": "Tokens generated per prompt."}
    )


def tokenize_texts(splits, tokenizer, max_length: int, training_args):
    """Tokenize the `text` column: one example per non-empty text, ended with EOS, truncated."""

    def tokenize(batch):
        texts = [text + tokenizer.eos_token for text in batch["text"]]
        encoded = tokenizer(texts, truncation=True, max_length=max_length)
        return {"input_ids": encoded["input_ids"]}

    with training_args.main_process_first(desc="tokenization"):
        splits = splits.filter(lambda batch: [bool(text.strip()) for text in batch["text"]], batched=True,
                               desc="Dropping empty texts")
        columns = splits["train"].column_names
        return splits.map(tokenize, batched=True, remove_columns=columns, desc="Tokenizing")


ARGUMENT_TYPES = (ModelArguments, DataArguments, LoraArguments, LanguageModelingArguments, RecipeTrainingArguments)


def main(argv=None):
    arguments = parse_recipe_args(ARGUMENT_TYPES, argv)
    model_args, data_args, lora_args, lm_args, training_args = arguments
    options = run.recipe_options(arguments)
    if model_args.finetuning != "lora":
        raise ConfigError(f"this recipe trains LoRA adapters only; got finetuning={model_args.finetuning!r}")
    run.setup_logging(training_args)
    checkpoint = run.detect_last_checkpoint(training_args)
    if run.is_final_checkpoint(checkpoint):
        return run.report_finished_run(training_args, checkpoint, HEADLINE_KEYS, options)
    set_seed(training_args.seed)

    splits = load_splits(data_args, required_columns=("text",))
    model, tokenizer = load_model(model_args.model_name_or_path, "causal-lm")
    splits = tokenize_texts(splits, tokenizer, lm_args.max_seq_length, training_args)
    model = prepare_trainable_model(model, model_args, lora_args, peft_task_type="CAUSAL_LM")

    collator = CausalLMCollator(tokenizer)
    trainer = DPMicroAdamTrainer(
        model=model,
        args=training_args,
        train_dataset=splits["train"],
        eval_dataset=splits["validation"],
        processing_class=tokenizer,
        data_collator=collator,
        task="causal_lm",
    )
    test_loader = DataLoader(splits["test"], batch_size=training_args.per_device_eval_batch_size, collate_fn=collator)
    device = training_args.device
    # The adapters start as a no-op (LoRA's B matrices are zero), so these are the base model's.
    before = evaluate_perplexity(trainer.model, test_loader, device=device, description="Perplexity before training")
    logger.info("Test perplexity before training: %.3f (%d tokens)", before["perplexity"], before["tokens"])
    generations_before = generate_texts(
        trainer.model, tokenizer, lm_args.generation_prompts, lm_args.generation_max_new_tokens, device=device
    )

    train_metrics = run.train(trainer, checkpoint)

    after = evaluate_perplexity(trainer.model, test_loader, device=device, description="Perplexity after training")
    logger.info("Test perplexity after training: %.3f", after["perplexity"])
    generations_after = generate_texts(
        trainer.model, tokenizer, lm_args.generation_prompts, lm_args.generation_max_new_tokens, device=device
    )
    trainable, total = count_parameters(trainer.model)
    metrics = {
        "recipe": "causal_lm_lora",
        "model": model_args.model_name_or_path,
        "dataset": data_args.dataset_name,
        "finetuning": model_args.finetuning,
        "dp_optimizer": training_args.dp_optimizer,
        "max_seq_length": lm_args.max_seq_length,
        "perplexity_before": before["perplexity"],
        "perplexity_after": after["perplexity"],
        "test_loss_before": before["loss"],
        "test_loss_after": after["loss"],
        "test_tokens": after["tokens"],
        "test_examples": len(splits["test"]),
        **run.privacy_summary(trainer),
        "train_examples": len(splits["train"]),
        "trainable_parameters": trainable,
        "total_parameters": total,
        "train_runtime_seconds": train_metrics.get("train_runtime"),
    }
    run.save_outputs(
        trainer, metrics, plot_metric=None, options=options,
        title=f"{model_args.model_name_or_path} LoRA on {data_args.dataset_name} ({training_args.dp_optimizer})",
    )
    if trainer.is_world_process_zero():
        generations = [
            {"prompt": prompt, "before": first, "after": second}
            for prompt, first, second in zip(lm_args.generation_prompts, generations_before, generations_after)
        ]
        run.write_json(Path(training_args.output_dir) / GENERATIONS_FILE, {"generations": generations})
        log_generations(generations)
        run.print_summary(metrics, HEADLINE_KEYS, training_args.output_dir)
    run.finish(trainer)
    return metrics


if __name__ == "__main__":
    run.run_recipe_main(main)
