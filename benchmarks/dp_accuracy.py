#!/usr/bin/env python
"""Test accuracy of DP-MicroAdam, DP-Adam, DP-AdamBC and DP-SGD at equal privacy.

Three tasks (see `TASKS` in benchmarks/dp_runs.py for every setting):

- vit-fashion-mnist: a small ViT trained from random initialization on a 10,000-image
  subset of Fashion-MNIST, 150 steps of expected batch 256;
- minilm-rotten-tomatoes: all-MiniLM-L6-v2 with LoRA plus a mean-pooled head on a
  4,000-sentence subset of Rotten Tomatoes, 40 steps of expected batch 64;
- dinov2-fashion-mnist: DINOv2-small with LoRA plus the head on a 6,000-image subset of
  Fashion-MNIST at 56 px, 40 steps of expected batch 64.

Procedure, the same for every optimizer:

1. Learning rate: every optimizer gets three consecutive rungs of a half-decade ladder
   (1e-4, 3e-4, 1e-3, ...), trained at epsilon = `--grid-epsilon` with seed 0 and
   scored on the validation subset at the last step. When the best rate is at an end of
   the grid, the next rung beyond it is added, up to `--max-extensions` times. The best
   validation accuracy picks the rate, which is then used at every epsilon and seed.
2. Accuracy: each optimizer trains with its picked rate at every epsilon of
   `--epsilons` and every seed of `--seeds` (delta = 1e-5, Poisson sampling, PRV
   accountant, clipping norm 1, constant learning rate), and is scored on the test split.
   The seed sets the initialization, the Poisson batches and the noise.
3. Tasks in `--transfer-tasks` (DINOv2 by default) get no grid and no epsilon sweep: one
   run per optimizer at `--grid-epsilon` and seed 0, with the rate picked on the MiniLM
   LoRA task.

Prints the grids and the accuracy tables, writes benchmarks/results/dp_accuracy.json and
the plots under docs/figures/. Runs are cached (see benchmarks/dp_runs.py), so invoking
the same command again finishes an interrupted sweep and rewrites the report.

    python benchmarks/dp_accuracy.py --jobs 2
    python benchmarks/dp_accuracy.py --tasks vit-fashion-mnist --epsilons 8 --seeds 0
    python benchmarks/dp_accuracy.py --quick        # a few steps per run, to check the script
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import dp_runs
from dp_runs import LR_LADDER, OPTIMIZERS, TASKS, RunConfig

RESULTS_PATH = dp_runs.RESULTS_DIR / "dp_accuracy.json"
QUICK_DIR = dp_runs.REPO_ROOT / "outputs" / "benchmarks" / "quick"
LR_SOURCE_TASK = "minilm-rotten-tomatoes"


def parse_arguments(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", choices=list(TASKS), default=list(TASKS), help="tasks to run")
    parser.add_argument("--transfer-tasks", nargs="*", choices=list(TASKS), default=["dinov2-fashion-mnist"],
                        help=f"tasks trained once per optimizer with the rate picked on {LR_SOURCE_TASK}")
    parser.add_argument("--optimizers", nargs="+", choices=OPTIMIZERS, default=list(OPTIMIZERS))
    parser.add_argument("--epsilons", nargs="+", type=float, default=[1.0, 3.0, 8.0], help="target epsilons")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1], help="seeds of the epsilon sweep")
    parser.add_argument("--grid-epsilon", type=float, default=8.0, help="epsilon of the learning-rate grid")
    parser.add_argument("--max-extensions", type=int, default=3,
                        help="rungs added at most beyond the end of a grid where the best rate lies")
    parser.add_argument("--jobs", type=int, default=1, help="training runs at a time, one process each")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per training run")
    dp_runs.add_device_argument(parser)
    dp_runs.add_revision_argument(parser)
    parser.add_argument("--fresh", action="store_true", help="train every run again instead of using the cache")
    parser.add_argument("--quick", action="store_true",
                        help="3 steps on 512 training examples per run, one seed, epsilon 8, a two-rung grid; "
                        "writes under outputs/benchmarks/quick")
    parser.add_argument("--output", type=Path, default=None, help=f"JSON report (default: {RESULTS_PATH})")
    parser.add_argument("--figures-dir", type=Path, default=None,
                        help=f"folder of the plots (default: {dp_runs.FIGURES_DIR})")
    parser.add_argument("--yes", action="store_true", help="start without the 10 s pause after the estimate")
    args = parser.parse_args(argv)
    dp_runs.check_device(parser, args.device)
    if args.jobs < 1:
        parser.error(f"--jobs must be at least 1, got {args.jobs}")
    if args.quick:
        args.seeds, args.epsilons, args.max_extensions = args.seeds[:1], [args.grid_epsilon], 0
    try:
        args.code_revision = dp_runs.resolve_revision(args.code_revision)
    except ValueError as error:
        parser.error(str(error))
    args.output = args.output or (QUICK_DIR / "dp_accuracy.json" if args.quick else RESULTS_PATH)
    args.figures_dir = args.figures_dir or (QUICK_DIR / "figures" if args.quick else dp_runs.FIGURES_DIR)
    return args


def base_config(args, task: str, optimizer: str, learning_rate: float, epsilon: float, seed: int) -> RunConfig:
    config = RunConfig(task=task, optimizer=optimizer, learning_rate=learning_rate, target_epsilon=epsilon,
                       seed=seed, device=args.device, threads=args.threads, code_revision=args.code_revision)
    if args.quick:
        config = replace(config, max_steps=3, train_samples=512)
    return config


def initial_grid(args, task: str, optimizer: str) -> list[float]:
    grid = list(TASKS[task].lr_grids[optimizer])
    return grid[:2] if args.quick else grid


def next_rung(rate: float, direction: int) -> float | None:
    index = LR_LADDER.index(rate) + direction
    return LR_LADDER[index] if 0 <= index < len(LR_LADDER) else None


def validation_accuracy(result: dict) -> float:
    if result.get("failed") or result.get("validation_accuracy") is None:
        return float("-inf")
    return result["validation_accuracy"]


def tune_learning_rates(args, task: str, log) -> dict:
    """Run the grid with edge extensions for every optimizer; return grids, picks and results."""
    grids = {optimizer: initial_grid(args, task, optimizer) for optimizer in args.optimizers}
    extensions = {optimizer: [] for optimizer in args.optimizers}
    results: dict[str, dict] = {}
    for round_index in range(args.max_extensions + 1):
        configs = [base_config(args, task, optimizer, rate, args.grid_epsilon, 0)
                   for optimizer in args.optimizers for rate in grids[optimizer]]
        log(f"[{task}] learning-rate grid, round {round_index + 1}: "
            + dp_runs.describe_estimate(configs, args.jobs, args.device))
        results.update(dp_runs.run_all(configs, jobs=args.jobs, fresh=args.fresh, log=log))
        if round_index == args.max_extensions:
            break
        added = False
        for optimizer in args.optimizers:
            grid = grids[optimizer]
            scores = {rate: validation_accuracy(results[config.key()]) for rate, config in
                      ((rate, base_config(args, task, optimizer, rate, args.grid_epsilon, 0)) for rate in grid)}
            best = max(grid, key=lambda rate: scores[rate])
            direction = -1 if best == min(grid) else 1 if best == max(grid) else 0
            rung = next_rung(best, direction) if direction else None
            if rung is not None and rung not in grid:
                grid.append(rung)
                grid.sort()
                extensions[optimizer].append(rung)
                added = True
        if not added:
            break

    table, picks = {}, {}
    for optimizer in args.optimizers:
        table[optimizer] = {}
        for rate in grids[optimizer]:
            result = results[base_config(args, task, optimizer, rate, args.grid_epsilon, 0).key()]
            table[optimizer][repr(rate)] = {
                "validation_accuracy": result.get("validation_accuracy"),
                "test_accuracy": result.get("test_accuracy"),
                "failed": bool(result.get("failed")),
            }
        picks[optimizer] = max(grids[optimizer], key=lambda rate: validation_accuracy(
            results[base_config(args, task, optimizer, rate, args.grid_epsilon, 0).key()]))
    edge_picks = [optimizer for optimizer in args.optimizers
                  if picks[optimizer] in (min(grids[optimizer]), max(grids[optimizer]))]
    return {"grids": grids, "extensions": extensions, "picks": picks, "table": table,
            "picks_at_grid_edge": edge_picks}


def sweep(args, task: str, picks: dict, epsilons: list[float], seeds: list[int], log) -> dict:
    configs = [base_config(args, task, optimizer, picks[optimizer], epsilon, seed)
               for optimizer in args.optimizers for epsilon in epsilons for seed in seeds]
    log(f"[{task}] epsilon sweep: " + dp_runs.describe_estimate(configs, args.jobs, args.device))
    results = dp_runs.run_all(configs, jobs=args.jobs, fresh=args.fresh, log=log)
    accuracy, runs = {}, []
    for optimizer in args.optimizers:
        accuracy[optimizer] = {}
        for epsilon in epsilons:
            selected = [results[base_config(args, task, optimizer, picks[optimizer], epsilon, seed).key()]
                        for seed in seeds]
            finished = [result for result in selected if not result.get("failed")]
            accuracy[optimizer][repr(epsilon)] = {
                "test": dp_runs.summarize([r["test_accuracy"] for r in finished]) if finished else None,
                "validation": dp_runs.summarize([r["validation_accuracy"] for r in finished]) if finished else None,
                "noise_multiplier": finished[0]["noise_multiplier"] if finished else None,
                "epsilon_spent": [r["epsilon"] for r in finished],
                "failed_seeds": [r["config"]["seed"] for r in selected if r.get("failed")],
            }
            runs.extend(selected)
    return {"accuracy": accuracy, "runs": runs}


def print_grid(task: str, tuning: dict, grid_epsilon: float) -> None:
    rates = sorted({rate for grid in tuning["grids"].values() for rate in grid})
    print(f"\n{task}: learning-rate grid at epsilon {grid_epsilon:g}, seed 0 (validation accuracy, * = pick)")
    print(f"{'optimizer':<14}" + "".join(f"{rate:>9g}" for rate in rates))
    for optimizer, row in tuning["table"].items():
        cells = []
        for rate in rates:
            entry = row.get(repr(rate))
            if entry is None:
                cells.append(f"{'':>9}")
            elif entry["failed"] or entry["validation_accuracy"] is None:
                cells.append(f"{'failed':>9}")
            else:
                mark = "*" if rate == tuning["picks"][optimizer] else " "
                cells.append(f"{entry['validation_accuracy']:>8.3f}{mark}")
        print(f"{optimizer:<14}" + "".join(cells))


def print_accuracy(task: str, accuracy: dict, epsilons: list[float], seeds: list[int]) -> None:
    print(f"\n{task}: test accuracy, mean ± half the range over seeds {seeds}")
    print(f"{'optimizer':<14}" + "".join(f"{'eps=' + format(e, 'g'):>18}" for e in epsilons))
    for optimizer, row in accuracy.items():
        print(f"{optimizer:<14}" + "".join(f"{dp_runs.format_mean(row[repr(e)]['test']):>18}" for e in epsilons))


def main(argv=None) -> int:
    args = parse_arguments(argv)
    started = time.perf_counter()

    def log(message: str) -> None:
        print(message, flush=True)

    swept_tasks = [task for task in args.tasks if task not in args.transfer_tasks]
    transfer_tasks = [task for task in args.tasks if task in args.transfer_tasks]
    if transfer_tasks and LR_SOURCE_TASK not in swept_tasks:
        # The transfer tasks need the picks of the source task; its grid is cached after one full run.
        swept_tasks.insert(0, LR_SOURCE_TASK)
    print_plan(args, swept_tasks, transfer_tasks)
    if not args.yes:
        time.sleep(10)

    report = {"benchmark": "DP test accuracy per optimizer and epsilon", "settings": {
        "optimizers": args.optimizers, "epsilons": args.epsilons, "seeds": args.seeds,
        "grid_epsilon": args.grid_epsilon, "max_extensions": args.max_extensions, "quick": args.quick,
        "lr_ladder": list(LR_LADDER), "code_revision": args.code_revision, "threads_per_run": args.threads, "jobs": args.jobs,
        "load_average_start": dp_runs.load_average()}, "tasks": {}}
    for task in swept_tasks:
        task_started = time.perf_counter()
        tuning = tune_learning_rates(args, task, log)
        outcome = sweep(args, task, tuning["picks"], args.epsilons, args.seeds, log)
        report["tasks"][task] = {"spec": asdict(TASKS[task]), "mode": "grid and epsilon sweep", **tuning,
                                 "accuracy": outcome["accuracy"], "runs": outcome["runs"],
                                 "wall_seconds_this_invocation": round(time.perf_counter() - task_started, 1)}
        print_grid(task, tuning, args.grid_epsilon)
        print_accuracy(task, outcome["accuracy"], args.epsilons, args.seeds)
    for task in transfer_tasks:
        task_started = time.perf_counter()
        picks = report["tasks"][LR_SOURCE_TASK]["picks"]
        outcome = sweep(args, task, picks, [args.grid_epsilon], [0], log)
        report["tasks"][task] = {"spec": asdict(TASKS[task]), "mode": f"one run per optimizer, rates picked on "
                                 f"{LR_SOURCE_TASK}", "picks": picks, "accuracy": outcome["accuracy"],
                                 "runs": outcome["runs"],
                                 "wall_seconds_this_invocation": round(time.perf_counter() - task_started, 1)}
        print_accuracy(task, outcome["accuracy"], [args.grid_epsilon], [0])

    report["settings"]["load_average_end"] = dp_runs.load_average()
    report.update(dp_runs.report_header(["benchmarks/dp_accuracy.py", *(sys.argv[1:] if argv is None else argv)],
                                        args.device, started))
    report["train_seconds_all_runs"] = round(sum(
        run.get("run_seconds", 0) for task in report["tasks"].values() for run in task["runs"]), 1)
    dp_runs.write_report(args.output, report)
    print(f"\nwrote {args.output}")
    import dp_plots

    for path in dp_plots.plot_accuracy_report(report, args.figures_dir):
        print(f"wrote {path}")
    failed = [run for task in report["tasks"].values() for run in task["runs"] if run.get("failed")]
    print(f"wall time {time.perf_counter() - started:.0f} s")
    return 1 if failed else 0


def print_plan(args, swept_tasks: list[str], transfer_tasks: list[str]) -> None:
    print("Plan:")
    total = 0.0
    for task in swept_tasks:
        spec = TASKS[task]
        grid_runs = sum(len(initial_grid(args, task, optimizer)) for optimizer in args.optimizers)
        sweep_runs = len(args.optimizers) * len(args.epsilons) * len(args.seeds)
        example = base_config(args, task, args.optimizers[0], spec.lr_grids[args.optimizers[0]][0],
                              args.grid_epsilon, 0)
        seconds = dp_runs.estimate_run_seconds(example)
        # The epsilon-8 seed-0 runs of the sweep are the grid's own runs.
        reused = len(args.optimizers) if args.grid_epsilon in args.epsilons and 0 in args.seeds else 0
        runs = grid_runs + sweep_runs - reused
        total += runs * seconds
        print(f"  {task}: {spec.description}; {grid_runs} grid runs (+ up to "
              f"{args.max_extensions * len(args.optimizers)} extensions) and {sweep_runs - reused} more for the "
              f"sweep, about {seconds / 60:.1f} min per run")
    for task in transfer_tasks:
        spec = TASKS[task]
        example = base_config(args, task, args.optimizers[0], 1e-3, args.grid_epsilon, 0)
        seconds = dp_runs.estimate_run_seconds(example)
        total += len(args.optimizers) * seconds
        print(f"  {task}: {spec.description}; {len(args.optimizers)} runs, about {seconds / 60:.1f} min per run")
    print(f"Estimated wall time without cached runs or extensions: {total / args.jobs / 60:.0f} min with "
          f"--jobs {args.jobs} on --device {args.device} (rates measured on one thread of a shared 2-core AMD "
          "EPYC; a faster or idle machine takes less). Cached runs are not trained again.", flush=True)


if __name__ == "__main__":
    sys.exit(main())
