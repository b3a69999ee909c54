"""Run control shared by the recipes: logging, checkpoint detection, training and output files.

Every run writes to its `output_dir`:

- `metrics.json`: the final metrics of the recipe with the privacy spent (`METRICS_FILE`);
- `privacy_report.json`: the trainer's privacy report;
- `training_curves.png`: training loss, evaluation metric and epsilon against the step;
- the trained model or LoRA adapter with its tokenizer or image processor, loadable with
  `from_pretrained` (a LoRA adapter with `peft.PeftModel.from_pretrained`);
- `recipe_options.json`: every option of the run, for comparing a later command with it;
- `trainer_state.json` (the log history) and `train_results.json`;
- `checkpoint-*` folders when `save_strategy` is not "no".
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import shutil
import sys
from pathlib import Path

from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

from hf_dp_microadam.assets import MissingAssetError
from hf_dp_microadam.engine import DPSettingsChangedError

from .config import ConfigError
from .plots import plot_training_curves

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.json"
OPTIONS_FILE = "recipe_options.json"
# Options that set where and how a run reports, not what it trains: a finished run is not
# compared on them.
_RUN_CONTROL_OPTIONS = frozenset({
    "output_dir", "overwrite_output_dir", "logging_dir", "disable_tqdm", "report_to", "run_name", "project",
    "trackio_space_id", "hub_model_id", "hub_token", "push_to_hub", "log_level", "log_level_replica", "local_rank",
})
PLOT_FILE = "training_curves.png"
# Loggers of this package and of the recipe scripts, shown at INFO on the main process.
RECIPE_LOGGERS = ("hf_dp_microadam", "__main__")


def setup_logging(training_args) -> None:
    """Configure logging once for a recipe run.

    The recipe's own messages (and the DP engine's, such as the calibrated noise
    multiplier) are shown at INFO on the main process and at WARNING on the others.
    transformers and datasets keep the level that `log_level` / `log_level_replica` set
    (WARNING by default), because their INFO messages are many.
    """
    import datasets
    import transformers

    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
        datefmt="%Y-%m-%d %H:%M:%S",
        handlers=[logging.StreamHandler(sys.stdout)],
        # Opacus configures the root logger when it is imported; this format replaces it.
        force=True,
    )
    library_level = training_args.get_process_log_level()
    datasets.utils.logging.set_verbosity(library_level)
    transformers.utils.logging.set_verbosity(library_level)
    transformers.utils.logging.enable_default_handler()
    transformers.utils.logging.enable_explicit_format()
    recipe_level = logging.INFO if training_args.should_log else logging.WARNING
    for name in RECIPE_LOGGERS:
        logging.getLogger(name).setLevel(recipe_level)


def detect_last_checkpoint(training_args) -> str | None:
    """Return the checkpoint to resume from, or None for a fresh run.

    - `resume_from_checkpoint` set: that checkpoint.
    - `overwrite_output_dir` set: the `checkpoint-*` folders of `output_dir` are deleted and
      the run starts fresh.
    - otherwise the last `checkpoint-*` folder of `output_dir`, if there is one. An
      `output_dir` that has files but no checkpoint is an error, so that a finished run is
      not overwritten by accident.
    """
    if training_args.resume_from_checkpoint:
        return training_args.resume_from_checkpoint
    output_dir = Path(training_args.output_dir)
    if not output_dir.is_dir():
        return None
    if training_args.overwrite_output_dir:
        old_checkpoints = sorted(output_dir.glob(f"{PREFIX_CHECKPOINT_DIR}-*"))
        if old_checkpoints and training_args.should_save:
            logger.warning(
                "overwrite_output_dir is set: deleting %d checkpoint folder(s) in %s and starting a new run",
                len(old_checkpoints), output_dir,
            )
            for checkpoint in old_checkpoints:
                shutil.rmtree(checkpoint)
        return None
    last_checkpoint = get_last_checkpoint(str(output_dir))
    if last_checkpoint is not None:
        return last_checkpoint
    if any(output_dir.iterdir()):
        raise ConfigError(
            f"output_dir {output_dir} already contains files but no checkpoint to resume from. "
            "Set --overwrite_output_dir true to write a new run into it, or choose another output_dir."
        )
    return None


def is_final_checkpoint(checkpoint: str | None) -> bool:
    """Return whether `checkpoint` was saved at the last planned step of its run.

    transformers 5.25 takes one more training step when it resumes from such a
    checkpoint, and under a privacy budget that step is rejected, so a finished run is not
    resumed.
    """
    if checkpoint is None:
        return False
    state_file = Path(checkpoint) / TRAINER_STATE_NAME
    if not state_file.is_file():
        return False
    state = json.loads(state_file.read_text(encoding="utf-8"))
    max_steps = state.get("max_steps") or 0
    return max_steps > 0 and state.get("global_step", 0) >= max_steps


def recipe_options(arguments: tuple) -> dict:
    """Return every option of a parsed recipe command as a JSON-ready {name: value} mapping."""
    options = {}
    for instance in arguments:
        to_dict = getattr(instance, "to_dict", None)
        options.update(to_dict() if callable(to_dict) else dataclasses.asdict(instance))
    return json.loads(json.dumps(options, default=str))


def options_changed_since(options: dict, finished: dict) -> list[str]:
    """Return 'option: finished -> requested' for each option that differs from a finished run's."""
    changed = []
    for name in sorted(set(options) | set(finished)):
        if name in _RUN_CONTROL_OPTIONS or name.startswith("_"):
            continue
        if options.get(name) != finished.get(name):
            changed.append(f"{name}: {finished.get(name)!r} -> {options.get(name)!r}")
    return changed


def report_finished_run(training_args, checkpoint: str, headline_keys: tuple[str, ...],
                        options: dict | None = None) -> dict:
    """Print the results of the finished run in output_dir and return its metrics.

    With `options` (see `recipe_options`), every option that differs from the finished
    run's `recipe_options.json` is named in a warning; without them, or for a run that
    wrote no such file, the DP settings in its metrics are compared.
    Raises FileNotFoundError when the run reached its last step but wrote no metrics.
    """
    metrics_file = Path(training_args.output_dir) / METRICS_FILE
    if not metrics_file.is_file():
        raise FileNotFoundError(
            f"{checkpoint} is the last step of a run, but {metrics_file} is missing, so the run stopped before "
            "its final evaluation. Set --overwrite_output_dir true to train again."
        )
    metrics = json.loads(metrics_file.read_text(encoding="utf-8"))
    logger.warning(
        "The run in %s already finished (%s is its last step); showing its results. Set --overwrite_output_dir "
        "true to train again.",
        training_args.output_dir, Path(checkpoint).name,
    )
    options_file = Path(training_args.output_dir) / OPTIONS_FILE
    if options is not None and options_file.is_file():
        changed = options_changed_since(options, json.loads(options_file.read_text(encoding="utf-8")))
    else:
        changed = settings_changed_since(training_args, metrics)
    if changed:
        logger.warning(
            "The finished run used other settings than this command (%s): its results do not reflect them. Set "
            "--overwrite_output_dir true or choose another output_dir to train with the new settings.",
            ", ".join(changed),
        )
    if training_args.should_log:
        print_summary(metrics, headline_keys, training_args.output_dir)
    return metrics


# (option of this command, key of the same setting in metrics.json)
_REPORTED_SETTINGS = (
    ("target_epsilon", "target_epsilon"),
    ("dp_optimizer", "dp_optimizer"),
    ("logical_batch_size", "expected_batch_size"),
)


def settings_changed_since(training_args, metrics: dict) -> list[str]:
    """Return 'option: finished -> requested' for each DP setting that differs from a finished run's."""
    changed = []
    for option, key in _REPORTED_SETTINGS:
        requested = getattr(training_args, option, None)
        if key in metrics and requested is not None and metrics[key] != requested:
            changed.append(f"{option}: {metrics[key]} -> {requested}")
    return changed


def train(trainer, checkpoint: str | None) -> dict:
    """Run `trainer.train()`, resuming from `checkpoint` if given; log and save the train metrics."""
    if checkpoint is not None:
        logger.warning(
            "Resuming from checkpoint %s: its privacy state continues the epsilon spent so far. Set "
            "--overwrite_output_dir true to start a new run instead.",
            checkpoint,
        )
    result = trainer.train(resume_from_checkpoint=checkpoint)
    metrics = dict(result.metrics)
    trainer.log_metrics("train", metrics)
    trainer.save_metrics("train", metrics)
    trainer.save_state()
    return metrics


def privacy_summary(trainer) -> dict:
    """Return the privacy fields of the final metrics: epsilon, delta, noise multiplier, steps."""
    report = trainer.privacy_report()
    return {
        "epsilon": report.epsilon,
        "delta": report.delta,
        "target_epsilon": report.target_epsilon,
        "noise_multiplier": report.noise_multiplier,
        "sample_rate": report.sample_rate,
        "expected_batch_size": report.expected_batch_size,
        "max_grad_norm": report.max_grad_norm,
        "steps": report.steps,
        "accountant": report.accountant,
        "dp_disabled": report.disabled,
    }


def _json_ready(value):
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {key: _json_ready(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(item) for item in value]
    return value


def write_json(path: str | Path, data: dict) -> Path:
    """Write `data` as indented JSON; infinite and NaN floats become strings ("inf")."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_json_ready(data), indent=2, allow_nan=False) + "\n", encoding="utf-8")
    return path


def save_outputs(trainer, metrics: dict, *, plot_metric: str | None, title: str, options: dict | None = None) -> None:
    """Save the model or adapter, `metrics.json`, the options and the training-curve plot (main process only)."""
    trainer.save_model()
    if not trainer.is_world_process_zero():
        return
    output_dir = Path(trainer.args.output_dir)
    write_json(output_dir / METRICS_FILE, metrics)
    if options is not None:
        write_json(output_dir / OPTIONS_FILE, options)
    try:
        plot_training_curves(trainer.state.log_history, output_dir / PLOT_FILE, metric=plot_metric, title=title)
    except ValueError as error:
        # A run resumed at its last step logs no new entries.
        logger.warning("No training curves plotted: %s", error)


def finish(trainer) -> None:
    """Wait for every process, then close the process group.

    Without this, a rank that is done while rank 0 still writes files can exit with the
    gloo process group open, which aborts it and makes the launcher stop rank 0.
    """
    trainer.accelerator.wait_for_everyone()
    trainer.accelerator.end_training()


def print_summary(metrics: dict, keys: tuple[str, ...], output_dir: str) -> None:
    """Print `metrics[key]` for each of `keys` as an aligned block on stdout."""
    width = max(len(key) for key in (*keys, "outputs"))
    print("\n***** DP fine-tuning results *****")
    for key in keys:
        value = metrics.get(key)
        text = f"{value:.4g}" if isinstance(value, float) and math.isfinite(value) else str(value)
        print(f"  {key:<{width}} : {text}")
    print(f"  {'outputs':<{width}} : {output_dir}\n")


def run_recipe_main(main) -> None:
    """Call a recipe's `main()`, exiting with status 2 on a configuration error, a missing
    asset, or a checkpoint whose DP settings differ from the command's.

    Those errors carry the whole fix in their message, so it is printed without a
    traceback. Every other exception propagates.
    """
    try:
        main()
    except (ConfigError, MissingAssetError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except DPSettingsChangedError as error:
        print(f"error: {error} (another output_dir, or --overwrite_output_dir true, starts a new run)",
              file=sys.stderr)
        sys.exit(2)
