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


def plot_training_curves(log_history: list[dict], path: str | Path, *, metric: str | None = None,
                         title: str | None = None) -> Path:
    """Plot the training loss, evaluation loss, `metric` and epsilon against the step into a PNG.

    `metric` is an evaluation key such as `eval_accuracy`. Each series gets its own panel,
    and a series with no finite value in `log_history` gets none. Returns the path.
    Raises ValueError when no series has data.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("loss", "training loss (not covered by DP)"), ("eval_loss", "evaluation loss")]
    if metric:
        panels.append((metric, metric))
    panels.append(("epsilon", "epsilon spent"))
    panels = [(key, label) for key, label in panels if _series(log_history, key)[0]]
    if not panels:
        raise ValueError("the log history has no loss, metric or epsilon entries to plot")

    figure, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
    for axis, (key, label) in zip(axes[0], panels):
        steps, values = _series(log_history, key)
        axis.plot(steps, values, marker="o" if len(steps) < 30 else None, markersize=3)
        axis.set_xlabel("step")
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
