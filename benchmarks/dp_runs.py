#!/usr/bin/env python
"""Shared code of the DP accuracy and sensitivity benchmarks: tasks, one training run, a run pool.

A *run* is one `DPMicroAdamTrainer` training of one task with one setting (optimizer,
learning rate, epsilon, seed, MicroAdam density and window, clipping norm), followed by
its test accuracy. Every run executes in its own subprocess of this file
(`python benchmarks/dp_runs.py --run-config CONFIG.json --result RESULT.json`), so that
runs do not share a thread pool or memory peak, and several can run side by side.

Results are cached in `outputs/benchmarks/runs/<task>/<key>.json`, where the key is a
hash of the run's settings and the code-relevant options. A benchmark invoked again
reuses every finished run and trains only the missing ones, so an interrupted sweep
continues where it stopped (`--fresh` trains everything again).

The model and data preparation reuse `hf_dp_microadam.recipes` (dataset splits,
LoRA setup, image collation, metrics), so the runs train what the recipes train.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"
FIGURES_DIR = REPO_ROOT / "docs" / "figures"
RUNS_DIR = REPO_ROOT / "outputs" / "benchmarks" / "runs"
SNAPSHOTS_DIR = REPO_ROOT / "outputs" / "benchmarks" / "snapshots"

OPTIMIZERS = ("dp-microadam", "dp-adam", "dp-adambc", "dp-sgd")
TARGET_DELTA = 1e-5
# Bumped when a change to the run code makes cached results incomparable.
RUN_CODE_VERSION = 1

# Environment of every run subprocess. One intra-op thread per process: on a CPU shared
# with other jobs, an oversubscribed thread pool was measured 4 to 6 times slower.
OFFLINE_ENVIRONMENT = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}

# Half-decade learning-rate ladder. A grid is a run of consecutive rungs, and an edge
# extension adds the next rung beyond the best edge.
LR_LADDER = (1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0)


@dataclass(frozen=True)
class TaskSpec:
    """One benchmark task: model, data subset, batch sizes, step count and initial lr grids."""

    name: str
    description: str
    dataset: str
    train_samples: int | None
    eval_samples: int | None
    test_samples: int | None
    logical_batch_size: int
    micro_batch_size: int
    eval_batch_size: int
    max_steps: int
    eval_steps: int
    logging_steps: int
    # Initial grid per optimizer: three consecutive rungs of LR_LADDER.
    lr_grids: dict[str, tuple[float, ...]]
    # Measured on 1 thread of the shared 2-core AMD EPYC (load average 4 to 6), for the
    # time estimate only: training and evaluation examples per second.
    cpu_train_examples_per_second: float
    cpu_eval_examples_per_second: float
    settings: dict = field(default_factory=dict)

    def planned_train_examples(self) -> int:
        return self.max_steps * self.logical_batch_size


ADAM_SCRATCH_GRID = (3e-4, 1e-3, 3e-3)
# MicroAdam moves about 1% of the coordinates per step, each by a few learning rates
# (its bias correction uses the full step count over a window of 10), so its grid
# starts one rung higher. Every grid has three rungs and the same edge extensions.
MICROADAM_SCRATCH_GRID = (1e-3, 3e-3, 1e-2)
ADAM_LORA_GRID = (1e-3, 3e-3, 1e-2)
# One rung higher for MicroAdam, for the reason given above.
MICROADAM_LORA_GRID = (3e-3, 1e-2, 3e-2)

TASKS: dict[str, TaskSpec] = {
    "vit-fashion-mnist": TaskSpec(
        name="vit-fashion-mnist",
        description="ViT trained from random initialization on Fashion-MNIST (28x28 grayscale, 7x7 patches, "
        "4 layers, hidden size 64)",
        dataset="fashion-mnist",
        train_samples=10_000,
        eval_samples=2_000,
        test_samples=None,
        logical_batch_size=256,
        micro_batch_size=128,
        eval_batch_size=500,
        max_steps=150,
        eval_steps=30,
        logging_steps=5,
        lr_grids={
            "dp-microadam": MICROADAM_SCRATCH_GRID,
            "dp-adam": ADAM_SCRATCH_GRID,
            "dp-adambc": ADAM_SCRATCH_GRID,
            "dp-sgd": (0.3, 1.0, 3.0),
        },
        cpu_train_examples_per_second=300.0,
        cpu_eval_examples_per_second=3500.0,
        settings={"image_size": 28, "patch_size": 7, "hidden_size": 64, "num_hidden_layers": 4,
                  "num_attention_heads": 4, "intermediate_size": 128,
                  # Fashion-MNIST pixel mean and standard deviation on [0, 1].
                  "pixel_mean": 0.2860, "pixel_std": 0.3530},
    ),
    "minilm-rotten-tomatoes": TaskSpec(
        name="minilm-rotten-tomatoes",
        description="all-MiniLM-L6-v2 with LoRA (r=8, alpha 2, on query and value) plus a classification head "
        "on the mean of the token states, Rotten Tomatoes sentiment",
        dataset="rotten-tomatoes",
        train_samples=4_000,
        eval_samples=500,
        test_samples=None,
        logical_batch_size=64,
        micro_batch_size=32,
        eval_batch_size=128,
        max_steps=40,
        eval_steps=20,
        logging_steps=2,
        lr_grids={
            "dp-microadam": MICROADAM_LORA_GRID,
            "dp-adam": ADAM_LORA_GRID,
            "dp-adambc": ADAM_LORA_GRID,
            "dp-sgd": (1.0, 3.0, 10.0),
        },
        cpu_train_examples_per_second=15.0,
        cpu_eval_examples_per_second=50.0,
        # Mean pooling, the way all-MiniLM-L6-v2 was trained (see benchmarks/text_pooling_probe.py),
        # and lora_alpha 2 as in configs/text_classification/cpu.yaml.
        settings={"model": "all-minilm-l6-v2", "classifier_pooling": "mean", "lora_r": 8, "lora_alpha": 2,
                  "lora_target_modules": ["query", "value"], "max_seq_length": 64},
    ),
    "dinov2-fashion-mnist": TaskSpec(
        name="dinov2-fashion-mnist",
        description="DINOv2-small (ViT-S/14) with LoRA (r=8 on the query and value projections) plus the "
        "classification head, Fashion-MNIST at 56x56 pixels (4x4 patches)",
        dataset="fashion-mnist",
        train_samples=6_000,
        eval_samples=1_000,
        test_samples=2_000,
        logical_batch_size=64,
        micro_batch_size=64,
        eval_batch_size=128,
        max_steps=40,
        eval_steps=20,
        logging_steps=2,
        lr_grids={
            "dp-microadam": ADAM_LORA_GRID,
            "dp-adam": ADAM_LORA_GRID,
            "dp-adambc": ADAM_LORA_GRID,
            "dp-sgd": (1.0, 3.0, 10.0),
        },
        cpu_train_examples_per_second=17.0,
        cpu_eval_examples_per_second=55.0,
        settings={"model": "dinov2-small-imgfocus", "image_size": 56, "lora_r": 8, "lora_alpha": 16,
                  "lora_target_modules": ["q_proj", "v_proj"]},
    ),
}


@dataclass(frozen=True)
class RunConfig:
    """The settings of one training run."""

    task: str
    optimizer: str
    learning_rate: float
    target_epsilon: float
    seed: int
    density: float = 0.01
    window: int = 10
    clipping_norm: float = 1.0
    device: str = "cpu"
    threads: int = 1
    # Commit whose hf_dp_microadam package the run imports, or "worktree" for the files
    # of this checkout (see `code_path`).
    code_revision: str = "worktree"
    # Overrides of the task's step count and subset sizes, for quick development runs.
    max_steps: int | None = None
    train_samples: int | None = None

    def key(self) -> str:
        """Return the cache key: a hash of these fields and of the task's run settings."""
        spec = asdict(TASKS[self.task])
        # Neither the time-estimate rates nor the initial grids change what a run computes.
        for name in ("cpu_train_examples_per_second", "cpu_eval_examples_per_second", "lr_grids", "description"):
            spec.pop(name)
        payload = json.dumps({**asdict(self), "task_spec": spec, "code_version": RUN_CODE_VERSION}, sort_keys=True)
        return hashlib.sha1(payload.encode()).hexdigest()[:16]

    def label(self) -> str:
        return (f"{self.task} {self.optimizer} lr={self.learning_rate:g} eps={self.target_epsilon:g} "
                f"seed={self.seed} density={self.density:g} window={self.window} C={self.clipping_norm:g}")


# ---- One run (executed in the subprocess) ----


def _build_vit_scratch(task: TaskSpec, splits):
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    from hf_dp_microadam.recipes.classification import label_settings
    from hf_dp_microadam.recipes.data import ImageClassificationCollator

    settings = task.settings
    config = ViTConfig(
        image_size=settings["image_size"],
        patch_size=settings["patch_size"],
        num_channels=1,
        hidden_size=settings["hidden_size"],
        num_hidden_layers=settings["num_hidden_layers"],
        num_attention_heads=settings["num_attention_heads"],
        intermediate_size=settings["intermediate_size"],
        **label_settings(splits["train"]),
    )
    model = ViTForImageClassification(config)
    model.train()
    processor = ViTImageProcessor(
        do_resize=False, image_mean=[settings["pixel_mean"]], image_std=[settings["pixel_std"]]
    )
    return model, splits, ImageClassificationCollator(processor)


def _build_minilm_lora(task: TaskSpec, splits):
    from transformers import DataCollatorWithPadding

    from hf_dp_microadam.assets import load_model
    from hf_dp_microadam.recipes.arguments import LoraArguments, ModelArguments
    from hf_dp_microadam.recipes.classification import label_settings
    from hf_dp_microadam.recipes.modeling import prepare_trainable_model

    settings = task.settings
    model, tokenizer = load_model(settings["model"], "sequence-classification",
                                  classifier_pooling=settings["classifier_pooling"], **label_settings(splits["train"]))
    model = prepare_trainable_model(
        model,
        ModelArguments(model_name_or_path=settings["model"], finetuning="lora"),
        LoraArguments(lora_r=settings["lora_r"], lora_alpha=settings["lora_alpha"],
                      lora_target_modules=settings["lora_target_modules"]),
        peft_task_type="SEQ_CLS",
        default_trainable_modules=["classifier"],
    )
    splits = splits.map(
        lambda batch: tokenizer(batch["text"], truncation=True, max_length=settings["max_seq_length"]),
        batched=True,
        remove_columns=["text"],
    )
    return model, splits, DataCollatorWithPadding(tokenizer)


def _build_dinov2_lora(task: TaskSpec, splits):
    from hf_dp_microadam.assets import load_model
    from hf_dp_microadam.recipes.arguments import LoraArguments, ModelArguments
    from hf_dp_microadam.recipes.classification import label_settings
    from hf_dp_microadam.recipes.data import ImageClassificationCollator
    from hf_dp_microadam.recipes.modeling import prepare_trainable_model

    settings = task.settings
    size = settings["image_size"]
    model, processor = load_model(
        settings["model"],
        "image-classification",
        processor_kwargs={"size": {"height": size, "width": size}, "do_center_crop": False},
        **label_settings(splits["train"]),
    )
    model = prepare_trainable_model(
        model,
        ModelArguments(model_name_or_path=settings["model"], finetuning="lora"),
        LoraArguments(lora_r=settings["lora_r"], lora_alpha=settings["lora_alpha"],
                      lora_target_modules=settings["lora_target_modules"]),
        default_trainable_modules=["classifier"],
        # Read only with bool_masked_pos, which classification never passes, so it gets
        # no per-example gradient and must be frozen.
        unused_parameters=["mask_token"],
    )
    return model, splits, ImageClassificationCollator(processor)


BUILDERS = {
    "vit-fashion-mnist": _build_vit_scratch,
    "minilm-rotten-tomatoes": _build_minilm_lora,
    "dinov2-fashion-mnist": _build_dinov2_lora,
}


def _peak_rss_mib() -> float:
    # ru_maxrss is in KiB on Linux.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def execute_run(config: RunConfig) -> dict:
    """Train and test one run in this process; return its metrics and curves."""
    import torch

    torch.set_num_threads(config.threads)
    from transformers import set_seed

    from hf_dp_microadam import DPMicroAdamTrainer, DPTrainingArguments
    from hf_dp_microadam.recipes.arguments import DataArguments
    from hf_dp_microadam.recipes.data import load_splits
    from hf_dp_microadam.recipes.metrics import classification_metrics, logits_to_class_ids
    from hf_dp_microadam.recipes.modeling import count_parameters

    import hf_dp_microadam

    task = TASKS[config.task]
    started = time.perf_counter()
    data_args = DataArguments(
        dataset_name=task.dataset,
        max_train_samples=config.train_samples or task.train_samples,
        max_eval_samples=task.eval_samples,
        max_test_samples=task.test_samples,
    )
    columns = ("text", "label") if task.dataset == "rotten-tomatoes" else ("image", "label")
    splits = load_splits(data_args, required_columns=columns)
    # The seed fixes the initialization (the random ViT, LoRA's A matrices and the head).
    set_seed(config.seed)
    model, splits, collator = BUILDERS[config.task](task, splits)
    trainable, total = count_parameters(model)

    max_steps = config.max_steps or task.max_steps
    eval_steps = min(task.eval_steps, max_steps)
    with tempfile.TemporaryDirectory(prefix="dp_run_") as output_dir:
        args = DPTrainingArguments(
            output_dir=output_dir,
            target_epsilon=config.target_epsilon,
            target_delta=TARGET_DELTA,
            per_sample_max_grad_norm=config.clipping_norm,
            logical_batch_size=task.logical_batch_size,
            per_device_train_batch_size=task.micro_batch_size,
            per_device_eval_batch_size=task.eval_batch_size,
            dp_optimizer=config.optimizer,
            microadam_density=config.density,
            microadam_window=config.window,
            learning_rate=config.learning_rate,
            lr_scheduler_type="constant",
            weight_decay=0.0,
            max_steps=max_steps,
            eval_strategy="steps",
            eval_steps=eval_steps,
            logging_steps=task.logging_steps,
            save_strategy="no",
            report_to="none",
            use_cpu=config.device == "cpu",
            disable_tqdm=True,
            # The image collators read the `image` column, which the forward pass does not take.
            remove_unused_columns=task.dataset == "rotten-tomatoes",
            seed=config.seed,
            dp_seed=config.seed,
        )
        trainer = DPMicroAdamTrainer(
            model=model,
            args=args,
            train_dataset=splits["train"],
            eval_dataset=splits["validation"],
            data_collator=collator,
            compute_metrics=classification_metrics,
            preprocess_logits_for_metrics=logits_to_class_ids,
        )
        train_started = time.perf_counter()
        trainer.train()
        train_seconds = time.perf_counter() - train_started
        test_metrics = trainer.evaluate(splits["test"], metric_key_prefix="test")
        report = trainer.privacy_report()
        history = trainer.state.log_history

    curves = {"loss": [], "eval_accuracy": [], "epsilon": []}
    for entry in history:
        for key in curves:
            value = entry.get(key)
            if isinstance(value, (int, float)) and math.isfinite(value):
                curves[key].append([entry["step"], float(value)])
    final_eval = [value for step, value in curves["eval_accuracy"] if step == max_steps]
    return {
        "config": asdict(config),
        "key": config.key(),
        "package_path": str(Path(hf_dp_microadam.__file__).parent),
        "test_accuracy": test_metrics["test_accuracy"],
        "test_loss": test_metrics["test_loss"],
        "validation_accuracy": final_eval[-1] if final_eval else None,
        "epsilon": report.epsilon,
        "delta": report.delta,
        "noise_multiplier": report.noise_multiplier,
        "steps": report.steps,
        "sample_rate": report.sample_rate,
        "train_examples": len(splits["train"]),
        "validation_examples": len(splits["validation"]),
        "test_examples": len(splits["test"]),
        "trainable_parameters": trainable,
        "total_parameters": total,
        "train_seconds": round(train_seconds, 1),
        "run_seconds": round(time.perf_counter() - started, 1),
        "peak_rss_mib": round(_peak_rss_mib(), 1),
        "curves": curves,
    }


# ---- Run pool (executed in the benchmark process) ----


def run_path(config: RunConfig) -> Path:
    return RUNS_DIR / config.task / f"{config.key()}.json"


def load_cached(config: RunConfig) -> dict | None:
    path = run_path(config)
    if not path.is_file():
        return None
    result = json.loads(path.read_text())
    return result if result.get("key") == config.key() else None


def estimate_run_seconds(config: RunConfig) -> float:
    """Return an estimate of one run's wall time on this CPU; see `TaskSpec` for its rates."""
    task = TASKS[config.task]
    steps = config.max_steps or task.max_steps
    train = steps * task.logical_batch_size / task.cpu_train_examples_per_second
    evaluations = max(1, steps // min(task.eval_steps, steps))
    full_test_split = 10_000 if task.dataset == "fashion-mnist" else 1_275
    test_examples = task.test_samples or full_test_split
    evaluated = evaluations * (task.eval_samples or 0) + test_examples
    # About 40 s to start Python, import torch and transformers, load the data and
    # calibrate the noise.
    return train + evaluated / task.cpu_eval_examples_per_second + 40.0


def describe_estimate(configs: list[RunConfig], jobs: int, device: str) -> str:
    pending = [config for config in configs if load_cached(config) is None]
    seconds = sum(estimate_run_seconds(config) for config in pending) / max(1, jobs)
    text = (f"{len(configs)} runs, {len(configs) - len(pending)} already in the cache, {len(pending)} to train "
            f"with {jobs} at a time: estimated {seconds / 60:.0f} min")
    if device == "cpu":
        text += (" (throughput measured on one thread of a shared 2-core AMD EPYC; a faster or idle CPU "
                 "takes less)")
    else:
        text += " on the CPU rates; a GPU has not been measured and should take far less"
    return text


def resolve_revision(revision: str) -> str:
    """Return the full commit id of `revision`, or "worktree" unchanged."""
    if revision == "worktree":
        return revision
    completed = subprocess.run(["git", "rev-parse", "--verify", f"{revision}^{{commit}}"], cwd=REPO_ROOT,
                               capture_output=True, text=True)
    if completed.returncode != 0:
        raise ValueError(f"--code-revision {revision!r} is not a commit of {REPO_ROOT}: {completed.stderr.strip()}")
    return completed.stdout.strip()


def code_path(revision: str) -> Path:
    """Return the folder that contains the `hf_dp_microadam` package the runs import.

    For a commit, the package is exported once with `git archive` to
    outputs/benchmarks/snapshots/<commit>/, so that edits made in the checkout while a
    sweep runs do not mix two versions of the library into one sweep.
    """
    if revision == "worktree":
        return REPO_ROOT
    target = SNAPSHOTS_DIR / revision
    if not (target / "hf_dp_microadam" / "__init__.py").is_file():
        target.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "archive", "--format=tar", revision, "hf_dp_microadam"], cwd=REPO_ROOT,
                                 capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(target)], input=archive, check=True)
    return target


def add_revision_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--code-revision", default="HEAD",
                        help="commit whose hf_dp_microadam package the runs import (default: HEAD), or 'worktree' "
                        "for the files of this checkout; part of the cache key")


def _child_environment(threads: int, revision: str) -> dict:
    environment = dict(os.environ)
    for name, value in OFFLINE_ENVIRONMENT.items():
        environment.setdefault(name, value)
    environment.setdefault("HF_HOME", str(REPO_ROOT / ".hf_home"))
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        environment[name] = str(threads)
    python_path = environment.get("PYTHONPATH")
    environment["PYTHONPATH"] = str(code_path(revision)) + (os.pathsep + python_path if python_path else "")
    return environment


def run_all(configs: list[RunConfig], *, jobs: int, fresh: bool = False, log=print) -> dict[str, dict]:
    """Run every config not in the cache, `jobs` at a time; return the results by key.

    A run that fails is returned as `{"failed": True, "returncode": ..., "log": ...}` and
    the others go on.
    """
    results: dict[str, dict] = {}
    pending: list[RunConfig] = []
    for config in dict.fromkeys(configs):
        cached = None if fresh else load_cached(config)
        if cached is not None:
            results[config.key()] = cached
        else:
            pending.append(config)
    running: list[tuple[RunConfig, subprocess.Popen, float, Path]] = []
    total = len(pending)
    finished = 0
    while pending or running:
        while pending and len(running) < jobs:
            config = pending.pop(0)
            path = run_path(config)
            path.parent.mkdir(parents=True, exist_ok=True)
            config_path = path.with_suffix(".config.json")
            config_path.write_text(json.dumps(asdict(config), indent=2) + "\n")
            log_path = path.with_suffix(".log")
            with open(log_path, "w") as log_file:
                process = subprocess.Popen(
                    [sys.executable, str(Path(__file__).resolve()), "--run-config", str(config_path),
                     "--result", str(path)],
                    stdout=log_file, stderr=subprocess.STDOUT, env=_child_environment(config.threads, config.code_revision),
                    cwd=REPO_ROOT,
                )
            running.append((config, process, time.perf_counter(), log_path))
            log(f"  started  {config.label()}")
        time.sleep(1.0)
        still_running = []
        for config, process, started, log_path in running:
            if process.poll() is None:
                still_running.append((config, process, started, log_path))
                continue
            finished += 1
            elapsed = time.perf_counter() - started
            result = load_cached(config) if process.returncode == 0 else None
            if result is None:
                results[config.key()] = {"config": asdict(config), "key": config.key(), "failed": True,
                                         "returncode": process.returncode, "log": str(log_path)}
                log(f"  FAILED   {config.label()} (exit code {process.returncode}, log {log_path})")
            else:
                results[config.key()] = result
                log(f"  finished {config.label()}: test accuracy {result['test_accuracy']:.4f}, "
                    f"validation {result['validation_accuracy']:.4f}, {elapsed:.0f} s ({finished}/{total})")
        running = still_running
    return results


# ---- Reporting helpers ----


def load_average() -> list[float] | None:
    try:
        return [round(value, 2) for value in os.getloadavg()]
    except OSError:
        return None


def describe_machine(device: str) -> dict:
    import torch
    import transformers

    cpu_model = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    machine = {
        "cpu": cpu_model,
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": device,
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        machine["gpu"] = torch.cuda.get_device_name(0)
    return machine


def git_revision() -> dict:
    """Return the commit and whether tracked files differ from it, for the JSON record."""
    def git(*arguments) -> str:
        return subprocess.run(["git", *arguments], cwd=REPO_ROOT, capture_output=True, text=True).stdout.strip()

    return {"commit": git("rev-parse", "HEAD"), "tracked_files_modified": bool(git("status", "--porcelain",
                                                                                    "--untracked-files=no"))}


def summarize(values: list[float]) -> dict:
    """Return mean, half of the range (max - min) / 2, and the values."""
    return {
        "mean": statistics.fmean(values),
        "half_range": (max(values) - min(values)) / 2,
        "values": values,
    }


def format_mean(summary: dict | None) -> str:
    if summary is None:
        return "failed"
    if len(summary["values"]) == 1:
        return f"{summary['mean']:.3f}"
    return f"{summary['mean']:.3f} ± {summary['half_range']:.3f}"


def write_report(path: Path, report: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")


def report_header(command: list[str], device: str, started_wall: float) -> dict:
    return {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python", *command]),
        "machine": describe_machine(device),
        "revision": git_revision(),
        "target_delta": TARGET_DELTA,
        "wall_seconds": round(time.perf_counter() - started_wall, 1),
    }


def add_device_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                        help="device of the training runs (default: cpu)")


def check_device(parser: argparse.ArgumentParser, device: str) -> None:
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            parser.error("--device cuda was given, but torch.cuda.is_available() is False on this machine")


def _main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Execute one benchmark run (used by the benchmark scripts).")
    parser.add_argument("--run-config", type=Path, required=True, help="JSON file with the RunConfig fields")
    parser.add_argument("--result", type=Path, required=True, help="JSON file to write the result to")
    args = parser.parse_args(argv)
    config = RunConfig(**json.loads(args.run_config.read_text()))
    result = execute_run(config)
    # Written last and atomically, so a result file always belongs to a finished run.
    partial = args.result.with_suffix(".partial")
    partial.write_text(json.dumps(result, indent=2) + "\n")
    partial.replace(args.result)
    return 0


if __name__ == "__main__":
    sys.exit(_main())
