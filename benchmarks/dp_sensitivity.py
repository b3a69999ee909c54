#!/usr/bin/env python
"""DP-MicroAdam's test accuracy over its density and window, and every optimizer's over the clipping norm.

Task: `--task` (default vit-fashion-mnist, the cheapest of benchmarks/dp_accuracy.py),
at epsilon 8 (delta 1e-5), with every other setting as in that benchmark.

- Density and window: DP-MicroAdam with density in `--densities` crossed with window in
  `--windows`, at the learning rate picked for it by the grid of dp_accuracy.py.
- Clipping norm C: each optimizer of `--clip-optimizers` at every C of `--clip-norms`,
  at its picked learning rate, which stays fixed while C changes. An Adam-type update
  is nearly invariant to a common scale of its gradients, so its accuracy should move
  little with C; SGD's step scales with C.

The learning rates come from the same cached grid runs as dp_accuracy.py (the grid is
trained here if it is not in the cache yet). Every configuration runs with each seed
of `--seeds`; the tables give the mean test accuracy and half the range over seeds.
Writes benchmarks/results/dp_sensitivity.json and docs/figures/sensitivity_*.png.

    python benchmarks/dp_sensitivity.py --jobs 2
    python benchmarks/dp_sensitivity.py --quick
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import dp_accuracy
import dp_runs
from dp_runs import OPTIMIZERS, TASKS

RESULTS_PATH = dp_runs.RESULTS_DIR / "dp_sensitivity.json"


def parse_arguments(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=list(TASKS), default="vit-fashion-mnist")
    parser.add_argument("--epsilon", type=float, default=8.0, help="target epsilon of every run (default: 8)")
    parser.add_argument("--densities", nargs="+", type=float, default=[0.005, 0.01, 0.05])
    parser.add_argument("--windows", nargs="+", type=int, default=[5, 10, 20])
    parser.add_argument("--clip-norms", nargs="+", type=float, default=[0.1, 1.0, 10.0])
    parser.add_argument("--clip-optimizers", nargs="+", choices=OPTIMIZERS, default=list(OPTIMIZERS),
                        help="optimizers of the clipping-norm sweep")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--max-extensions", type=int, default=3,
                        help="as in dp_accuracy.py; must match it to reuse its cached grid")
    parser.add_argument("--jobs", type=int, default=1, help="training runs at a time, one process each")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per training run")
    dp_runs.add_device_argument(parser)
    dp_runs.add_revision_argument(parser)
    parser.add_argument("--fresh", action="store_true", help="train every run again instead of using the cache")
    parser.add_argument("--quick", action="store_true", help="3 steps on 512 examples per run, one seed")
    parser.add_argument("--output", type=Path, default=None, help=f"JSON report (default: {RESULTS_PATH})")
    parser.add_argument("--figures-dir", type=Path, default=None,
                        help=f"folder of the plots (default: {dp_runs.FIGURES_DIR})")
    parser.add_argument("--yes", action="store_true", help="start without the 10 s pause after the estimate")
    args = parser.parse_args(argv)
    dp_runs.check_device(parser, args.device)
    if args.jobs < 1:
        parser.error(f"--jobs must be at least 1, got {args.jobs}")
    try:
        args.code_revision = dp_runs.resolve_revision(args.code_revision)
    except ValueError as error:
        parser.error(str(error))
    if args.quick:
        args.seeds, args.max_extensions = args.seeds[:1], 0
    args.output = args.output or (dp_accuracy.QUICK_DIR / "dp_sensitivity.json" if args.quick else RESULTS_PATH)
    args.figures_dir = args.figures_dir or (dp_accuracy.QUICK_DIR / "figures" if args.quick
                                            else dp_runs.FIGURES_DIR)
    # Settings that dp_accuracy's grid functions read.
    args.optimizers = sorted(set(args.clip_optimizers) | {"dp-microadam"}, key=OPTIMIZERS.index)
    args.grid_epsilon = args.epsilon
    return args


def summarize_runs(results: dict, configs: list) -> dict | None:
    finished = [results[config.key()] for config in configs if not results[config.key()].get("failed")]
    if not finished:
        return None
    summary = dp_runs.summarize([run["test_accuracy"] for run in finished])
    summary["failed_seeds"] = [config.seed for config in configs if results[config.key()].get("failed")]
    return summary


def main(argv=None) -> int:
    args = parse_arguments(argv)
    started = time.perf_counter()

    def log(message: str) -> None:
        print(message, flush=True)

    task = args.task
    grid_configs = [dp_accuracy.base_config(args, task, optimizer, rate, args.epsilon, 0)
                    for optimizer in args.optimizers for rate in dp_accuracy.initial_grid(args, task, optimizer)]
    density_window = [(density, window) for density in args.densities for window in args.windows]
    planned = len(grid_configs) + len(args.seeds) * (len(density_window) + len(args.clip_optimizers) *
                                                      len(args.clip_norms))
    example_seconds = dp_runs.estimate_run_seconds(grid_configs[0])
    print(f"{task}: {TASKS[task].description}. Up to {planned} runs (learning-rate grid of dp_accuracy.py, "
          f"{len(density_window)} density/window pairs and {len(args.clip_optimizers) * len(args.clip_norms)} "
          f"optimizer/C pairs, seeds {args.seeds}); those in the cache are not trained again. Without the cache: "
          f"estimated {planned * example_seconds / args.jobs / 60:.0f} min with --jobs {args.jobs} (rates "
          "measured on one thread of a shared 2-core AMD EPYC; a faster or idle machine takes less).", flush=True)
    if not args.yes:
        time.sleep(10)

    tuning = dp_accuracy.tune_learning_rates(args, task, log)
    picks = tuning["picks"]

    def config(optimizer: str, seed: int, **changes):
        base = dp_accuracy.base_config(args, task, optimizer, picks[optimizer], args.epsilon, seed)
        return replace(base, **changes)

    grid_of_configs = {(density, window): [config("dp-microadam", seed, density=density, window=window)
                                           for seed in args.seeds] for density, window in density_window}
    clip_configs = {(optimizer, norm): [config(optimizer, seed, clipping_norm=norm) for seed in args.seeds]
                    for optimizer in args.clip_optimizers for norm in args.clip_norms}
    all_configs = [c for configs in (*grid_of_configs.values(), *clip_configs.values()) for c in configs]
    log(f"[{task}] sensitivity runs: " + dp_runs.describe_estimate(all_configs, args.jobs, args.device))
    results = dp_runs.run_all(all_configs, jobs=args.jobs, fresh=args.fresh, log=log)

    density_table = {f"{density:g}/{window}": summarize_runs(results, configs)
                     for (density, window), configs in grid_of_configs.items()}
    clip_table = {optimizer: {repr(norm): summarize_runs(results, clip_configs[(optimizer, norm)])
                              for norm in args.clip_norms} for optimizer in args.clip_optimizers}

    print(f"\n{task}: DP-MicroAdam test accuracy at epsilon {args.epsilon:g}, lr {picks['dp-microadam']:g} "
          f"(rows: density, columns: window; mean ± half the range over seeds {args.seeds})")
    print(f"{'density':<10}" + "".join(f"{'window=' + str(window):>18}" for window in args.windows))
    for density in args.densities:
        print(f"{density:<10g}" + "".join(f"{dp_runs.format_mean(density_table[f'{density:g}/{window}']):>18}"
                                          for window in args.windows))
    print(f"\n{task}: test accuracy over the clipping norm C at epsilon {args.epsilon:g}, learning rates fixed "
          "at the picks")
    print(f"{'optimizer':<14}{'lr':>8}" + "".join(f"{'C=' + format(norm, 'g'):>18}" for norm in args.clip_norms))
    for optimizer in args.clip_optimizers:
        print(f"{optimizer:<14}{picks[optimizer]:>8g}" + "".join(
            f"{dp_runs.format_mean(clip_table[optimizer][repr(norm)]):>18}" for norm in args.clip_norms))

    report = {
        "benchmark": "DP-MicroAdam density/window sensitivity and clipping-norm sensitivity",
        "task": task,
        "spec": asdict(TASKS[task]),
        "settings": {"epsilon": args.epsilon, "densities": args.densities, "windows": args.windows,
                     "clip_norms": args.clip_norms, "clip_optimizers": args.clip_optimizers, "seeds": args.seeds,
                     "quick": args.quick, "code_revision": args.code_revision, "jobs": args.jobs,
                     "threads_per_run": args.threads},
        "learning_rate_picks": picks,
        "learning_rate_grid": tuning["table"],
        "density_window_test_accuracy": density_table,
        "clip_norm_test_accuracy": clip_table,
        "runs": [results[c.key()] for c in dict.fromkeys(all_configs)],
        "load_average_end": dp_runs.load_average(),
    }
    report.update(dp_runs.report_header(["benchmarks/dp_sensitivity.py", *(sys.argv[1:] if argv is None
                                                                              else argv)], args.device, started))
    report["train_seconds_all_runs"] = round(sum(run.get("run_seconds", 0) for run in report["runs"]), 1)
    dp_runs.write_report(args.output, report)
    print(f"\nwrote {args.output}")
    import dp_plots

    for path in dp_plots.plot_sensitivity_report(report, args.figures_dir):
        print(f"wrote {path}")
    print(f"wall time {time.perf_counter() - started:.0f} s")
    return 1 if any(run.get("failed") for run in report["runs"]) else 0


if __name__ == "__main__":
    sys.exit(main())
