#!/usr/bin/env python
"""Differentially private fine-tuning of a vision transformer (ViT, DeiT, DINOv2) for image classification.

    python recipes/image_classification.py configs/image_classification/cpu.yaml
    python recipes/image_classification.py configs/image_classification/cpu.yaml --finetuning lora
    accelerate launch --config_file configs/accelerate/gpu.yaml \
        recipes/image_classification.py configs/image_classification/gpu_deit_cifar10.yaml

The classification head is trained alone (`finetuning: head`), with LoRA adapters
(`lora`) or with the whole model (`full`). The final metrics are the test accuracy and
the privacy spent; see `hf_dp_microadam.recipes.run` for the files written to output_dir.
"""

import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path

from hf_dp_microadam.recipes.environment import configure_environment

# Before transformers and datasets are imported: they read the offline switches once.
configure_environment(sys.argv[1:], hf_home=Path(__file__).resolve().parent.parent / ".hf_home")

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
from hf_dp_microadam.recipes.config import parse_recipe_args  # noqa: E402
from hf_dp_microadam.recipes.classification import HEADLINE_KEYS, evaluate_and_save, label_settings  # noqa: E402
from hf_dp_microadam.recipes.data import ImageClassificationCollator, load_splits  # noqa: E402
from hf_dp_microadam.recipes.metrics import classification_metrics, logits_to_class_ids  # noqa: E402
from hf_dp_microadam.recipes.modeling import prepare_trainable_model  # noqa: E402

logger = logging.getLogger(__name__)

HEAD_MODULES = ("classifier",)
# ViT and DINOv2 read their mask_token only when `bool_masked_pos` is passed, which
# classification never does. A trainable parameter without a per-example gradient is
# rejected by the DP pre-flight check, so it is frozen.
UNUSED_PARAMETERS = ("mask_token",)


@dataclass
class ImageArguments:
    """Image preprocessing settings."""

    image_size: int | None = field(
        default=None,
        metadata={
            "help": "Resize every image to image_size x image_size pixels, without center crop. Default: the "
            "image processor's own resize and crop (224 pixels for the usual ViT checkpoints)."
        },
    )


ARGUMENT_TYPES = (ModelArguments, DataArguments, LoraArguments, ImageArguments, RecipeTrainingArguments)


def main(argv=None):
    arguments = parse_recipe_args(ARGUMENT_TYPES, argv)
    model_args, data_args, lora_args, image_args, training_args = arguments
    options = run.recipe_options(arguments)
    # The collator reads the `image` column, which the model's forward does not take.
    training_args.remove_unused_columns = False
    run.setup_logging(training_args)
    checkpoint = run.detect_last_checkpoint(training_args)
    if run.is_final_checkpoint(checkpoint):
        return run.report_finished_run(training_args, checkpoint, HEADLINE_KEYS, options)
    set_seed(training_args.seed)

    splits = load_splits(data_args, required_columns=("image", "label"))
    processor_kwargs = {}
    if image_args.image_size is not None:
        processor_kwargs = {
            "size": {"height": image_args.image_size, "width": image_args.image_size},
            "do_center_crop": False,
        }
    model, image_processor = load_model(
        model_args.model_name_or_path, "image-classification", processor_kwargs=processor_kwargs,
        **label_settings(splits["train"]),
    )
    model = prepare_trainable_model(
        model, model_args, lora_args, default_trainable_modules=HEAD_MODULES, unused_parameters=UNUSED_PARAMETERS
    )

    trainer = DPMicroAdamTrainer(
        model=model,
        args=training_args,
        train_dataset=splits["train"],
        eval_dataset=splits["validation"],
        processing_class=image_processor,
        data_collator=ImageClassificationCollator(image_processor),
        compute_metrics=classification_metrics,
        preprocess_logits_for_metrics=logits_to_class_ids,
    )
    train_metrics = run.train(trainer, checkpoint)
    return evaluate_and_save(
        trainer, splits["test"], recipe="image_classification", model_args=model_args, data_args=data_args,
        train_metrics=train_metrics, options=options, extra={"image_size": image_args.image_size},
    )


if __name__ == "__main__":
    run.run_recipe_main(main)
