"""Benchmark per-example gradients against a non-private forward/backward on the same batches.

Model: a random BertForSequenceClassification with 4 layers, hidden size 256, 4 heads,
intermediate size 1024 and the BERT vocabulary (30522 tokens), in float32. Modes: LoRA
(r=8 on query and value, classifier trained through modules_to_save) and full fine-tuning.

For each mode, one logical batch is split into micro-batches, and two paths run over it:

- non-private: the transformers loss (batch mean) and one backward per micro-batch,
  gradients accumulated in `p.grad`.
- per-example: `compute_per_example_losses`, `losses.sum().backward()` with
  `PerExampleGradients` attached, which fills `p.grad_sample` of shape [micro-batch, *shape].
  The per-example gradients are then cleared, as the DP optimizer does after clipping.

Each path runs in a fresh process, so that its memory is measured alone. Reported per
logical batch: the median wall time over the repeats (after one warm-up batch), and the peak
memory. On CUDA it is `torch.cuda.max_memory_allocated` minus the memory allocated before
the first batch. On CPU it is the process's peak resident set size (Linux `ru_maxrss`)
minus its resident size before the first batch, which also counts allocator caching.
Clipping and noise are not included.

Usage:
    python benchmarks/per_example.py --device cpu
    python benchmarks/per_example.py --device cuda --batch-size 64 --micro-batch-size 16
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"
MODES = ("lora", "full")
PATHS = ("non_private", "per_example")

BERT_SETTINGS = dict(
    vocab_size=30522,
    hidden_size=256,
    num_hidden_layers=4,
    num_attention_heads=4,
    intermediate_size=1024,
    max_position_embeddings=512,
    num_labels=2,
)


def _resident_bytes() -> int | None:
    """Return the current resident set size from /proc (Linux), or None elsewhere."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return None


def _peak_resident_bytes() -> int:
    # ru_maxrss is in KiB on Linux.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _build_model(mode: str, device):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(**BERT_SETTINGS))
    if mode == "lora":
        config = LoraConfig(task_type="SEQ_CLS", r=8, lora_alpha=16, target_modules=["query", "value"])
        model = get_peft_model(model, config)
    return model.to(device).train()


def _make_micro_batches(batch_size: int, micro_batch_size: int, sequence_length: int, device) -> list[dict]:
    import torch

    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(1000, BERT_SETTINGS["vocab_size"], (batch_size, sequence_length), generator=generator)
    lengths = torch.randint(sequence_length // 2, sequence_length + 1, (batch_size,), generator=generator)
    attention_mask = (torch.arange(sequence_length) < lengths[:, None]).long()
    input_ids = input_ids.masked_fill(attention_mask == 0, 0)
    labels = torch.randint(0, 2, (batch_size,), generator=generator)
    micro_batches = []
    for start in range(0, batch_size, micro_batch_size):
        rows = slice(start, start + micro_batch_size)
        micro_batches.append(
            {
                "input_ids": input_ids[rows].to(device),
                "attention_mask": attention_mask[rows].to(device),
                "labels": labels[rows].to(device),
            }
        )
    return micro_batches


def _measure(settings: dict) -> dict:
    """Time one path on one mode and measure its peak memory, in a fresh process."""
    import torch

    from hf_dp_microadam.privacy.grad_sample import PerExampleGradients
    from hf_dp_microadam.privacy.losses import compute_per_example_losses

    if settings["threads"]:
        torch.set_num_threads(settings["threads"])
    device = torch.device(settings["device"])
    model = _build_model(settings["mode"], device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    micro_batches = _make_micro_batches(
        settings["batch_size"], settings["micro_batch_size"], settings["sequence_length"], device
    )
    engine = PerExampleGradients(model) if settings["path"] == "per_example" else None

    def run_logical_batch() -> None:
        for micro_batch in micro_batches:
            if engine is None:
                model(**micro_batch).loss.backward()
            else:
                losses, _ = compute_per_example_losses(model, micro_batch)
                losses.sum().backward()
                engine.clear_grad_samples()
        model.zero_grad(set_to_none=True)

    def synchronize() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        baseline = torch.cuda.memory_allocated(device)
    else:
        baseline = _resident_bytes()

    run_logical_batch()
    synchronize()
    seconds = []
    for _ in range(settings["repeats"]):
        start = time.perf_counter()
        run_logical_batch()
        synchronize()
        seconds.append(time.perf_counter() - start)

    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) - baseline
    else:
        peak = None if baseline is None else _peak_resident_bytes() - baseline

    bytes_per_value = trainable[0].element_size()
    return {
        "mode": settings["mode"],
        "path": settings["path"],
        "trainable_parameters": sum(p.numel() for p in trainable),
        "seconds_per_logical_batch": statistics.median(seconds),
        "seconds_all_repeats": seconds,
        "peak_memory_mib": None if peak is None else peak / 2**20,
        # Size of p.grad_sample for one micro-batch, the memory that per-example gradients add.
        "grad_sample_mib_per_micro_batch": settings["micro_batch_size"]
        * sum(p.numel() for p in trainable)
        * bytes_per_value
        / 2**20,
    }


def _format_table(results: list[dict]) -> str:
    rows = [
        "mode  trainable   non-private s  per-example s  time ratio  non-private MiB  per-example MiB  grad_sample MiB/micro-batch"
    ]
    for mode in MODES:
        by_path = {r["path"]: r for r in results if r["mode"] == mode}
        if set(by_path) != set(PATHS):
            continue
        plain, private = by_path["non_private"], by_path["per_example"]
        ratio = private["seconds_per_logical_batch"] / plain["seconds_per_logical_batch"]

        def mib(value):
            return "n/a" if value is None else f"{value:.0f}"

        rows.append(
            f"{mode:<5} {private['trainable_parameters']:>10,}  {plain['seconds_per_logical_batch']:>13.3f}  "
            f"{private['seconds_per_logical_batch']:>13.3f}  {ratio:>10.2f}  {mib(plain['peak_memory_mib']):>15}  "
            f"{mib(private['peak_memory_mib']):>15}  {private['grad_sample_mib_per_micro_batch']:>27.1f}"
        )
    return "\n".join(rows)


def parse_arguments(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="torch device to run on, e.g. cpu or cuda (default: cpu)")
    parser.add_argument("--batch-size", type=int, default=32, help="examples per logical batch (default: 32)")
    parser.add_argument("--micro-batch-size", type=int, default=8, help="examples per micro-batch (default: 8)")
    parser.add_argument("--sequence-length", type=int, default=128, help="tokens per example, padding included (default: 128)")
    parser.add_argument("--repeats", type=int, default=3, help="timed logical batches after one warm-up (default: 3)")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES), help="modes to run (default: both)")
    parser.add_argument("--threads", type=int, default=0, help="number of torch CPU threads (default: 0, which keeps torch's default)")
    parser.add_argument("--output", type=Path, default=None, help="JSON file (default: benchmarks/results/per_example_<device type>.json)")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    arguments = parse_arguments(argv)
    import torch

    device_type = torch.device(arguments.device).type
    output = arguments.output or RESULTS_DIR / f"per_example_{device_type}.json"
    context = multiprocessing.get_context("spawn")

    results = []
    for mode in arguments.modes:
        for path in PATHS:
            settings = dict(
                mode=mode,
                path=path,
                device=arguments.device,
                batch_size=arguments.batch_size,
                micro_batch_size=arguments.micro_batch_size,
                sequence_length=arguments.sequence_length,
                repeats=arguments.repeats,
                threads=arguments.threads,
            )
            with context.Pool(1) as pool:
                results.append(pool.apply(_measure, (settings,)))
            print(f"measured {mode} {path}: {results[-1]['seconds_per_logical_batch']:.3f} s", file=sys.stderr)

    print(_format_table(results))
    record = {
        "command": " ".join([Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:])),
        "device": arguments.device,
        "device_name": torch.cuda.get_device_name(arguments.device) if device_type == "cuda" else platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        # Other processes may share the CPUs. A load above the core count makes CPU timings noisy.
        "load_average_after": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "torch_threads": arguments.threads or torch.get_num_threads(),
        "torch": torch.__version__,
        "model": {"class": "BertForSequenceClassification", **BERT_SETTINGS, "dtype": "float32"},
        "batch_size": arguments.batch_size,
        "micro_batch_size": arguments.micro_batch_size,
        "sequence_length": arguments.sequence_length,
        "repeats": arguments.repeats,
        "results": results,
    }
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {output}")


if __name__ == "__main__":
    main()
