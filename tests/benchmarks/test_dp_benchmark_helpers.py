"""Helpers of the DP accuracy and sensitivity benchmarks: run keys, grid rungs, summaries, plots."""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import pytest

BENCHMARKS_DIR = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS_DIR))

import dp_accuracy  # noqa: E402
import dp_plots  # noqa: E402
import dp_runs  # noqa: E402
from dp_runs import LR_LADDER, OPTIMIZERS, TASKS, RunConfig  # noqa: E402


def make_config(**changes) -> RunConfig:
    config = RunConfig(task="vit-fashion-mnist", optimizer="dp-adam", learning_rate=1e-3, target_epsilon=8.0, seed=0)
    return replace(config, **changes)


def test_run_key_is_stable_and_setting_specific():
    assert make_config().key() == make_config().key()
    assert make_config().key() != make_config(seed=1).key()
    assert make_config().key() != make_config(density=0.05).key()
    assert make_config().key() != make_config(code_revision="0" * 40).key()


def test_task_grids_are_ladder_rungs():
    for task in TASKS.values():
        assert set(task.lr_grids) == set(OPTIMIZERS)
        for grid in task.lr_grids.values():
            indices = [LR_LADDER.index(rate) for rate in grid]
            assert indices == list(range(indices[0], indices[0] + len(grid)))


def test_next_rung_moves_along_ladder():
    assert dp_accuracy.next_rung(1e-3, 1) == 3e-3
    assert dp_accuracy.next_rung(1e-3, -1) == 3e-4
    assert dp_accuracy.next_rung(LR_LADDER[-1], 1) is None
    assert dp_accuracy.next_rung(LR_LADDER[0], -1) is None


def test_summarize_gives_mean_and_half_range():
    summary = dp_runs.summarize([0.80, 0.84])
    assert summary["mean"] == pytest.approx(0.82)
    assert summary["half_range"] == pytest.approx(0.02)
    assert dp_runs.format_mean(summary) == "0.820 ± 0.020"
    assert dp_runs.format_mean(dp_runs.summarize([0.5])) == "0.500"
    assert dp_runs.format_mean(None) == "failed"


def test_failed_run_sorts_below_every_grid_result():
    assert dp_accuracy.validation_accuracy({"failed": True}) == float("-inf")
    assert dp_accuracy.validation_accuracy({"validation_accuracy": 0.1}) == 0.1


def test_run_estimate_is_positive_for_every_task():
    for name in TASKS:
        assert dp_runs.estimate_run_seconds(make_config(task=name)) > 0


def fake_run(optimizer: str, rate: float, epsilon: float, seed: int, accuracy: float) -> dict:
    return {
        "config": {"optimizer": optimizer, "learning_rate": rate, "target_epsilon": epsilon, "seed": seed},
        "test_accuracy": accuracy,
        "validation_accuracy": accuracy,
        "curves": {"loss": [[1, 2.0], [2, 1.5]], "eval_accuracy": [[2, accuracy]], "epsilon": [[2, epsilon]]},
    }


def test_accuracy_plots_are_written(tmp_path):
    accuracy = {
        optimizer: {repr(e): {"test": dp_runs.summarize([0.5 + 0.01 * e, 0.52 + 0.01 * e])} for e in (1.0, 8.0)}
        for optimizer in OPTIMIZERS
    }
    report = {
        "settings": {"grid_epsilon": 8.0},
        "tasks": {
            "vit-fashion-mnist": {
                "accuracy": accuracy,
                "table": {optimizer: {repr(1e-3): {"validation_accuracy": 0.6}} for optimizer in OPTIMIZERS},
                "picks": {optimizer: 1e-3 for optimizer in OPTIMIZERS},
                "runs": [fake_run(optimizer, 1e-3, 8.0, 0, 0.6) for optimizer in OPTIMIZERS],
            }
        },
    }
    paths = dp_plots.plot_accuracy_report(report, tmp_path)
    assert sorted(path.name for path in paths) == [
        "accuracy_vs_epsilon.png", "lr_grid_vit-fashion-mnist.png", "training_curves_vit-fashion-mnist.png"
    ]
    for path in paths:
        assert path.stat().st_size > 0


def test_sensitivity_plots_are_written(tmp_path):
    report = {
        "task": "vit-fashion-mnist",
        "settings": {"epsilon": 8.0, "densities": [0.01, 0.05], "windows": [5, 10]},
        "learning_rate_picks": {optimizer: 1e-3 for optimizer in OPTIMIZERS},
        "density_window_test_accuracy": {"0.01/5": dp_runs.summarize([0.6, 0.62]), "0.01/10": None,
                                         "0.05/5": dp_runs.summarize([0.7]), "0.05/10": dp_runs.summarize([0.71])},
        "clip_norm_test_accuracy": {"dp-sgd": {"0.1": dp_runs.summarize([0.3]), "1.0": dp_runs.summarize([0.6])}},
    }
    paths = dp_plots.plot_sensitivity_report(report, tmp_path)
    assert [path.name for path in paths] == ["sensitivity_density_window.png", "sensitivity_clip_norm.png"]
