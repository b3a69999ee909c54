"""Steps shared by the text and image classification recipes."""

from __future__ import annotations

from . import run
from .modeling import count_parameters

HEADLINE_KEYS = ("test_accuracy", "epsilon", "delta", "steps")


def label_settings(train_dataset) -> dict:
    """Return `num_labels`, and `id2label` / `label2id` when the `label` column has class names."""
    feature = train_dataset.features.get("label")
    names = list(feature.names) if hasattr(feature, "names") else None
    if names is None:
        return {"num_labels": len(set(train_dataset["label"]))}
    return {
        "num_labels": len(names),
        "id2label": dict(enumerate(names)),
        "label2id": {name: index for index, name in enumerate(names)},
    }


def evaluate_and_save(trainer, test_dataset, *, recipe: str, model_args, data_args, train_metrics: dict,
                      extra: dict | None = None, options: dict | None = None) -> dict:
    """Score the trained model on the test split, then write the metrics, options, plot and model.

    Returns the final metrics: test accuracy and loss, the privacy spent, and the run's
    sizes. `extra` adds recipe-specific entries, and `options` (see `run.recipe_options`)
    is saved for comparing later commands with this run.
    """
    args = trainer.args
    test_metrics = trainer.evaluate(test_dataset, metric_key_prefix="test")
    trainer.log_metrics("test", test_metrics)
    trainable, total = count_parameters(trainer.model)
    metrics = {
        "recipe": recipe,
        "model": model_args.model_name_or_path,
        "dataset": data_args.dataset_name,
        "finetuning": model_args.finetuning,
        "dp_optimizer": args.dp_optimizer,
        **(extra or {}),
        "test_accuracy": test_metrics["test_accuracy"],
        "test_loss": test_metrics["test_loss"],
        "test_examples": len(test_dataset),
        **run.privacy_summary(trainer),
        "train_examples": len(trainer.train_dataset),
        "trainable_parameters": trainable,
        "total_parameters": total,
        "train_runtime_seconds": train_metrics.get("train_runtime"),
    }
    run.save_outputs(
        trainer, metrics, plot_metric="eval_accuracy", options=options,
        title=f"{model_args.model_name_or_path} on {data_args.dataset_name} ({args.dp_optimizer})",
    )
    if trainer.is_world_process_zero():
        run.print_summary(metrics, HEADLINE_KEYS, args.output_dir)
    run.finish(trainer)
    return metrics
