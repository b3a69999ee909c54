"""Training scenarios run by the multi-process tests, as one process or as each of several.

Launch it with `python`, `torchrun` or `accelerate launch`. Every process writes what it
saw to `<output>/results/<scenario>/rank<r>.pt`, and the tests compare those files between
a one-process and a two-process launch. Scenarios (run in the order given):

    straight          DPMicroAdamTrainer with dp-microadam for MAX_STEPS steps, then evaluation
    interrupted       the same run, stopped right after the checkpoint at SAVE_STEP
    resumed           a new trainer resumed from the `interrupted` checkpoint
    straight_adam     `straight` with dp-adam
    interrupted_adam  `interrupted` with dp-adam
    foreign           a dp-adam trainer resumed from --foreign-checkpoint, an `interrupted_adam`
                      checkpoint saved by another number of processes
    plugin            a custom loop with DPMicroAdamPlugin (dp-microadam) on a small expected
                      batch size, so that some processes get an empty share of a logical batch
    plugin_resumed    the custom loop saved after SAVE_STEP steps and continued in a new loop
    plugin_adam       `plugin` with dp-adam
    sampling          the logical batches of SAMPLING_EPOCHS epochs of an unseeded
                      PoissonBatchSampler (run it after a scenario that set up torch.distributed)
    mismatch          a DPEngine given an accelerator that sees fewer processes than torch.distributed

The dp-adam scenarios are the ones compared across process counts. MicroAdam rounds its
window to bf16, quantizes its error feedback to 4 bits and selects entries by top-k, so
a last-bit difference in the summed gradient (the all-reduce adds in another order) mostly
vanishes but can cross a rounding or selection boundary and change a parameter by far more
than float tolerance.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import sys
from pathlib import Path

import torch

TESTS_DIR = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(TESTS_DIR))

import datasets  # noqa: E402
import numpy as np  # noqa: E402
from accelerate import Accelerator  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

from hf_dp_microadam import DPMicroAdamPlugin, DPMicroAdamTrainer, DPTrainingArguments  # noqa: E402
from hf_dp_microadam.engine import DPEngine  # noqa: E402
from hf_dp_microadam.privacy.sampling import PoissonBatchSampler  # noqa: E402
from trainer_helpers import pad_text_batch, text_classification_dataset, tiny_bert_classifier  # noqa: E402

NUM_EXAMPLES = 48
LOGICAL_BATCH_SIZE = 8
MAX_STEPS = 8  # crosses the end of the first epoch (48 / 8 = 6 steps)
SAVE_STEP = 3
# With this seed the logical batch of step 5 has one example, so rank 1's share is empty.
DP_SEED = 33
PLUGIN_BATCH_SIZE = 2
# With this seed the plugin's logical batches have sizes 3, 2, 1, 1, 0, 1, 2, 3.
PLUGIN_SEED = 1
SAMPLING_NUM_EXAMPLES = 300
SAMPLING_BATCH_SIZE = 30
SAMPLING_EPOCHS = 40  # 10 steps per epoch


def train_dataset() -> datasets.Dataset:
    dataset = text_classification_dataset(NUM_EXAMPLES)
    return dataset.add_column("example_id", list(range(NUM_EXAMPLES)))


def collate(examples: list[dict]) -> dict:
    """Pad like `pad_text_batch` and keep the example ids of training examples."""
    batch = pad_text_batch(examples)
    if "example_id" in examples[0]:
        batch["example_id"] = torch.tensor([example["example_id"] for example in examples])
    return batch


def accuracy(eval_prediction) -> dict:
    predictions = np.argmax(eval_prediction.predictions, axis=-1)
    return {"accuracy": float((predictions == eval_prediction.label_ids).mean())}


class RecordingTrainer(DPMicroAdamTrainer):
    """Record the example ids of this process's share of every logical batch, then train on it."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.shares: list[list[int]] = []

    def training_step(self, model, inputs, num_items_in_batch=None):
        share = []
        for micro_batch in inputs:
            share.extend(micro_batch.pop("example_id").tolist())
        self.shares.append(share)
        return super().training_step(model, inputs, num_items_in_batch)


class StopAfter(TrainerCallback):
    """Stop training after a given step, as if the job had been killed there."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True
        return control


class WriteRecorder:
    """Record the files this process writes under a folder.

    An audit hook receives every Python-level `open()` for writing. `torch.save` writes
    through C++, so it is wrapped as well.
    """

    def __init__(self, root: Path):
        self.root = str(root.resolve())
        self.paths: list[str] = []
        sys.addaudithook(self._audit)
        original_save = torch.save

        def recording_save(obj, f, *args, **kwargs):
            if isinstance(f, (str, os.PathLike)):
                self._record(f)
            return original_save(obj, f, *args, **kwargs)

        torch.save = recording_save

    def _audit(self, event, args):
        if event != "open" or not isinstance(args[0], (str, os.PathLike)):
            return
        mode, flags = args[1], args[2]
        writes = (mode is not None and any(letter in mode for letter in "wax+")) or (
            mode is None and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)
        )
        if writes:
            self._record(args[0])

    def _record(self, path):
        path = os.path.abspath(os.fspath(path))
        if path.startswith(self.root):
            self.paths.append(os.path.relpath(path, self.root))


def training_arguments(output_dir: Path, **overrides) -> DPTrainingArguments:
    settings = dict(
        output_dir=str(output_dir),
        logical_batch_size=LOGICAL_BATCH_SIZE,
        per_device_train_batch_size=3,
        per_device_eval_batch_size=5,
        noise_multiplier=1.0,
        learning_rate=1e-2,
        max_steps=MAX_STEPS,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        dp_seed=DP_SEED,
        seed=0,
        use_cpu=True,
        disable_tqdm=True,
        remove_unused_columns=False,
        dataloader_drop_last=False,
    )
    settings.update(overrides)
    return DPTrainingArguments(**settings)


def trainer_result(trainer: RecordingTrainer, recorder: WriteRecorder, **extra) -> dict:
    engine = trainer.dp_engine
    report = trainer.privacy_report()
    result = {
        "world_size": engine.world_size,
        "rank": engine.rank,
        "distributed_type": str(trainer.accelerator.distributed_type),
        "num_processes": trainer.accelerator.num_processes,
        "shares": trainer.shares,
        "global_step": trainer.state.global_step,
        "params": {name: p.detach().clone() for name, p in trainer.model.named_parameters()},
        "epsilon": report.epsilon,
        "report": dataclasses.asdict(report),
        "accountant_steps": engine.accountant.steps,
        "noise_draws": engine.optimizer.noise_draws,
        "losses": [entry["loss"] for entry in trainer.state.log_history if "loss" in entry],
        "replicas_in_sync": engine.replicas_in_sync(),
        "written": list(recorder.paths),
    }
    result.update(extra)
    return result


def make_trainer(output_dir: Path, **overrides) -> RecordingTrainer:
    return RecordingTrainer(
        model=tiny_bert_classifier(),
        args=training_arguments(output_dir, **overrides),
        train_dataset=train_dataset(),
        eval_dataset=text_classification_dataset(17, seed=1),
        data_collator=collate,
        compute_metrics=accuracy,
    )


def run_straight(output: Path, recorder: WriteRecorder, options, *, name: str, update_rule: str) -> dict:
    trainer = make_trainer(output / name, dp_optimizer=update_rule)
    trainer.train()
    metrics = trainer.evaluate()
    return trainer_result(trainer, recorder, eval_metrics=metrics)


def run_interrupted(output: Path, recorder: WriteRecorder, options, *, name: str, update_rule: str) -> dict:
    trainer = make_trainer(output / name, dp_optimizer=update_rule, save_strategy="steps", save_steps=SAVE_STEP)
    trainer.add_callback(StopAfter(SAVE_STEP))
    trainer.train()
    return trainer_result(trainer, recorder)


def run_resumed(output: Path, recorder: WriteRecorder, options) -> dict:
    trainer = make_trainer(output / "resumed", dp_optimizer="dp-microadam")
    trainer.train(resume_from_checkpoint=str(output / "interrupted" / f"checkpoint-{SAVE_STEP}"))
    return trainer_result(trainer, recorder)


def run_foreign(output: Path, recorder: WriteRecorder, options) -> dict:
    trainer = make_trainer(output / "foreign", dp_optimizer="dp-adam")
    trainer.train(resume_from_checkpoint=options.foreign_checkpoint)
    return trainer_result(trainer, recorder)


def _prepare_plugin_loop(accelerator: Accelerator, model_seed: int, update_rule: str = "dp-microadam"):
    plugin = DPMicroAdamPlugin(
        optimizer=update_rule,
        noise_multiplier=1.0,
        expected_batch_size=PLUGIN_BATCH_SIZE,
        micro_batch_size=3,
        learning_rate=1e-2,
        seed=PLUGIN_SEED,
    )
    model, optimizer, train_loader = plugin.prepare(
        tiny_bert_classifier(seed=model_seed), train_dataset(), max_steps=MAX_STEPS, collate_fn=collate,
        accelerator=accelerator,
    )
    model.train()
    return plugin, model, optimizer, train_loader


def _run_plugin_steps(plugin, model, optimizer, train_loader, num_steps: int) -> list[list[int]]:
    """Train `num_steps` logical steps; return this process's share of each one."""
    shares = []
    for logical_batch in train_loader:
        if len(shares) == num_steps:
            break
        share = []
        for micro_batch in logical_batch:
            share.extend(micro_batch.pop("example_id").tolist())
            losses, _ = plugin.per_example_losses(model, micro_batch)
            plugin.backward(losses)
        shares.append(share)
        optimizer.step()
        optimizer.zero_grad()
    return shares


def _plugin_result(plugin, model, shares, recorder: WriteRecorder) -> dict:
    engine = plugin.engine
    return {
        "world_size": engine.world_size,
        "rank": engine.rank,
        "shares": shares,
        "params": {name: p.detach().clone() for name, p in model.named_parameters()},
        "epsilon": plugin.privacy_report().epsilon,
        "accountant_steps": engine.accountant.steps,
        "noise_draws": engine.optimizer.noise_draws,
        "replicas_in_sync": engine.replicas_in_sync(),
        "written": list(recorder.paths),
    }


def run_plugin(output: Path, recorder: WriteRecorder, options, *, update_rule: str) -> dict:
    accelerator = Accelerator(cpu=True)
    # A different initialization on every rank: prepare() must copy rank 0's parameters.
    plugin, model, optimizer, train_loader = _prepare_plugin_loop(
        accelerator, accelerator.process_index, update_rule
    )
    shares = _run_plugin_steps(plugin, model, optimizer, train_loader, MAX_STEPS)
    return _plugin_result(plugin, model, shares, recorder)


def run_plugin_resumed(output: Path, recorder: WriteRecorder, options) -> dict:
    """Save after SAVE_STEP steps as a custom loop would, then continue in a new loop from the files."""
    accelerator = Accelerator(cpu=True)
    checkpoint = output / "plugin_checkpoint"
    checkpoint.mkdir(exist_ok=True)
    plugin, model, optimizer, train_loader = _prepare_plugin_loop(accelerator, accelerator.process_index)
    first_shares = _run_plugin_steps(plugin, model, optimizer, train_loader, SAVE_STEP)
    plugin.save(str(checkpoint))
    if accelerator.is_main_process:
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, checkpoint / "training.pt")
    accelerator.wait_for_everyone()

    plugin, model, optimizer, train_loader = _prepare_plugin_loop(accelerator, 99)
    saved = torch.load(checkpoint / "training.pt", weights_only=False)
    model.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    plugin.load(str(checkpoint))
    shares = _run_plugin_steps(plugin, model, optimizer, train_loader, MAX_STEPS - SAVE_STEP)
    return _plugin_result(plugin, model, shares, recorder) | {"first_shares": first_shares}


def run_sampling(output: Path, recorder: WriteRecorder, options) -> dict:
    world_size = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    sampler = PoissonBatchSampler(
        SAMPLING_NUM_EXAMPLES, SAMPLING_BATCH_SIZE, num_replicas=world_size, rank=rank
    )
    shares = [share for _ in range(SAMPLING_EPOCHS) for share in sampler]
    return {"world_size": world_size, "rank": rank, "shares": shares}


class _OneProcessAccelerator:
    """Stands in for an accelerator that was set up without the distributed process group."""

    num_processes = 1
    process_index = 0
    distributed_type = "NO"
    gradient_accumulation_steps = 1


def run_mismatch(output: Path, recorder: WriteRecorder, options) -> dict:
    plugin = DPMicroAdamPlugin(noise_multiplier=1.0, expected_batch_size=8, seed=DP_SEED)
    try:
        DPEngine(plugin, num_examples=NUM_EXAMPLES, max_steps=2, accelerator=_OneProcessAccelerator())
    except ValueError as error:
        return {"error": str(error)}
    return {"error": None}


SCENARIOS = {
    "straight": functools.partial(run_straight, name="straight", update_rule="dp-microadam"),
    "interrupted": functools.partial(run_interrupted, name="interrupted", update_rule="dp-microadam"),
    "resumed": run_resumed,
    "straight_adam": functools.partial(run_straight, name="straight_adam", update_rule="dp-adam"),
    "interrupted_adam": functools.partial(run_interrupted, name="interrupted_adam", update_rule="dp-adam"),
    "foreign": run_foreign,
    "plugin": functools.partial(run_plugin, update_rule="dp-microadam"),
    "plugin_resumed": run_plugin_resumed,
    "plugin_adam": functools.partial(run_plugin, update_rule="dp-adam"),
    "sampling": run_sampling,
    "mismatch": run_mismatch,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, required=True, help="folder for the results and checkpoints")
    parser.add_argument("--scenarios", nargs="+", choices=sorted(SCENARIOS), required=True)
    parser.add_argument("--foreign-checkpoint", help="checkpoint for the `foreign` scenario")
    options = parser.parse_args()

    torch.set_num_threads(1)
    options.output.mkdir(parents=True, exist_ok=True)
    recorder = WriteRecorder(options.output)
    for name in options.scenarios:
        recorder.paths.clear()
        result = SCENARIOS[name](options.output, recorder, options)
        rank = int(os.environ.get("RANK", "0"))
        result_dir = options.output / "results" / name
        result_dir.mkdir(parents=True, exist_ok=True)
        torch.save(result, result_dir / f"rank{rank}.pt")

    # Without this, a process sometimes aborted at exit ("terminate called without an active
    # exception", torch 2.13 with gloo) after all its work was done.
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
