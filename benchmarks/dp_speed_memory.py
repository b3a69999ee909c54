#!/usr/bin/env python
"""Training speed, peak memory and optimizer state of DP training against its alternatives.

Model: the packaged all-MiniLM-L6-v2 with LoRA (r=8 on query and value) plus the
classification head, prepared by `hf_dp_microadam.recipes.modeling` as the text recipe
does. Data: the Rotten Tomatoes training split (10,202 sentences), every sentence
truncated or padded to `--sequence-length` tokens, so that every micro-batch costs the
same. Variants, each in its own subprocess so that peak memory and thread pools do not
mix:

- trainer-adamw: plain `transformers.Trainer` with AdamW (`optim="adamw_torch"`), a
  batch of `--logical-batch-size` examples made of micro-batches of `--micro-batch-size`
  through `gradient_accumulation_steps`, and the Trainer's default `max_grad_norm=1`;
- dp-trainer-dp-microadam and dp-trainer-dp-adam: `DPMicroAdamTrainer` with Poisson
  logical batches of expected size `--logical-batch-size`, the same micro-batch size,
  clipping norm 1, noise multiplier 1 and the default MicroAdam settings;
- opacus-adamw: the loop that Opacus 1.6's tutorials write: `PrivacyEngine.make_private`
  on the same model, AdamW, the same clipping norm, noise multiplier and expected batch
  size with Poisson sampling, and `BatchMemoryManager` for the micro-batches.

Speed is the wall time of the timed steps (after `--warmup-steps`) divided by the
examples they processed, because Poisson batches vary in size; the step time is also
reported. Every variant runs `--repeats` times, interleaved, and the fastest repeat
counts (the machine may be shared). Peak memory is the subprocess's peak resident set
size (RSS), and its rise over the RSS after loading the model and data. Optimizer state
is the bytes of the tensors in the update rule's state per trainable parameter, here
and for the full models (MicroAdam and AdamW at their defaults, one step on random
gradients). With `--profile`, one more subprocess per DP variant records a torch
profiler table of the operators with the largest self CPU time.

The table goes to stdout, the JSON to benchmarks/results/dp_speed_memory.json (with the
load average before and after every variant: on a shared machine the load changes the
numbers).

    python benchmarks/dp_speed_memory.py
    python benchmarks/dp_speed_memory.py --profile --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import dp_runs

RESULTS_PATH = dp_runs.RESULTS_DIR / "dp_speed_memory.json"
MODEL_NAME = "all-minilm-l6-v2"
VARIANTS = ("trainer-adamw", "dp-trainer-dp-microadam", "dp-trainer-dp-adam", "opacus-adamw")
PROFILED_VARIANTS = ("dp-trainer-dp-microadam", "trainer-adamw", "opacus-adamw")
NOISE_MULTIPLIER = 1.0
CLIPPING_NORM = 1.0
LEARNING_RATE = 1e-3
# Targets of the product for MiniLM LoRA, checked in the summary.
TARGET_RATIO_TO_NON_PRIVATE = 1.5
TARGET_RATIO_TO_OPACUS = 1.05
TARGET_STATE_BYTES_PER_PARAMETER = 0.97


def parse_arguments(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    dp_runs.add_device_argument(parser)
    dp_runs.add_revision_argument(parser)
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--steps", type=int, default=10, help="timed logical steps per variant (default: 10)")
    parser.add_argument("--warmup-steps", type=int, default=2, help="untimed first steps (default: 2)")
    parser.add_argument("--logical-batch-size", type=int, default=64,
                        help="examples per optimizer step; the expected Poisson batch size for DP (default: 64)")
    parser.add_argument("--micro-batch-size", type=int, default=16,
                        help="examples per forward and backward pass (default: 16)")
    parser.add_argument("--sequence-length", type=int, default=64, help="tokens per example (default: 64)")
    parser.add_argument("--repeats", type=int, default=2, help="interleaved repeats per variant (default: 2)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per variant (default: 1)")
    parser.add_argument("--profile", action="store_true", help="also record a torch profiler table per DP variant")
    parser.add_argument("--skip-full-model-state", action="store_true",
                        help="skip the optimizer state measurement on the full models")
    parser.add_argument("--output", type=Path, default=RESULTS_PATH, help="JSON report")
    parser.add_argument("--yes", action="store_true", help="start without the 10 s pause after the estimate")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--profile-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker is None:
        dp_runs.check_device(parser, args.device)
        try:
            args.code_revision = dp_runs.resolve_revision(args.code_revision)
        except ValueError as error:
            parser.error(str(error))
    if args.logical_batch_size % args.micro_batch_size:
        parser.error("--logical-batch-size must be a multiple of --micro-batch-size (the plain Trainer "
                     "accumulates whole micro-batches)")
    return args


# ---- Worker side ----


def _current_rss_mib() -> float:
    with open("/proc/self/statm") as statm:
        resident_pages = int(statm.read().split()[1])
    return resident_pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _state_bytes(optimizer) -> int:
    """Return the bytes of every tensor in the state of the innermost update rule."""
    import torch

    while True:
        inner = getattr(optimizer, "original_optimizer", None) or getattr(optimizer, "optimizer", None)
        if inner is None or inner is optimizer:
            break
        optimizer = inner
    total = 0
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor):
                total += value.numel() * value.element_size()
    return total


class PhaseTimer:
    """Wall time spent inside wrapped methods, summed per phase name."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self.enabled = False

    def wrap(self, owner, method_name: str, phase: str) -> None:
        method = getattr(owner, method_name)

        def timed(*positional, **keywords):
            if not self.enabled:
                return method(*positional, **keywords)
            started = time.perf_counter()
            try:
                return method(*positional, **keywords)
            finally:
                self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - started

        setattr(owner, method_name, timed)


def _prepare_model_and_data(args):
    import torch
    from transformers import set_seed

    from hf_dp_microadam.assets import load_dataset_dict, load_model
    from hf_dp_microadam.recipes.arguments import LoraArguments, ModelArguments
    from hf_dp_microadam.recipes.modeling import prepare_trainable_model

    torch.set_num_threads(args.threads)
    set_seed(0)
    train = load_dataset_dict("rotten-tomatoes")["train"]
    model, tokenizer = load_model(MODEL_NAME, "sequence-classification", num_labels=2)
    model = prepare_trainable_model(
        model,
        ModelArguments(model_name_or_path=MODEL_NAME, finetuning="lora"),
        LoraArguments(lora_r=8, lora_alpha=16, lora_target_modules=["query", "value"]),
        peft_task_type="SEQ_CLS",
        default_trainable_modules=["classifier"],
    )
    train = train.map(
        lambda batch: tokenizer(batch["text"], truncation=True, padding="max_length",
                                max_length=args.sequence_length),
        batched=True,
        remove_columns=["text"],
    )
    train = train.rename_column("label", "labels")
    train.set_format("torch")
    return model, train


def _collate(examples):
    import torch

    return {key: torch.stack([example[key] for example in examples]) for key in examples[0]}


def _trainer_common(args, output_dir: str) -> dict:
    return dict(
        output_dir=output_dir,
        per_device_train_batch_size=args.micro_batch_size,
        learning_rate=LEARNING_RATE,
        lr_scheduler_type="constant",
        max_steps=args.warmup_steps + args.steps,
        logging_steps=10_000,
        save_strategy="no",
        report_to="none",
        use_cpu=args.device == "cpu",
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
    )


def _run_trainer_variant(args, model, train, timer: PhaseTimer) -> dict:
    """Train the plain Trainer or the DP Trainer; return step ends, batch sizes and state bytes."""
    import tempfile

    from transformers import Trainer, TrainerCallback, TrainingArguments

    from hf_dp_microadam import DPMicroAdamTrainer, DPTrainingArguments

    step_ends: list[float] = []
    batch_sizes: list[int] = []

    class StepClock(TrainerCallback):
        def on_step_end(self, training_args, state, control, **kwargs):
            step_ends.append(time.perf_counter())
            if len(step_ends) == args.warmup_steps:
                timer.enabled = True

    private = args.worker.startswith("dp-trainer-")
    with tempfile.TemporaryDirectory(prefix="dp_speed_") as output_dir:
        if private:
            training_args = DPTrainingArguments(
                **_trainer_common(args, output_dir),
                logical_batch_size=args.logical_batch_size,
                noise_multiplier=NOISE_MULTIPLIER,
                per_sample_max_grad_norm=CLIPPING_NORM,
                dp_optimizer=args.worker.removeprefix("dp-trainer-"),
                dp_seed=0,
            )

            class MeasuredTrainer(DPMicroAdamTrainer):
                def training_step(self, model, inputs, num_items_in_batch=None):
                    batch_sizes.append(inputs.num_examples)
                    return super().training_step(model, inputs, num_items_in_batch)

                def create_optimizer(self, model=None):
                    optimizer = super().create_optimizer(model)
                    timer.wrap(optimizer, "clip_and_accumulate", "clip and accumulate")
                    timer.wrap(optimizer, "step", "optimizer.step (noise and update)")
                    return optimizer
        else:
            training_args = TrainingArguments(
                **_trainer_common(args, output_dir),
                gradient_accumulation_steps=args.logical_batch_size // args.micro_batch_size,
                optim="adamw_torch",
            )

            class MeasuredTrainer(Trainer):
                def training_step(self, model, inputs, num_items_in_batch=None):
                    batch_sizes.append(int(inputs["labels"].shape[0]))
                    return super().training_step(model, inputs, num_items_in_batch)

                def create_optimizer(self, model=None):
                    optimizer = super().create_optimizer(model)
                    timer.wrap(optimizer, "step", "optimizer.step (update)")
                    return optimizer

        trainer = MeasuredTrainer(model=model, args=training_args, train_dataset=train, data_collator=_collate,
                                  callbacks=[StepClock()])
        timer.wrap(trainer, "training_step", "training_step (forward, backward, per-example clipping)"
                   if private else "training_step (forward, backward)")
        trainer.train()
        state_bytes = _state_bytes(trainer.optimizer)

    if not private:
        # The plain Trainer calls training_step once per micro-batch; group them into steps.
        per_step = args.logical_batch_size // args.micro_batch_size
        batch_sizes = [sum(batch_sizes[i:i + per_step]) for i in range(0, len(batch_sizes), per_step)]
    return {"step_ends": step_ends, "batch_sizes": batch_sizes, "state_bytes": state_bytes}


def _run_opacus_variant(args, model, train, timer: PhaseTimer) -> dict:
    """Train with Opacus' PrivacyEngine and BatchMemoryManager, as the Opacus tutorials do."""
    import torch
    from opacus import PrivacyEngine
    from opacus.utils.batch_memory_manager import BatchMemoryManager

    data_loader = torch.utils.data.DataLoader(train, batch_size=args.logical_batch_size, collate_fn=_collate)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LEARNING_RATE)
    privacy_engine = PrivacyEngine(accountant="prv")
    model, optimizer, data_loader = privacy_engine.make_private(
        module=model,
        optimizer=optimizer,
        data_loader=data_loader,
        noise_multiplier=NOISE_MULTIPLIER,
        max_grad_norm=CLIPPING_NORM,
        poisson_sampling=True,
    )
    criterion = torch.nn.CrossEntropyLoss()
    timer.wrap(optimizer, "step", "optimizer.step (clip, noise and update)")
    model.train()
    step_ends: list[float] = []
    batch_sizes: list[int] = []
    examples_in_step = 0
    total_steps = args.warmup_steps + args.steps
    while len(step_ends) < total_steps:
        with BatchMemoryManager(data_loader=data_loader, max_physical_batch_size=args.micro_batch_size,
                                optimizer=optimizer) as memory_safe_loader:
            for batch in memory_safe_loader:
                labels = batch.pop("labels")
                optimizer.zero_grad()
                started = time.perf_counter()
                loss = criterion(model(**batch).logits, labels)
                loss.backward()
                if timer.enabled:
                    phase = "forward and backward (per-example gradients)"
                    timer.seconds[phase] = timer.seconds.get(phase, 0.0) + time.perf_counter() - started
                optimizer.step()
                examples_in_step += int(labels.shape[0])
                if not optimizer._is_last_step_skipped:
                    step_ends.append(time.perf_counter())
                    batch_sizes.append(examples_in_step)
                    examples_in_step = 0
                    if len(step_ends) == args.warmup_steps:
                        timer.enabled = True
                    if len(step_ends) == total_steps:
                        break
    return {"step_ends": step_ends, "batch_sizes": batch_sizes, "state_bytes": _state_bytes(optimizer)}


def run_worker(args) -> dict:
    import torch

    started = time.perf_counter()
    model, train = _prepare_model_and_data(args)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    rss_after_setup = _current_rss_mib()
    timer = PhaseTimer()
    if args.profile_worker:
        return _profile_worker(args, model, train)
    if args.worker == "opacus-adamw":
        measured = _run_opacus_variant(args, model, train, timer)
    else:
        measured = _run_trainer_variant(args, model, train, timer)

    step_ends, batch_sizes = measured["step_ends"], measured["batch_sizes"]
    timed_ends = step_ends[args.warmup_steps - 1:] if args.warmup_steps else [started, *step_ends]
    timed_sizes = batch_sizes[args.warmup_steps:]
    step_seconds = [end - begin for begin, end in zip(timed_ends, timed_ends[1:])]
    timed_seconds = timed_ends[-1] - timed_ends[0]
    return {
        "variant": args.worker,
        "threads": torch.get_num_threads(),
        "trainable_parameters": trainable,
        "timed_steps": len(step_seconds),
        "timed_examples": sum(timed_sizes),
        "timed_seconds": timed_seconds,
        "ms_per_example": 1000 * timed_seconds / max(1, sum(timed_sizes)),
        "median_step_seconds": statistics.median(step_seconds),
        "step_seconds": step_seconds,
        "batch_sizes": batch_sizes,
        "phase_seconds": timer.seconds,
        "rss_after_setup_mib": rss_after_setup,
        "peak_rss_mib": _peak_rss_mib(),
        "peak_rss_rise_mib": _peak_rss_mib() - rss_after_setup,
        "optimizer_state_bytes": measured["state_bytes"],
        "optimizer_state_bytes_per_parameter": measured["state_bytes"] / trainable,
    }


def _profile_worker(args, model, train) -> dict:
    """Record the operators with the largest self CPU time over the timed steps of one variant."""
    from torch.profiler import ProfilerActivity, profile

    timer = PhaseTimer()
    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        if args.worker == "opacus-adamw":
            _run_opacus_variant(args, model, train, timer)
        else:
            _run_trainer_variant(args, model, train, timer)
    table = profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=60)
    return {"variant": args.worker, "profile_table": table}


def measure_full_model_state() -> list[dict]:
    """Return the optimizer state bytes per parameter of MicroAdam and AdamW on full models."""
    import torch
    from transformers import ViTConfig, ViTForImageClassification

    from hf_dp_microadam.assets import load_model
    from hf_dp_microadam.optim import MicroAdam

    models = {
        "all-minilm-l6-v2 (full)": lambda: load_model(MODEL_NAME, "sequence-classification", num_labels=2)[0],
        "dinov2-small-imgfocus (full)": lambda: load_model("dinov2-small-imgfocus", "image-classification",
                                                           num_labels=10)[0],
        "ViT from scratch of dp_accuracy (139k)": lambda: ViTForImageClassification(ViTConfig(
            image_size=28, patch_size=4, num_channels=1, hidden_size=64, num_hidden_layers=4,
            num_attention_heads=4, intermediate_size=128, num_labels=10)),
    }
    rows = []
    for name, build in models.items():
        model = build()
        parameters = [p for p in model.parameters()]
        count = sum(p.numel() for p in parameters)
        for p in parameters:
            p.grad = torch.randn_like(p)
        row = {"model": name, "parameters": count, "tensors": len(parameters)}
        for label, optimizer in (("MicroAdam", MicroAdam(parameters, lr=1e-3)),
                                 ("AdamW", torch.optim.AdamW(parameters, lr=1e-3))):
            optimizer.step()
            row[f"{label}_bytes_per_parameter"] = _state_bytes(optimizer) / count
            del optimizer
        rows.append(row)
        del model, parameters
    return rows


# ---- Driver side ----


def launch_worker(args, variant: str, result_path: Path, profile: bool = False) -> dict:
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", variant, "--result", str(result_path),
               "--device", args.device, "--steps", str(args.steps), "--warmup-steps", str(args.warmup_steps),
               "--logical-batch-size", str(args.logical_batch_size), "--micro-batch-size",
               str(args.micro_batch_size), "--sequence-length", str(args.sequence_length), "--threads",
               str(args.threads), "--code-revision", args.code_revision]
    if profile:
        command.append("--profile-worker")
    environment = dp_runs._child_environment(args.threads, args.code_revision)
    load_before = dp_runs.load_average()
    started = time.perf_counter()
    completed = subprocess.run(command, env=environment, cwd=dp_runs.REPO_ROOT, capture_output=True, text=True)
    if completed.returncode != 0:
        return {"variant": variant, "failed": True, "returncode": completed.returncode,
                "stderr_tail": completed.stderr[-3000:]}
    result = json.loads(result_path.read_text())
    result.update(load_average_before=load_before, load_average_after=dp_runs.load_average(),
                  subprocess_wall_seconds=round(time.perf_counter() - started, 1))
    return result


def summarize_variants(runs: list[dict]) -> dict:
    """Return the fastest repeat of every variant, with the repeat times."""
    best = {}
    for run in runs:
        if run.get("failed"):
            best.setdefault(run["variant"], run)
            continue
        current = best.get(run["variant"])
        if current is None or current.get("failed") or run["ms_per_example"] < current["ms_per_example"]:
            best[run["variant"]] = run
    for variant, run in best.items():
        run["ms_per_example_all_repeats"] = [r["ms_per_example"] for r in runs
                                             if r["variant"] == variant and not r.get("failed")]
    return best


def ratios(best: dict) -> dict:
    def ratio(numerator: str, denominator: str):
        a, b = best.get(numerator), best.get(denominator)
        if not a or not b or a.get("failed") or b.get("failed"):
            return None
        return a["ms_per_example"] / b["ms_per_example"]

    return {
        "dp-microadam / non-private Trainer": ratio("dp-trainer-dp-microadam", "trainer-adamw"),
        "dp-adam / non-private Trainer": ratio("dp-trainer-dp-adam", "trainer-adamw"),
        "dp-microadam / Opacus loop": ratio("dp-trainer-dp-microadam", "opacus-adamw"),
        "dp-adam / Opacus loop": ratio("dp-trainer-dp-adam", "opacus-adamw"),
        "Opacus loop / non-private Trainer": ratio("opacus-adamw", "trainer-adamw"),
    }


def print_tables(best: dict, ratio_values: dict, full_state: list[dict]) -> None:
    print(f"\n{'variant':<26} {'ms/example':>11} {'median step s':>14} {'peak RSS MiB':>13} {'rise MiB':>9} "
          f"{'state B/param':>14}")
    for variant, run in best.items():
        if run.get("failed"):
            print(f"{variant:<26} failed (exit code {run['returncode']})")
            continue
        print(f"{variant:<26} {run['ms_per_example']:>11.1f} {run['median_step_seconds']:>14.2f} "
              f"{run['peak_rss_mib']:>13.0f} {run['peak_rss_rise_mib']:>9.0f} "
              f"{run['optimizer_state_bytes_per_parameter']:>14.3f}")
    print("\nratios of time per example (target):")
    targets = {"dp-microadam / non-private Trainer": TARGET_RATIO_TO_NON_PRIVATE,
               "dp-microadam / Opacus loop": TARGET_RATIO_TO_OPACUS}
    for name, value in ratio_values.items():
        target = targets.get(name)
        text = "n/a" if value is None else f"{value:.2f}"
        suffix = ""
        if target is not None and value is not None:
            suffix = f"  (target <= {target}: {'met' if value <= target else 'missed'})"
        print(f"  {name:<36} {text}{suffix}")
    if full_state:
        print("\noptimizer state on the full models, bytes per parameter:")
        for row in full_state:
            print(f"  {row['model']:<40} {row['parameters']:>11,} params  MicroAdam "
                  f"{row['MicroAdam_bytes_per_parameter']:.3f}  AdamW {row['AdamW_bytes_per_parameter']:.3f}")


def estimate_seconds(args) -> float:
    # One thread of the shared 2-core AMD EPYC: about 40 ms per example and step for
    # MiniLM LoRA at 64 tokens, plus 40 s to load the model and data per subprocess.
    examples = (args.warmup_steps + args.steps) * args.logical_batch_size
    per_run = 40.0 + examples * 0.04 * args.sequence_length / 64
    runs = len(args.variants) * args.repeats + (len(PROFILED_VARIANTS) if args.profile else 0)
    return runs * per_run + (0 if args.skip_full_model_state else 60)


def main(argv=None) -> int:
    args = parse_arguments(argv)
    if args.worker is not None:
        result = run_worker(args)
        args.result.write_text(json.dumps(result, indent=2) + "\n")
        return 0

    print(f"{len(args.variants)} variants x {args.repeats} repeats, one subprocess each, "
          f"{args.warmup_steps}+{args.steps} steps of {args.logical_batch_size} examples: estimated "
          f"{estimate_seconds(args) / 60:.0f} min on --device {args.device} (rate measured on one thread of a "
          "shared 2-core AMD EPYC; a faster or idle machine takes less)", flush=True)
    if not args.yes:
        time.sleep(10)
    started = time.perf_counter()
    load_start = dp_runs.load_average()
    work_dir = dp_runs.REPO_ROOT / "outputs" / "benchmarks" / "speed"
    work_dir.mkdir(parents=True, exist_ok=True)

    runs = []
    for repeat in range(args.repeats):
        for variant in args.variants:
            result = launch_worker(args, variant, work_dir / f"{variant}_{repeat}.json")
            result["repeat"] = repeat
            runs.append(result)
            if result.get("failed"):
                print(f"{variant} repeat {repeat}: FAILED\n{result['stderr_tail']}", flush=True)
            else:
                print(f"{variant} repeat {repeat}: {result['ms_per_example']:.1f} ms/example, peak RSS "
                      f"{result['peak_rss_mib']:.0f} MiB, load {result['load_average_after']}", flush=True)
    best = summarize_variants(runs)
    ratio_values = ratios(best)

    profiles = {}
    if args.profile:
        for variant in PROFILED_VARIANTS:
            if variant in args.variants:
                result = launch_worker(args, variant, work_dir / f"{variant}_profile.json", profile=True)
                profiles[variant] = result.get("profile_table") or result
                print(f"\nprofile of {variant}:\n{profiles[variant] if isinstance(profiles[variant], str) else ''}")

    full_state = []
    if not args.skip_full_model_state:
        completed = subprocess.run(
            [sys.executable, "-c", "import json, sys; sys.path.insert(0, 'benchmarks'); "
             "import dp_speed_memory as b; print(json.dumps(b.measure_full_model_state()))"],
            env=dp_runs._child_environment(args.threads, args.code_revision), cwd=dp_runs.REPO_ROOT,
            capture_output=True, text=True)
        if completed.returncode == 0:
            full_state = json.loads(completed.stdout.strip().splitlines()[-1])
        else:
            print(f"full-model state measurement failed:\n{completed.stderr[-2000:]}")

    print_tables(best, ratio_values, full_state)
    report = {
        "benchmark": "DP Trainer speed, memory and optimizer state against the plain Trainer and Opacus",
        "settings": {key: getattr(args, key) for key in ("steps", "warmup_steps", "logical_batch_size",
                                                          "micro_batch_size", "sequence_length", "repeats",
                                                          "threads", "code_revision")},
        "model": f"{MODEL_NAME} + LoRA r=8 (query, value) + classification head",
        "noise_multiplier": NOISE_MULTIPLIER,
        "clipping_norm": CLIPPING_NORM,
        "targets": {"dp_over_non_private": TARGET_RATIO_TO_NON_PRIVATE, "dp_over_opacus": TARGET_RATIO_TO_OPACUS,
                    "state_bytes_per_parameter": TARGET_STATE_BYTES_PER_PARAMETER},
        "load_average_start": load_start,
        "load_average_end": dp_runs.load_average(),
        "best_repeat_per_variant": best,
        "ratios": ratio_values,
        "all_runs": runs,
        "full_model_optimizer_state": full_state,
        "profiles": profiles,
    }
    report.update(dp_runs.report_header(["benchmarks/dp_speed_memory.py", *(sys.argv[1:] if argv is None
                                                                               else argv)], args.device, started))
    dp_runs.write_report(args.output, report)
    print(f"\nwrote {args.output}\nwall time {time.perf_counter() - started:.0f} s")
    return 1 if any(run.get("failed") for run in runs) else 0


if __name__ == "__main__":
    sys.exit(main())
