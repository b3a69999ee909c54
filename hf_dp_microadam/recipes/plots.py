"""Training-curve plots of a run: loss, evaluation metric and epsilon against the step."""

from __future__ import annotations

import math
from pathlib import Path


def _series(log_history: list[dict], key: str) -> tuple[list[int], list[float]]:
    steps, values = [], []
    for entry in log_history:
        value = entry.get(key)
        if isinstance(value, (int, float)) and math.isfinite(value) and "step" in entry:
            steps.append(entry["step"])
            values.append(float(value))
    return steps, values


def training_curve_series(log_history: list[dict], metric: str | None = None) -> dict:
    """Return {key: (panel title, steps, values)} for each panel of `plot_training_curves`."""
    titles = {"loss": "training loss (not covered by DP)", "eval_loss": "evaluation loss"}
    if metric:
        titles[metric] = metric
    titles["epsilon"] = "epsilon spent"
    panels = {key: (title, *_series(log_history, key)) for key, title in titles.items()}
    if not panels["loss"][1]:
        panels["loss"] = (titles["loss"], *_series(log_history, "train_loss"))
    return panels


def plot_training_curves(log_history: list[dict], path: str | Path, *, metric: str | None = None,
                         title: str | None = None) -> Path:
    """Plot the training loss, evaluation loss, `metric` and epsilon against the step into a PNG.

    `metric` is an evaluation key such as `eval_accuracy`. Each series gets its own panel.
    Without a logged training loss (logging_steps larger than the step count), the final
    average training loss (`train_loss`) is plotted at the last step. A series with no
    finite value keeps its panel, with a note saying that nothing was logged, so that a
    missing curve is seen rather than dropped. Returns the path. Raises ValueError when no
    series has data.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    panels = training_curve_series(log_history, metric)
    if not any(steps for _, steps, _ in panels.values()):
        raise ValueError("the log history has no loss, metric or epsilon entries to plot")

    figure, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
    for axis, (label, steps, values) in zip(axes[0], panels.values()):
        if steps:
            axis.plot(steps, values, marker="o" if len(steps) < 30 else None, markersize=3)
        else:
            axis.text(0.5, 0.5, "nothing logged:\nlower logging_steps\nor eval_steps", ha="center", va="center",
                      transform=axis.transAxes, color="0.4")
        axis.set_xlabel("step")
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.set_title(label)
        axis.grid(alpha=0.3)
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
