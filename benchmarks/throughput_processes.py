"""Benchmark DPMicroAdamTrainer's training throughput on one process and on two processes of this machine.

Model: the packaged offline `all-minilm-l6-v2` (BERT, 6 layers, hidden size 384) with a
sequence-classification head, trained with LoRA (r=8 on query and value) plus the head.
Data: the training split of the packaged Rotten Tomatoes (10,202 sentences), truncated to
128 tokens and padded per micro-batch. All runs use the same DP settings and the same
`dp_seed`, so they train on the same Poisson logical batches. The two-process run splits
each logical batch between its processes.

Each run is a separate launch of this script: `python` for one process, and
`accelerate launch --config_file configs/accelerate/multi_cpu.yaml` for two (gloo on
127.0.0.1). Three runs: one process with one torch thread, one process with one thread
per CPU core, and two processes sharing the cores (one thread each on two cores). On a
loaded machine a multi-threaded process waits for its descheduled threads, so the
one-thread row is the steadier baseline. Throughput is the number of examples in the
timed logical batches divided by the wall time of those steps, measured on rank 0 from
the end of the warm-up steps to the end of the last step. The processes' steps end
together, because the clipped sums are all-reduced at every step.

Usage:
    python benchmarks/throughput_processes.py
    python benchmarks/throughput_processes.py --steps 30 --logical-batch-size 128

The table goes to stdout and the JSON to benchmarks/results/throughput_processes.json,
with the machine and its load average before and after each run: on a shared machine
the load changes the numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"
MULTI_CPU_CONFIG = REPO_ROOT / "configs" / "accelerate" / "multi_cpu.yaml"
MODEL_NAME = "all-minilm-l6-v2"
DATASET_NAME = "rotten-tomatoes"
MAX_SEQ_LENGTH = 128


def run_layouts() -> list[tuple[int, int]]:
    """Return the (processes, threads per process) of the runs, without repeats."""
    cores = os.cpu_count() or 1
    layouts = [(1, 1), (1, cores), (2, max(1, cores // 2))]
    return list(dict.fromkeys(layouts))


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12, help="logical steps per run, warm-up included")
    parser.add_argument("--warmup-steps", type=int, default=2, help="first steps left out of the timing")
    parser.add_argument("--logical-batch-size", type=int, default=64, help="expected Poisson batch size B")
    parser.add_argument("--micro-batch-size", type=int, default=16, help="examples per forward/backward pass")
    parser.add_argument("--output", type=Path, default=RESULTS_DIR / "throughput_processes.json",
                        help="JSON file for the results")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds before a launch is stopped")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not 0 <= args.warmup_steps < args.steps:
        parser.error(f"--warmup-steps must be in [0, --steps), got {args.warmup_steps} with --steps {args.steps}")
    return args


# ---- Worker: one training run, on each of its processes ----


def run_worker(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)

    import torch.distributed as dist
    from peft import LoraConfig, get_peft_model
    from transformers import DataCollatorWithPadding, TrainerCallback

    from hf_dp_microadam import DPMicroAdamTrainer, DPTrainingArguments
    from hf_dp_microadam.assets import load_dataset_dict, load_model

    model, tokenizer = load_model(MODEL_NAME, "sequence-classification", num_labels=2)
    model = get_peft_model(
        model, LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"], task_type="SEQ_CLS")
    )
    model.train()  # from_pretrained returns the model in eval mode
    train = load_dataset_dict(DATASET_NAME)["train"]
    train = train.map(
        lambda batch: tokenizer(batch["text"], truncation=True, max_length=MAX_SEQ_LENGTH),
        batched=True,
        remove_columns=["text"],
    )

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.step_ends: list[float] = []

        def on_step_end(self, training_args, state, control, **kwargs):
            self.step_ends.append(time.perf_counter())

    class CountingTrainer(DPMicroAdamTrainer):
        """Record the size of this process's share of each logical batch."""

        def __init__(self, *positional, **keywords):
            super().__init__(*positional, **keywords)
            self.share_sizes: list[int] = []

        def training_step(self, model, inputs, num_items_in_batch=None):
            self.share_sizes.append(inputs.num_examples)
            return super().training_step(model, inputs, num_items_in_batch)

    output_dir = args.result.parent / f"run_{args.result.stem}"
    trainer = CountingTrainer(
        model=model,
        args=DPTrainingArguments(
            output_dir=str(output_dir),
            logical_batch_size=args.logical_batch_size,
            per_device_train_batch_size=args.micro_batch_size,
            noise_multiplier=1.0,
            learning_rate=1e-3,
            max_steps=args.steps,
            logging_steps=args.steps,
            save_strategy="no",
            report_to="none",
            dp_seed=0,
            seed=0,
            use_cpu=True,
            disable_tqdm=True,
        ),
        train_dataset=train,
        data_collator=DataCollatorWithPadding(tokenizer),
    )
    timer = StepTimer()
    trainer.add_callback(timer)
    start = time.perf_counter()
    trainer.train()
    train_seconds = time.perf_counter() - start

    # Sizes of the whole logical batches: the sum of the shares over the processes.
    sizes = torch.tensor(trainer.share_sizes, dtype=torch.int64)
    if dist.is_initialized():
        dist.all_reduce(sizes)
    engine = trainer.dp_engine
    # Destroys the process group, so that the processes exit cleanly.
    trainer.end()
    if engine.rank != 0:
        return

    timed_examples = int(sizes[args.warmup_steps:].sum())
    timed_start = timer.step_ends[args.warmup_steps - 1] if args.warmup_steps > 0 else start
    timed_seconds = timer.step_ends[-1] - timed_start
    timed_step_seconds = sorted(
        later - earlier for earlier, later in zip(timer.step_ends[args.warmup_steps:], timer.step_ends[args.warmup_steps + 1:])
    )
    result = {
        "processes": engine.world_size,
        "threads_per_process": torch.get_num_threads(),
        "distributed_type": str(trainer.accelerator.distributed_type),
        "steps": args.steps,
        "warmup_steps": args.warmup_steps,
        "timed_examples": timed_examples,
        "timed_seconds": timed_seconds,
        "examples_per_second": timed_examples / timed_seconds,
        "median_step_seconds": timed_step_seconds[len(timed_step_seconds) // 2] if timed_step_seconds else None,
        "train_seconds": train_seconds,
        "logical_batch_sizes": sizes.tolist(),
        "epsilon": trainer.privacy_report().epsilon,
    }
    args.result.write_text(json.dumps(result, indent=2))


# ---- Driver: one launch per process count ----


def launch(args: argparse.Namespace, processes: int, threads: int, result_path: Path) -> dict:
    worker_args = [
        str(Path(__file__).resolve()),
        "--worker",
        "--threads", str(threads),
        "--result", str(result_path),
        "--steps", str(args.steps),
        "--warmup-steps", str(args.warmup_steps),
        "--logical-batch-size", str(args.logical_batch_size),
        "--micro-batch-size", str(args.micro_batch_size),
    ]
    if processes == 1:
        command = [sys.executable] + worker_args
    else:
        command = [
            sys.executable, "-m", "accelerate.commands.launch",
            "--config_file", str(MULTI_CPU_CONFIG),
            "--num_processes", str(processes),
            "--num_cpu_threads_per_process", str(threads),
        ] + worker_args
    env = dict(os.environ)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("HF_DATASETS_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    env.setdefault("HF_HOME", str(REPO_ROOT / ".hf_home"))
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env["OMP_NUM_THREADS"] = str(threads)

    load_before = os.getloadavg()
    start = time.perf_counter()
    completed = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                               timeout=args.timeout)
    wall_seconds = time.perf_counter() - start
    if completed.returncode != 0:
        sys.stderr.write((completed.stdout + completed.stderr)[-8000:])
        raise SystemExit(f"the {processes}-process run failed with exit code {completed.returncode}")
    result = json.loads(result_path.read_text())
    result["launch_wall_seconds"] = wall_seconds
    result["load_average_before"] = list(load_before)
    result["load_average_after"] = list(os.getloadavg())
    launcher = ["python"] + command[1 : command.index(worker_args[0])]
    result["launcher"] = " ".join(launcher).replace(f"{REPO_ROOT}{os.sep}", "")
    return result


def machine_description() -> dict:
    import torch

    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }


def print_table(runs: list[dict]) -> None:
    header = (
        f"{'processes':>9} {'threads/proc':>12} {'examples':>8} {'seconds':>8} {'examples/s':>10} "
        f"{'vs row 1':>8} {'load before':>11}"
    )
    print(header)
    print("-" * len(header))
    baseline = runs[0]["examples_per_second"]
    for run in runs:
        print(
            f"{run['processes']:>9} {run['threads_per_process']:>12} {run['timed_examples']:>8} "
            f"{run['timed_seconds']:>8.1f} {run['examples_per_second']:>10.2f} "
            f"{run['examples_per_second'] / baseline:>8.2f} {run['load_average_before'][0]:>11.2f}"
        )


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        run_worker(args)
        return

    import tempfile

    runs = []
    with tempfile.TemporaryDirectory() as scratch:
        for processes, threads in run_layouts():
            result_path = Path(scratch) / f"processes_{processes}_threads_{threads}.json"
            runs.append(launch(args, processes, threads, result_path))
    if any(run["logical_batch_sizes"] != runs[0]["logical_batch_sizes"] for run in runs):
        raise SystemExit("the runs drew different logical batches; the comparison would not be fair")

    print_table(runs)
    report = {
        "benchmark": "DPMicroAdamTrainer throughput, 1 vs 2 processes",
        "model": f"{MODEL_NAME} + LoRA r=8 (query, value) + classification head",
        "dataset": f"{DATASET_NAME} train, max {MAX_SEQ_LENGTH} tokens",
        "settings": {
            "steps": args.steps,
            "warmup_steps": args.warmup_steps,
            "logical_batch_size": args.logical_batch_size,
            "micro_batch_size": args.micro_batch_size,
            "dp_optimizer": "dp-microadam",
            "noise_multiplier": 1.0,
        },
        "machine": machine_description(),
        "runs": runs,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
