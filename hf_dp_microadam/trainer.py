"""`DPMicroAdamTrainer`: `transformers.Trainer` with differentially private training."""

from __future__ import annotations

import logging
import os

import datasets
import torch
from torch.utils.data import IterableDataset
from transformers import Trainer, TrainerCallback

from .accelerate_plugin import DPMicroAdamPlugin
from .arguments import DPTrainingArguments
from .engine import DPEngine
from .privacy.data_loader import LogicalBatch
from .privacy.losses import compute_per_example_losses

logger = logging.getLogger(__name__)

PRIVACY_REPORT_FILE = "privacy_report.json"


class _PrivacyBudgetCallback(TrainerCallback):
    """Stop training after the last step that the target epsilon allows."""

    def __init__(self, trainer: DPMicroAdamTrainer):
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        engine = self.trainer.dp_engine
        if engine is not None and engine.budget_exhausted and not control.should_training_stop:
            logger.warning(
                "Stopping at step %d: one more step would exceed target_epsilon=%g (epsilon spent: %.4g)",
                state.global_step, engine.config.target_epsilon, engine.epsilon,
            )
            control.should_training_stop = True
        return control


class DPMicroAdamTrainer(Trainer):
    """A `transformers.Trainer` that trains with differential privacy.

    It takes the Trainer's arguments with `DPTrainingArguments` in place of
    `TrainingArguments`. Each training step draws one Poisson logical batch (expected size
    `args.logical_batch_size`), computes per-example gradients micro-batch by micro-batch
    (at most `args.per_device_train_batch_size` examples each), clips them, adds Gaussian
    noise once, divides by the expected batch size and applies `args.dp_optimizer`. The
    accountant records one step per logical batch, epsilon is logged at every logging
    step, and training stops before a step that would exceed `args.target_epsilon`.

    What differs from `Trainer`:
    - the raw gradient norm (`grad_norm`) is never computed or logged, because it is not
      covered by the guarantee; training-loss logs are kept and are not covered either;
    - the model must compute its outputs from inputs without `labels`: the loss is
      computed here, one value per example, so that no example's loss depends on another;
    - checkpoints add `dp_state.pt` (accountant history, sampler and noise states), and
      resuming from a checkpoint without it is an error;
    - custom optimizers, `compute_loss_func`, label smoothing, DeepSpeed, FSDP and
      `torch_compile` are rejected.

    `privacy_report()` returns the privacy spent; `train()` also writes it to
    `output_dir/privacy_report.json`.

    Launched on several processes (`accelerate launch`, `torchrun`), each process trains
    on a disjoint share of every logical batch, rank 0 alone adds the noise, and epsilon is
    that of one process with the same settings (see docs/distributed.md).
    """

    def __init__(self, model=None, args: DPTrainingArguments | None = None, *positional, task: str | None = None,
                 **kwargs):
        if not isinstance(args, DPTrainingArguments):
            raise TypeError(
                "DPMicroAdamTrainer needs `args` to be a DPTrainingArguments (it holds the DP settings), got "
                f"{type(args).__name__}"
            )
        optimizers = kwargs.get("optimizers", (None, None))
        if optimizers is not None and optimizers[0] is not None:
            raise ValueError(
                "DPMicroAdamTrainer builds its own DP optimizer from args.dp_optimizer; do not pass `optimizers`"
            )
        if kwargs.get("optimizer_cls_and_kwargs") is not None:
            raise ValueError("DPMicroAdamTrainer builds its own DP optimizer; do not pass `optimizer_cls_and_kwargs`")
        if kwargs.get("compute_loss_func") is not None:
            raise ValueError(
                "compute_loss_func is not supported: the loss is computed per example so that each example's "
                "gradient can be clipped; pass `task` to choose the per-example loss"
            )
        super().__init__(model, args, *positional, **kwargs)
        self._check_trainer_setup()
        self.task = task
        self.dp_plugin = DPMicroAdamPlugin.from_training_arguments(self.args)
        self.dp_engine: DPEngine | None = None
        self._dp_train_dataset = None
        self._dp_collate_fn = None
        self.add_callback(_PrivacyBudgetCallback(self))

    def _check_trainer_setup(self) -> None:
        problems = []
        if self.is_deepspeed_enabled:
            problems.append("DeepSpeed is not supported")
        if self.is_fsdp_enabled:
            problems.append("FSDP is not supported")
        if self.args.torch_compile:
            problems.append("torch_compile is not supported with per-example gradient hooks")
        if self.args.label_smoothing_factor:
            problems.append("label_smoothing_factor is not supported by the per-example losses")
        if self.args.n_gpu > 1:
            problems.append(
                f"{self.args.n_gpu} GPUs in one process (torch.nn.DataParallel) are not supported; "
                "launch one process per device with `accelerate launch` or `torchrun`"
            )
        if problems:
            raise ValueError("DPMicroAdamTrainer cannot run this setup:\n  - " + "\n  - ".join(problems))

    # ---- Data ----

    def get_train_dataloader(self):
        """Return a loader of Poisson logical batches, each already split into collated micro-batches."""
        if self.train_dataset is None:
            raise ValueError("DPMicroAdamTrainer: training requires a train_dataset")
        if isinstance(self.train_dataset, IterableDataset):
            raise ValueError(
                "an IterableDataset cannot be Poisson sampled (each example must be drawn independently with "
                "probability B / N); use a map-style dataset such as datasets.Dataset"
            )
        if self.dp_engine is not None and self.dp_engine.accountant.steps > 0:
            raise RuntimeError(
                f"this trainer already took {self.dp_engine.accountant.steps} private steps; a second train() "
                "would restart epsilon at 0. Resume from a checkpoint or create a new trainer"
            )
        dataset, collate_fn = self.train_dataset, self.data_collator
        if isinstance(dataset, datasets.Dataset):
            dataset = self._remove_unused_columns(dataset, description="training")
        else:
            collate_fn = self._get_collator_with_removed_columns(collate_fn, description="training")

        run_length = {"max_steps": self.args.max_steps} if self.args.max_steps > 0 else {
            "num_epochs": self.args.num_train_epochs
        }
        self.dp_engine = self.dp_plugin.create_engine(
            num_examples=len(dataset), accelerator=self.accelerator, **run_length
        )
        self._dp_train_dataset, self._dp_collate_fn = dataset, collate_fn
        return self.dp_engine.make_data_loader(
            dataset,
            collate_fn=collate_fn,
            num_workers=self.args.dataloader_num_workers,
            pin_memory=self.args.dataloader_pin_memory,
        )

    def get_resumed_dataloader(self, dataloader, num_batches: int):
        # The sampler state restored from the checkpoint already continues where the
        # interrupted epoch stopped; skipping batches would draw them again.
        return dataloader

    # ---- Optimizer ----

    def create_optimizer(self, model=None):
        """Attach per-example gradient hooks (after the pre-flight check) and build the DP optimizer."""
        if self.optimizer is not None:
            return self.optimizer
        if self.dp_engine is None:
            raise RuntimeError("get_train_dataloader() must run before create_optimizer()")
        model = self.model if model is None else model
        self.dp_engine.attach(
            model, train_dataset=self._dp_train_dataset, collate_fn=self._dp_collate_fn, task=self.task
        )
        self.optimizer = self.dp_engine.make_optimizer(model)
        return self.optimizer

    # ---- Training step ----

    def training_step(self, model, inputs: LogicalBatch, num_items_in_batch=None) -> torch.Tensor:
        """Accumulate the clipped per-example gradients of one logical batch; return its mean loss.

        The noise, the normalization and the update happen in `optimizer.step()`, which the
        Trainer calls right after this method. The returned loss is the mean per-example
        loss of the whole logical batch, summed over all processes, so every process logs
        the value a single process would (NaN for an empty logical batch, which the
        Trainer's logging filter skips). It is not covered by the privacy guarantee.
        """
        # The unwrapped model: a DistributedDataParallel wrapper would all-reduce the raw,
        # unclipped gradients during backward.
        model = self.accelerator.unwrap_model(model)
        model.train()
        loss_sum = torch.zeros((), device=self.args.device)
        num_examples = 0
        for micro_batch in inputs:
            micro_batch = self._prepare_inputs(micro_batch)
            with self.compute_loss_context_manager():
                losses, _ = self.dp_engine.per_example_losses(model, micro_batch)
            self.dp_engine.backward(losses)
            loss_sum += losses.detach().float().sum()
            num_examples += losses.shape[0]
        totals = torch.stack([loss_sum, torch.tensor(float(num_examples), device=loss_sum.device)])
        if self.dp_engine.world_size > 1:
            # Every rank calls this once per logical step, including a rank whose share is empty.
            torch.distributed.all_reduce(totals)
        loss_sum, total_examples = totals[0], totals[1]
        if total_examples == 0:
            return torch.tensor(float("nan"), device=self.args.device)
        return loss_sum / total_examples

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """Return the mean of the per-example losses (used by evaluation), and the outputs if asked."""
        if self.dp_engine is not None:
            losses, outputs = self.dp_engine.per_example_losses(model, inputs)
        else:
            losses, outputs = compute_per_example_losses(
                model, inputs, task=self.task, token_reduction=self.args.loss_token_reduction
            )
        loss = losses.mean() if losses.numel() else losses.sum()
        return (loss, outputs) if return_outputs else loss

    def _get_num_items_in_batch(self, batch_samples, device):
        # Per-example losses never divide by a batch-wide token count.
        return None

    def _get_grad_norm(self, model, grad_norm=None):
        # The norm of the raw summed gradient is not private: never compute or log it.
        return None

    def floating_point_ops(self, inputs) -> int:
        if isinstance(inputs, LogicalBatch):
            return sum(super(DPMicroAdamTrainer, self).floating_point_ops(batch) for batch in inputs)
        return super().floating_point_ops(inputs)

    def _track_num_input_tokens(self, inputs):
        if isinstance(inputs, LogicalBatch):
            for batch in inputs:
                super()._track_num_input_tokens(batch)
            return
        super()._track_num_input_tokens(inputs)

    # ---- Logging, report, checkpoints ----

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        # Step logs carry "loss", and the summary at the end of training "train_loss".
        if self.dp_engine is not None and ("loss" in logs or "train_loss" in logs):
            logs["epsilon"] = self.dp_engine.epsilon
        super().log(logs, start_time)

    def log_metrics(self, split: str, metrics: dict) -> None:
        """Print metrics as `Trainer.log_metrics` does, with delta in scientific notation.

        The Trainer rounds every float to 4 decimals, which would print a delta of 3.9e-05
        as 0.0.
        """
        formatted = dict(metrics)
        if isinstance(formatted.get("delta"), float):
            formatted["delta"] = f"{formatted['delta']:.4g}"
        super().log_metrics(split, formatted)

    def privacy_report(self):
        """Return the `PrivacyReport` of the privacy spent so far."""
        if self.dp_engine is None:
            raise RuntimeError("no training has run yet: call train() first")
        return self.dp_engine.privacy_report()

    def train(self, resume_from_checkpoint=None, trial=None, ignore_keys_for_eval=None, **kwargs):
        """Train as `Trainer.train`, then write `privacy_report.json` and add epsilon to the metrics."""
        output = super().train(
            resume_from_checkpoint=resume_from_checkpoint, trial=trial, ignore_keys_for_eval=ignore_keys_for_eval,
            **kwargs,
        )
        self._warn_if_replicas_differ(f"end of training at step {self.state.global_step}")
        report = self.privacy_report()
        if self.args.should_save:
            os.makedirs(self.args.output_dir, exist_ok=True)
            report.save_json(os.path.join(self.args.output_dir, PRIVACY_REPORT_FILE))
        logger.info("Privacy spent: %s", report)
        output.metrics["epsilon"] = report.epsilon
        output.metrics["delta"] = report.delta
        return output

    def _warn_if_replicas_differ(self, when: str) -> None:
        # Every rank reaches this point, because the check gathers one digest per rank.
        if self.dp_engine is not None and not self.dp_engine.replicas_in_sync():
            logger.warning(
                "%s: the trainable parameters differ across the %d processes although every process applied "
                "the same privatized gradient. The privacy guarantee is not affected, but only rank 0's model "
                "is saved. On CUDA, torch.use_deterministic_algorithms(True) makes the update rules add in a "
                "fixed order",
                when, self.dp_engine.world_size,
            )

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        self._warn_if_replicas_differ(f"checkpoint {output_dir}")
        super()._save_optimizer_and_scheduler(output_dir)
        if self.dp_engine is not None and self.args.should_save:
            self.dp_engine.save(output_dir)

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is not None:
            self.dp_engine.load(checkpoint)
            logger.info(
                "Resumed the privacy state from %s: %d steps taken, epsilon %.4g",
                checkpoint, self.dp_engine.accountant.steps, self.dp_engine.epsilon,
            )
