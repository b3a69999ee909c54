"""Optimizer step time and state memory of MicroAdam and the baselines, side by side.

Three stacks of parameter tensors, each measured on its own:

- ``transformer-20m``: about 20M parameters in the shapes of a small transformer (four
  4096 x 1024 matrices, two 1024 x 1024, one 1000 x 1024 embedding and 16 vectors of
  1024), with every optimizer below;
- ``bert-base``: the 199 tensors of BERT-base (110M parameters), AdamW and MicroAdam
  only;
- ``bert-base-small``: the 124 tensors of BERT-base with at most 32768 entries (biases,
  norm weights, token-type embeddings; 124K parameters), AdamW and MicroAdam only. Its
  step time is mostly the per-tensor cost.

The steps of the optimizers are interleaved, round after round, so a change in machine
load hits all of them alike. Reported per optimizer: bytes of optimizer state per
parameter, the median and minimum wall time of one step, and the median CPU time of one
step (process time, summed over threads). MicroAdam's scratch memory (buffers and index
maps shared by all tensors, not part of the state, see `MicroAdam.workspace_bytes`) is
reported per parameter in a column of its own.

DPMicroAdam additionally clips, noises and normalizes per-example gradients of a batch
of `--batch-size` examples (`p.grad_sample`), so its row includes the privatizer.

Usage:
    python benchmarks/optimizer_step.py                  # CPU, float32, 1 and all threads
    python benchmarks/optimizer_step.py --device cuda    # float32 and bfloat16
    python benchmarks/optimizer_step.py --profile        # also time MicroAdam's stages

The table goes to stdout and the numbers to
`benchmarks/results/optimizer_step_<device>.json` (see `--output`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

from hf_dp_microadam.optim import MicroAdam

RESULTS_DIR = Path(__file__).resolve().parent / "results"
SHAPES = [(4096, 1024)] * 4 + [(1024, 1024)] * 2 + [(1000, 1024)] + [(1024,)] * 16
STAGE_PREFIX = "microadam::"


def bert_base_shapes(layers: int = 12, hidden: int = 768, intermediate: int = 3072) -> list[tuple[int, ...]]:
    """Return the parameter shapes of BERT-base: embeddings, encoder layers and pooler."""
    shapes = [(30522, hidden), (512, hidden), (2, hidden), (hidden,), (hidden,)]
    for _ in range(layers):
        shapes += [(hidden, hidden), (hidden,)] * 4  # query, key, value, attention output
        shapes += [(hidden,), (hidden,)]  # attention LayerNorm
        shapes += [(intermediate, hidden), (intermediate,), (hidden, intermediate), (hidden,)]
        shapes += [(hidden,), (hidden,)]  # output LayerNorm
    return shapes + [(hidden, hidden), (hidden,)]


BERT_BASE_SHAPES = bert_base_shapes()
STACKS = {
    "transformer-20m": SHAPES,
    "bert-base": BERT_BASE_SHAPES,
    "bert-base-small": [shape for shape in BERT_BASE_SHAPES if torch.Size(shape).numel() <= 32768],
}
FULL_ROWS_STACK = "transformer-20m"
"""The stack measured with every optimizer and profiled. The others compare AdamW and MicroAdam."""


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="torch device to run on (default: cpu)")
    parser.add_argument(
        "--dtypes",
        default=None,
        help="comma-separated parameter dtypes (default: float32 on CPU, float32,bfloat16 elsewhere)",
    )
    parser.add_argument("--steps", type=int, default=15, help="timed steps per optimizer (default: 15)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per optimizer first (default: 3)")
    parser.add_argument(
        "--batch-size", type=int, default=4, help="examples in DPMicroAdam's per-example gradients (default: 4)"
    )
    parser.add_argument(
        "--threads",
        default=None,
        help="comma-separated torch intra-op thread counts, each measured in turn (default: 1 and torch's default)",
    )
    parser.add_argument(
        "--stacks",
        default=",".join(STACKS),
        help=f"comma-separated parameter stacks to measure (default: {','.join(STACKS)})",
    )
    parser.add_argument("--profile", action="store_true", help="also time MicroAdam's stages with torch.profiler")
    parser.add_argument(
        "--output", type=Path, default=None, help="JSON path (default: benchmarks/results/optimizer_step_<device>.json)"
    )
    return parser.parse_args(argv)


def make_parameters(device: torch.device, dtype: torch.dtype, seed: int = 0, shapes=None) -> tuple[list, list]:
    """Return parameters and fixed gradients of a stack (default: `SHAPES`)."""
    generator = torch.Generator().manual_seed(seed)
    params, grads = [], []
    for shape in SHAPES if shapes is None else shapes:
        params.append(torch.nn.Parameter(torch.randn(shape, generator=generator).to(device=device, dtype=dtype)))
        grads.append(torch.randn(shape, generator=generator).mul_(1e-2).to(device=device, dtype=dtype))
    return params, grads


def state_tensors(optimizer) -> list[torch.Tensor]:
    """Return every tensor in the optimizer state, looking through a privatizer's update rule."""
    inner = getattr(optimizer, "original_optimizer", None)
    state = inner.state if inner is not None else optimizer.state
    return [value for per_param in state.values() for value in per_param.values() if isinstance(value, torch.Tensor)]


def workspace_bytes(optimizer) -> int:
    """Return the scratch memory of a MicroAdam update rule, or 0 for other optimizers."""
    inner = getattr(optimizer, "original_optimizer", optimizer)
    return inner.workspace_bytes() if isinstance(inner, MicroAdam) else 0


def build_rows(params, grads, batch_size: int, all_optimizers: bool = True):
    """Return (name, optimizer, prepare) triples. `prepare` sets the gradients before a step.

    A row whose optimizer cannot be built has None as optimizer and the reason as `prepare`.
    Without `all_optimizers`, only AdamW and MicroAdam are built.
    """

    def set_grads():
        for param, grad in zip(params, grads):
            param.grad = grad

    if not all_optimizers:
        return [
            ("AdamW (foreach)", torch.optim.AdamW(params, lr=1e-4, foreach=True), set_grads),
            ("MicroAdam", MicroAdam(params, lr=1e-4), set_grads),
        ]
    rows = [
        ("AdamW (foreach)", torch.optim.AdamW(params, lr=1e-4, foreach=True), set_grads),
        ("Adam", torch.optim.Adam(params, lr=1e-4), set_grads),
        ("SGD", torch.optim.SGD(params, lr=1e-4), set_grads),
        ("MicroAdam", MicroAdam(params, lr=1e-4), set_grads),
    ]
    try:
        from hf_dp_microadam.privacy.dp_optimizer import DPMicroAdam
    except ImportError as error:
        rows.append(("DPMicroAdam", None, f"unavailable: cannot import DPMicroAdam ({error})"))
        return rows

    # Per-example gradients of `batch_size` examples: the same gradient, scaled per example.
    scales = torch.linspace(0.5, 1.5, batch_size, device=params[0].device, dtype=params[0].dtype)
    samples = [scales.view(-1, *([1] * grad.dim())) * grad for grad in grads]

    def set_grad_samples():
        for param, sample in zip(params, samples):
            param.grad = None
            param.grad_sample = sample

    optimizer = DPMicroAdam(
        params, noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=batch_size, noise_seed=0, lr=1e-4
    )
    rows.append((f"DPMicroAdam (batch {batch_size})", optimizer, set_grad_samples))
    return rows


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_rows(rows, device, steps: int, warmup: int) -> dict[str, dict[str, list[float]]]:
    """Step every optimizer `warmup` times, then `steps` interleaved timed rounds.

    Returns wall and CPU seconds (process time, summed over threads) per step and
    optimizer. On a machine shared with other work, the wall time of long steps grows
    with the load much more than the CPU time of a one-thread run does.
    """
    timings: dict[str, dict[str, list[float]]] = defaultdict(lambda: {"wall": [], "cpu": []})
    runnable = [(name, optimizer, prepare) for name, optimizer, prepare in rows if optimizer is not None]
    for round_index in range(warmup + steps):
        for name, optimizer, prepare in runnable:
            prepare()
            synchronize(device)
            wall_start, cpu_start = time.perf_counter(), time.process_time()
            optimizer.step()
            synchronize(device)
            if round_index >= warmup:
                timings[name]["wall"].append(time.perf_counter() - wall_start)
                timings[name]["cpu"].append(time.process_time() - cpu_start)
    return timings


def profile_microadam(params, grads, device, steps: int) -> dict[str, float]:
    """Return the mean milliseconds per step of each labelled MicroAdam stage."""
    optimizer = MicroAdam(params, lr=1e-4)
    for param, grad in zip(params, grads):
        param.grad = grad
    optimizer.step()
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as profiler:
        start = time.perf_counter()
        for _ in range(steps):
            optimizer.step()
        synchronize(device)
        total = time.perf_counter() - start
    stages: dict[str, float] = defaultdict(float)
    for event in profiler.key_averages():
        if event.key.startswith(STAGE_PREFIX):
            # On CUDA the stage cost is the device time, on CPU the host time.
            microseconds = event.device_time_total if device.type == "cuda" else event.cpu_time_total
            stages[event.key[len(STAGE_PREFIX) :]] += microseconds / 1e3 / steps
    stages["whole step (under the profiler)"] = total * 1e3 / steps
    return dict(stages)


def run(args) -> dict:
    device = torch.device(args.device)
    dtype_names = [name.strip() for name in (args.dtypes or default_dtypes(device)).split(",")]
    thread_counts = [int(count) for count in (args.threads or default_threads()).split(",")]
    stack_names = [name.strip() for name in args.stacks.split(",")]
    unknown = [name for name in stack_names if name not in STACKS]
    if unknown:
        raise SystemExit(f"--stacks: unknown stack {', '.join(unknown)}; choose from {', '.join(STACKS)}")
    report = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_version": torch.__version__,
        "parameters": sum(torch.Size(shape).numel() for shape in SHAPES),
        "tensors": len(SHAPES),
        "stacks": {
            name: {"parameters": sum(torch.Size(shape).numel() for shape in STACKS[name]), "tensors": len(STACKS[name])}
            for name in stack_names
        },
        "steps": args.steps,
        "warmup": args.warmup,
        "load_average_before": os.getloadavg(),
        "results": [],
        "microadam_stages_ms": {},
    }
    for threads in thread_counts:
        torch.set_num_threads(threads)
        for dtype_name in dtype_names:
            setting = f"{dtype_name}, {threads} thread{'s' if threads > 1 else ''}"
            for stack in stack_names:
                report["results"].extend(measure_setting(args, device, dtype_name, threads, stack))
            if args.profile and FULL_ROWS_STACK in stack_names:
                params, grads = make_parameters(device, getattr(torch, dtype_name))
                report["microadam_stages_ms"][setting] = profile_microadam(params, grads, device, args.steps)
    report["load_average_after"] = os.getloadavg()
    return report


def cpu_model() -> str:
    """Return the CPU model name from /proc/cpuinfo, or the machine type where that is missing."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def default_dtypes(device: torch.device) -> str:
    return "float32" if device.type == "cpu" else "float32,bfloat16"


def default_threads() -> str:
    """Return "1" and torch's default thread count, so both appear in one run."""
    threads = torch.get_num_threads()
    return "1" if threads == 1 else f"1,{threads}"


def measure_setting(args, device: torch.device, dtype_name: str, threads: int, stack: str) -> list[dict]:
    """Time the optimizers of one stack for one dtype and thread count, and return one entry per optimizer."""
    shapes = STACKS[stack]
    parameters = sum(torch.Size(shape).numel() for shape in shapes)
    params, grads = make_parameters(device, getattr(torch, dtype_name), shapes=shapes)
    rows = build_rows(params, grads, args.batch_size, all_optimizers=stack == FULL_ROWS_STACK)
    timings = time_rows(rows, device, args.steps, args.warmup)
    baseline = {kind: statistics.median(timings["AdamW (foreach)"][kind]) for kind in ("wall", "cpu")}
    entries = []
    for name, optimizer, prepare in rows:
        entry = {"optimizer": name, "stack": stack, "dtype": dtype_name, "threads": threads}
        if optimizer is None:
            entry["note"] = prepare
        else:
            state_bytes = sum(t.numel() * t.element_size() for t in state_tensors(optimizer))
            wall, cpu = statistics.median(timings[name]["wall"]), statistics.median(timings[name]["cpu"])
            entry.update(
                state_bytes_per_param=state_bytes / parameters,
                workspace_bytes_per_param=workspace_bytes(optimizer) / parameters,
                median_step_ms=wall * 1e3,
                min_step_ms=min(timings[name]["wall"]) * 1e3,
                median_cpu_ms=cpu * 1e3,
                ratio_to_adamw=wall / baseline["wall"],
                cpu_ratio_to_adamw=cpu / baseline["cpu"],
            )
        entries.append(entry)
    return entries


def print_report(report: dict) -> None:
    print(
        f"{report['device']} ({report['device_name']}, {report['cpu_count']} CPUs), torch {report['torch_version']}, "
        f"median of {report['steps']} steps"
    )
    for name, stack in report["stacks"].items():
        print(f"  {name}: {stack['parameters'] / 1e6:.2f}M parameters in {stack['tensors']} tensors")
    before = ", ".join(f"{load:.1f}" for load in report["load_average_before"])
    after = ", ".join(f"{load:.1f}" for load in report["load_average_after"])
    print(f"load average (1, 5, 15 min) before: {before}, after: {after}")
    header = (
        f"{'stack':<17}{'optimizer':<24}{'dtype':<10}{'threads':>8}{'state B/param':>14}{'scratch B/param':>16}"
        f"{'median ms':>11}{'min ms':>9}{'x AdamW':>9}{'CPU ms':>9}{'CPU x AdamW':>13}"
    )
    print(header)
    print("-" * len(header))
    for entry in report["results"]:
        prefix = f"{entry['stack']:<17}{entry['optimizer']:<24}{entry['dtype']:<10}{entry['threads']:>8}"
        if "note" in entry:
            print(f"{prefix}  {entry['note']}")
            continue
        print(
            f"{prefix}{entry['state_bytes_per_param']:>14.4f}{entry['workspace_bytes_per_param']:>16.4f}"
            f"{entry['median_step_ms']:>11.1f}{entry['min_step_ms']:>9.1f}{entry['ratio_to_adamw']:>9.2f}"
            f"{entry['median_cpu_ms']:>9.1f}{entry['cpu_ratio_to_adamw']:>13.2f}"
        )
    for setting, stages in report["microadam_stages_ms"].items():
        print(f"\nMicroAdam stages, {FULL_ROWS_STACK}, {setting} (ms per step, torch.profiler labels):")
        for stage, milliseconds in stages.items():
            print(f"  {stage:<34}{milliseconds:8.1f}")


def main(argv=None) -> None:
    args = parse_args(argv)
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        sys.exit(f"--device {args.device}: CUDA is not available in this torch build or machine. Use --device cpu.")
    report = run(args)
    print_report(report)
    output = args.output or RESULTS_DIR / f"optimizer_step_{torch.device(args.device).type}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {output}")


if __name__ == "__main__":
    main()
