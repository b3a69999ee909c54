"""Private training on two CPU processes against the same run on one process.

The module launches `dp_worker.py` four times (about 1.5 minutes on two cores):

1. `python`, one process: Trainer runs with dp-microadam and dp-adam, an interrupted dp-adam
   run with its checkpoint, and plugin loops with both update rules;
2. `accelerate launch --config_file configs/accelerate/multi_cpu.yaml`, two processes: the
   same Trainer runs, a dp-microadam run interrupted and resumed, and a dp-adam run resumed
   from the one-process checkpoint;
3. `torchrun --standalone --nproc_per_node 2`: the plugin loops, the dp-microadam one also
   resumed from its own checkpoint, an unseeded sampler over 400 logical batches, and an
   engine whose accelerator disagrees with torch.distributed;
4. `python`, one process: a dp-adam run resumed from the two-process checkpoint.

Between the ranks of one launch, and between a resumed run and an uninterrupted one on the
same number of processes, parameters must match bit for bit. Between process counts the
all-reduce adds the clipped sums in another order, so parameters are compared with a float
tolerance, and only on dp-adam runs. MicroAdam's bf16 window, 4-bit error feedback and
top-k can turn a last-bit difference into a larger one (see dp_worker.py). The dp-microadam
runs are compared across process counts on everything else: logical batches, epsilon and
noise draws.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import dp_worker

pytestmark = pytest.mark.multiprocess

REPO_ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(dp_worker.__file__).resolve()
MULTI_CPU_CONFIG = REPO_ROOT / "configs" / "accelerate" / "multi_cpu.yaml"
WORLD_SIZE = 2
LAUNCH_TIMEOUT_S = 600
PARAMETER_TOLERANCE = dict(rtol=1e-5, atol=1e-6)


@dataclass
class Launch:
    """Results of one launch: `results[scenario][rank]` is the dict that rank saved."""

    output: Path
    results: dict[str, list[dict]]


def _launch(command: list[str], output: Path, scenarios: list[str], extra: list[str] = ()) -> Launch:
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = "1"
    env["GLOO_SOCKET_IFNAME"] = "lo"
    full_command = command + [str(WORKER), "--output", str(output), "--scenarios", *scenarios, *extra]
    completed = subprocess.run(
        full_command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S
    )
    if completed.returncode != 0:
        raise AssertionError(
            f"launch failed with exit code {completed.returncode}: {' '.join(full_command)}\n"
            f"{(completed.stdout + completed.stderr)[-6000:]}"
        )
    results = {}
    for scenario in scenarios:
        files = sorted((output / "results" / scenario).glob("rank*.pt"))
        results[scenario] = [torch.load(path, weights_only=False) for path in files]
    return Launch(output, results)


@dataclass
class Runs:
    single: Launch
    accelerate: Launch
    torchrun: Launch
    single_from_two: Launch


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Runs:
    root = tmp_path_factory.mktemp("distributed")
    python = [sys.executable]
    checkpoint = f"checkpoint-{dp_worker.SAVE_STEP}"
    single = _launch(
        python, root / "single", ["straight", "straight_adam", "interrupted_adam", "plugin", "plugin_adam"]
    )
    accelerate = _launch(
        python + ["-m", "accelerate.commands.launch", "--config_file", str(MULTI_CPU_CONFIG)],
        root / "accelerate",
        ["straight", "interrupted", "resumed", "straight_adam", "interrupted_adam", "foreign"],
        ["--foreign-checkpoint", str(root / "single" / "interrupted_adam" / checkpoint)],
    )
    torchrun = _launch(
        python + ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(WORLD_SIZE)],
        root / "torchrun",
        ["plugin", "plugin_resumed", "plugin_adam", "sampling", "mismatch"],
    )
    single_from_two = _launch(
        python,
        root / "single_from_two",
        ["foreign"],
        ["--foreign-checkpoint", str(root / "accelerate" / "interrupted_adam" / checkpoint)],
    )
    return Runs(single, accelerate, torchrun, single_from_two)


def _assert_parameters_close(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    for name, value in expected.items():
        torch.testing.assert_close(
            actual[name], value, **PARAMETER_TOLERANCE, msg=lambda message, name=name: f"{name}: {message}"
        )


def _assert_ranks_bit_identical(ranks: list[dict]) -> None:
    for name, value in ranks[0]["params"].items():
        assert torch.equal(ranks[1]["params"][name], value), name
    assert all(rank["replicas_in_sync"] for rank in ranks)


def _assert_shares_split_the_logical_batches(ranks: list[dict], single_shares: list[list[int]]) -> None:
    """Check that the ranks' shares are disjoint, balanced, and together the one-process batch."""
    assert len(ranks[0]["shares"]) == len(ranks[1]["shares"]) == len(single_shares)
    for step, (share0, share1, logical_batch) in enumerate(zip(ranks[0]["shares"], ranks[1]["shares"], single_shares)):
        assert not set(share0) & set(share1), f"step {step}: an example is on both ranks"
        assert len(share0) == len(set(share0)), f"step {step}: repeated example on rank 0"
        assert len(share1) == len(set(share1)), f"step {step}: repeated example on rank 1"
        assert sorted(share0 + share1) == sorted(logical_batch), f"step {step}: the shares are not the logical batch"
        assert abs(len(share0) - len(share1)) <= 1, f"step {step}: unbalanced shares"


# ---- Launchers ----


def test_accelerate_launch_starts_two_cpu_processes(runs):
    ranks = runs.accelerate.results["straight"]
    assert [rank["rank"] for rank in ranks] == [0, 1]
    for rank in ranks:
        assert rank["world_size"] == WORLD_SIZE
        assert rank["num_processes"] == WORLD_SIZE
        assert rank["distributed_type"] == "DistributedType.MULTI_CPU"


def test_torchrun_starts_two_processes(runs):
    ranks = runs.torchrun.results["plugin"]
    assert [rank["rank"] for rank in ranks] == [0, 1]
    assert all(rank["world_size"] == WORLD_SIZE for rank in ranks)


# ---- Trainer ----


def test_trainer_matches_single_process(runs):
    single = runs.single.results["straight_adam"][0]
    for rank in runs.accelerate.results["straight_adam"]:
        assert rank["global_step"] == single["global_step"] == dp_worker.MAX_STEPS
        _assert_parameters_close(rank["params"], single["params"])


def test_trainer_ranks_stay_bit_identical(runs):
    for scenario in ("straight", "interrupted", "resumed", "straight_adam", "interrupted_adam", "foreign"):
        _assert_ranks_bit_identical(runs.accelerate.results[scenario])


def test_trainer_shares_split_logical_batches(runs):
    for scenario in ("straight", "straight_adam"):
        ranks = runs.accelerate.results[scenario]
        _assert_shares_split_the_logical_batches(ranks, runs.single.results[scenario][0]["shares"])
        # The seed gives a one-example logical batch: rank 1 must still join the all-reduce.
        assert any(len(share) == 0 for share in ranks[1]["shares"])


def test_trainer_epsilon_matches_single_process(runs):
    single = runs.single.results["straight"][0]
    ranks = runs.accelerate.results["straight"]
    for rank in ranks:
        assert rank["epsilon"] == single["epsilon"]
        assert rank["accountant_steps"] == dp_worker.MAX_STEPS
        assert rank["report"] == single["report"]
    # One noise draw per logical step, on rank 0 only.
    assert [rank["noise_draws"] for rank in ranks] == [dp_worker.MAX_STEPS, 0]


def test_trainer_logs_logical_batch_loss(runs):
    for scenario in ("straight", "straight_adam"):
        ranks = runs.accelerate.results[scenario]
        single_losses = runs.single.results[scenario][0]["losses"]
        assert ranks[0]["losses"] == ranks[1]["losses"]
        # The first loss comes before any update, so it does not depend on the update rule.
        assert ranks[0]["losses"][0] == pytest.approx(single_losses[0], rel=1e-6)
    adam_losses = runs.accelerate.results["straight_adam"][0]["losses"]
    assert adam_losses == pytest.approx(runs.single.results["straight_adam"][0]["losses"], rel=1e-5)


def test_trainer_evaluation_same_on_every_rank(runs):
    single = runs.single.results["straight_adam"][0]["eval_metrics"]
    ranks = [rank["eval_metrics"] for rank in runs.accelerate.results["straight_adam"]]
    assert ranks[0]["eval_accuracy"] == ranks[1]["eval_accuracy"] == single["eval_accuracy"]
    assert ranks[0]["eval_loss"] == ranks[1]["eval_loss"]
    # transformers averages per-batch mean losses, and accelerate pads the last batch of each
    # rank with repeated examples, so eval_loss is close to, not equal to, one process's value.
    assert ranks[0]["eval_loss"] == pytest.approx(single["eval_loss"], rel=1e-2)


def test_only_rank0_writes_files(runs):
    straight = runs.accelerate.results["straight"]
    assert straight[0]["written"] == ["straight/privacy_report.json"]
    assert straight[1]["written"] == []

    checkpoint = f"interrupted/checkpoint-{dp_worker.SAVE_STEP}"
    interrupted = runs.accelerate.results["interrupted"]
    assert f"{checkpoint}/dp_state.pt" in interrupted[0]["written"]
    assert "interrupted/privacy_report.json" in interrupted[0]["written"]
    # transformers saves the RNG state of every process, so that dropout resumes exactly.
    assert interrupted[1]["written"] == [f"{checkpoint}/rng_state_1.pth"]


# ---- Checkpoints ----


def test_resume_continues_uninterrupted_run_exactly(runs):
    straight = runs.accelerate.results["straight"]
    resumed = runs.accelerate.results["resumed"]
    for straight_rank, resumed_rank in zip(straight, resumed):
        for name, value in straight_rank["params"].items():
            assert torch.equal(resumed_rank["params"][name], value), name
        assert resumed_rank["epsilon"] == straight_rank["epsilon"]
        assert resumed_rank["accountant_steps"] == dp_worker.MAX_STEPS
        assert resumed_rank["shares"] == straight_rank["shares"][dp_worker.SAVE_STEP:]
    assert [rank["noise_draws"] for rank in resumed] == [dp_worker.MAX_STEPS, 0]


def test_resume_on_two_processes_from_one(runs):
    single = runs.single.results["straight_adam"][0]
    foreign = runs.accelerate.results["foreign"]
    for rank in foreign:
        _assert_parameters_close(rank["params"], single["params"])
        assert rank["epsilon"] == single["epsilon"]
        assert rank["accountant_steps"] == dp_worker.MAX_STEPS
    _assert_shares_split_the_logical_batches(foreign, single["shares"][dp_worker.SAVE_STEP:])


def test_resume_on_one_process_from_two(runs):
    two_processes = runs.accelerate.results["straight_adam"]
    resumed = runs.single_from_two.results["foreign"][0]
    _assert_parameters_close(resumed["params"], two_processes[0]["params"])
    assert resumed["epsilon"] == two_processes[0]["epsilon"]
    assert resumed["world_size"] == 1
    logical_batches = [sorted(share0 + share1) for share0, share1 in zip(two_processes[0]["shares"],
                                                                          two_processes[1]["shares"])]
    assert [sorted(share) for share in resumed["shares"]] == logical_batches[dp_worker.SAVE_STEP:]


# ---- Custom loop with the plugin ----


def test_plugin_loop_matches_single_process(runs):
    single = runs.single.results["plugin_adam"][0]
    for rank in runs.torchrun.results["plugin_adam"]:
        _assert_parameters_close(rank["params"], single["params"])


def test_plugin_loop_ranks_agree(runs):
    for scenario in ("plugin", "plugin_adam"):
        single = runs.single.results[scenario][0]
        ranks = runs.torchrun.results[scenario]
        for rank in ranks:
            assert rank["epsilon"] == single["epsilon"]
            assert rank["accountant_steps"] == dp_worker.MAX_STEPS
        _assert_ranks_bit_identical(ranks)
        assert [rank["noise_draws"] for rank in ranks] == [dp_worker.MAX_STEPS, 0]


def test_plugin_loop_handles_empty_shares(runs):
    ranks = runs.torchrun.results["plugin"]
    _assert_shares_split_the_logical_batches(ranks, runs.single.results["plugin"][0]["shares"])
    shares = list(zip(ranks[0]["shares"], ranks[1]["shares"]))
    assert any(not share0 and not share1 for share0, share1 in shares), "no noise-only step"
    assert any(share0 and not share1 for share0, share1 in shares), "no step with only rank 1 empty"


def test_plugin_loop_resume_continues_exactly(runs):
    straight = runs.torchrun.results["plugin"]
    resumed = runs.torchrun.results["plugin_resumed"]
    for straight_rank, resumed_rank in zip(straight, resumed):
        for name, value in straight_rank["params"].items():
            assert torch.equal(resumed_rank["params"][name], value), name
        assert resumed_rank["epsilon"] == straight_rank["epsilon"]
        assert resumed_rank["first_shares"] == straight_rank["shares"][: dp_worker.SAVE_STEP]
        assert resumed_rank["shares"] == straight_rank["shares"][dp_worker.SAVE_STEP:]
    assert set(resumed[0]["written"]) == {"plugin_checkpoint/dp_state.pt", "plugin_checkpoint/training.pt"}
    assert resumed[1]["written"] == []


# ---- Sampler ----


def test_unseeded_sampler_shares_one_logical_batch(runs):
    ranks = runs.torchrun.results["sampling"]
    num_steps = dp_worker.SAMPLING_EPOCHS * (dp_worker.SAMPLING_NUM_EXAMPLES // dp_worker.SAMPLING_BATCH_SIZE)
    assert len(ranks[0]["shares"]) == len(ranks[1]["shares"]) == num_steps
    for step, (share0, share1) in enumerate(zip(ranks[0]["shares"], ranks[1]["shares"])):
        assert not set(share0) & set(share1), f"step {step}: an example is on both ranks"
        # Rank r keeps positions r, r + 2, ... of the sorted logical batch.
        logical_batch = sorted(share0 + share1)
        assert share0 == logical_batch[0::2], f"step {step}"
        assert share1 == logical_batch[1::2], f"step {step}"


def test_unseeded_sampler_inclusion_frequency(runs):
    """Each example's count over T steps is Binomial(T, q); the bounds below fail with probability < 1e-8.

    The seed comes from os.urandom, so the bounds are wide: 8 standard deviations for the
    total and for the chi-square statistic. A q off by a factor of the process count, or
    an example on two ranks, still lands far outside them.
    """
    ranks = runs.torchrun.results["sampling"]
    num_examples = dp_worker.SAMPLING_NUM_EXAMPLES
    sample_rate = dp_worker.SAMPLING_BATCH_SIZE / num_examples
    num_steps = len(ranks[0]["shares"])
    counts = Counter(index for rank in ranks for share in rank["shares"] for index in share)
    mean = num_steps * sample_rate
    variance = num_steps * sample_rate * (1 - sample_rate)

    assert set(counts) <= set(range(num_examples))
    # P(an example never drawn) = 0.9^400 < 1e-18.
    assert len(counts) == num_examples

    total = sum(counts.values())
    total_std = math.sqrt(num_examples * variance)
    assert abs(total - num_examples * mean) < 8 * total_std

    # Sum of squared standardized counts: chi-square with N degrees of freedom (normal approximation).
    chi_square = sum((counts[index] - mean) ** 2 / variance for index in range(num_examples))
    assert abs(chi_square - num_examples) < 8 * math.sqrt(2 * num_examples)


# ---- Process checks ----


def test_accelerator_disagreeing_with_process_group_rejected(runs):
    for rank in runs.torchrun.results["mismatch"]:
        assert rank["error"] is not None, "an accelerator that sees 1 of 2 processes was accepted"
        assert "torch.distributed process group has 2" in rank["error"]
        assert "use_cpu=True" in rank["error"]
