"""Plots of the DP accuracy and sensitivity benchmarks (PNG files, matplotlib's Agg backend)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

COLORS = {"dp-microadam": "tab:red", "dp-adam": "tab:blue", "dp-adambc": "tab:green", "dp-sgd": "tab:gray"}
TASK_TITLES = {
    "vit-fashion-mnist": "ViT from scratch, Fashion-MNIST",
    "minilm-rotten-tomatoes": "MiniLM LoRA, Rotten Tomatoes",
    "dinov2-fashion-mnist": "DINOv2-S LoRA, Fashion-MNIST",
}


def _save(figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def plot_accuracy_vs_epsilon(report: dict, path: Path) -> Path | None:
    """Plot test accuracy against epsilon per optimizer, one panel per task (bars for one epsilon)."""
    tasks = [(name, task) for name, task in report["tasks"].items() if task.get("accuracy")]
    if not tasks:
        return None
    figure, axes = plt.subplots(1, len(tasks), figsize=(4.6 * len(tasks), 3.8), squeeze=False)
    for axis, (name, task) in zip(axes[0], tasks):
        epsilons = sorted({float(e) for row in task["accuracy"].values() for e in row})
        for index, (optimizer, row) in enumerate(task["accuracy"].items()):
            points = [(float(e), cell["test"]) for e, cell in row.items() if cell["test"] is not None]
            points.sort()
            if not points:
                continue
            xs = [e for e, _ in points]
            means = [summary["mean"] for _, summary in points]
            errors = [summary["half_range"] for _, summary in points]
            color = COLORS.get(optimizer)
            if len(epsilons) == 1:
                axis.bar(index, means[0], yerr=errors[0], color=color, label=optimizer, capsize=3)
                axis.text(index, means[0], f"{means[0]:.3f}", ha="center", va="bottom", fontsize=8)
            else:
                axis.errorbar(xs, means, yerr=errors, marker="o", capsize=3, color=color, label=optimizer)
        if len(epsilons) == 1:
            axis.set_xticks(range(len(task["accuracy"])), list(task["accuracy"]), rotation=20, fontsize=8)
            axis.set_xlabel(f"epsilon = {epsilons[0]:g}")
            low = min(cell["test"]["mean"] for row in task["accuracy"].values() for cell in row.values()
                      if cell["test"] is not None)
            axis.set_ylim(max(0.0, low - 0.1), None)
        else:
            axis.set_xscale("log")
            axis.set_xticks(epsilons, [format(e, "g") for e in epsilons])
            axis.minorticks_off()
            axis.set_xlabel("epsilon (delta = 1e-5)")
        axis.set_ylabel("test accuracy")
        axis.set_title(TASK_TITLES.get(name, name), fontsize=10)
        axis.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    return _save(figure, path)


def plot_training_curves(task_name: str, task: dict, epsilon: float, path: Path) -> Path | None:
    """Plot the training loss and validation accuracy against the step, seed 0 at the picked rates."""
    runs = [run for run in task["runs"] if not run.get("failed") and run["config"]["seed"] == 0
            and run["config"]["target_epsilon"] == epsilon]
    if not runs:
        return None
    figure, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for run in runs:
        optimizer = run["config"]["optimizer"]
        label = f"{optimizer} (lr {run['config']['learning_rate']:g})"
        color = COLORS.get(optimizer)
        for axis, key in zip(axes, ("loss", "eval_accuracy")):
            series = run["curves"][key]
            if series:
                steps, values = zip(*series)
                axis.plot(steps, values, marker="o" if len(steps) < 10 else None, color=color, label=label)
    axes[0].set_title("training loss (not covered by DP)", fontsize=10)
    axes[1].set_title("validation accuracy", fontsize=10)
    for axis in axes:
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
    axes[1].legend(fontsize=8)
    figure.suptitle(f"{TASK_TITLES.get(task_name, task_name)}, epsilon = {epsilon:g}, seed 0", fontsize=11)
    return _save(figure, path)


def plot_lr_grid(task_name: str, task: dict, path: Path) -> Path | None:
    """Plot the validation accuracy of every learning rate of the grid, per optimizer."""
    if not task.get("table"):
        return None
    figure, axis = plt.subplots(figsize=(5.2, 3.8))
    for optimizer, row in task["table"].items():
        points = sorted((float(rate), entry["validation_accuracy"]) for rate, entry in row.items()
                        if entry["validation_accuracy"] is not None)
        if points:
            rates, values = zip(*points)
            axis.plot(rates, values, marker="o", color=COLORS.get(optimizer), label=optimizer)
            pick = task["picks"][optimizer]
            axis.scatter([pick], [row[repr(pick)]["validation_accuracy"]], s=120, facecolors="none",
                         edgecolors=COLORS.get(optimizer))
    axis.set_xscale("log")
    axis.set_xlabel("learning rate")
    axis.set_ylabel("validation accuracy")
    axis.set_title(f"{TASK_TITLES.get(task_name, task_name)}: grid (circles: picks)", fontsize=10)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    return _save(figure, path)


def plot_accuracy_report(report: dict, figures_dir: Path) -> list[Path]:
    """Write every plot of a dp_accuracy report; return the files written."""
    grid_epsilon = report["settings"]["grid_epsilon"]
    paths = [plot_accuracy_vs_epsilon(report, figures_dir / "accuracy_vs_epsilon.png")]
    for name, task in report["tasks"].items():
        paths.append(plot_training_curves(name, task, grid_epsilon, figures_dir / f"training_curves_{name}.png"))
        paths.append(plot_lr_grid(name, task, figures_dir / f"lr_grid_{name}.png"))
    return [path for path in paths if path is not None]


def plot_density_window(report: dict, path: Path) -> Path | None:
    """Plot DP-MicroAdam's mean test accuracy as a density x window heat map."""
    settings = report["settings"]
    densities, windows = settings["densities"], settings["windows"]
    table = report["density_window_test_accuracy"]
    values = [[(table.get(f"{density:g}/{window}") or {}).get("mean", float("nan")) for window in windows]
              for density in densities]
    figure, axis = plt.subplots(figsize=(5.0, 3.8))
    image = axis.imshow(values, cmap="viridis", aspect="auto")
    for row, density in enumerate(densities):
        for column, window in enumerate(windows):
            summary = table.get(f"{density:g}/{window}")
            text = "failed" if summary is None else f"{summary['mean']:.3f}\n± {summary['half_range']:.3f}"
            axis.text(column, row, text, ha="center", va="center", color="white", fontsize=8)
    axis.set_xticks(range(len(windows)), [str(window) for window in windows])
    axis.set_yticks(range(len(densities)), [f"{100 * density:g}%" for density in densities])
    axis.set_xlabel("window m")
    axis.set_ylabel("density")
    lr = report["learning_rate_picks"]["dp-microadam"]
    axis.set_title(f"DP-MicroAdam test accuracy, {TASK_TITLES.get(report['task'], report['task'])}\n"
                   f"epsilon = {settings['epsilon']:g}, lr = {lr:g}", fontsize=9)
    figure.colorbar(image, ax=axis)
    return _save(figure, path)


def plot_clip_norm(report: dict, path: Path) -> Path | None:
    """Plot the test accuracy against the clipping norm per optimizer, at fixed learning rates."""
    figure, axis = plt.subplots(figsize=(5.2, 3.8))
    for optimizer, row in report["clip_norm_test_accuracy"].items():
        points = sorted((float(norm), summary) for norm, summary in row.items() if summary is not None)
        if points:
            axis.errorbar([norm for norm, _ in points], [s["mean"] for _, s in points],
                          yerr=[s["half_range"] for _, s in points], marker="o", capsize=3,
                          color=COLORS.get(optimizer),
                          label=f"{optimizer} (lr {report['learning_rate_picks'][optimizer]:g})")
    axis.set_xscale("log")
    axis.set_xlabel("clipping norm C")
    axis.set_ylabel("test accuracy")
    axis.set_title(f"{TASK_TITLES.get(report['task'], report['task'])}, epsilon = "
                   f"{report['settings']['epsilon']:g}", fontsize=10)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    return _save(figure, path)


def plot_sensitivity_report(report: dict, figures_dir: Path) -> list[Path]:
    """Write the plots of a dp_sensitivity report; return the files written."""
    paths = [plot_density_window(report, figures_dir / "sensitivity_density_window.png"),
             plot_clip_norm(report, figures_dir / "sensitivity_clip_norm.png")]
    return [path for path in paths if path is not None]
