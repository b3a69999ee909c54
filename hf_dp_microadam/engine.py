"""`DPEngine`: the runtime of private training, assembled from the configuration of a plugin.

It owns the pieces whose states make up the privacy guarantee: the per-example gradient
hooks on the model, the Poisson sampler, the DP optimizer (clipping and noise) and the
accountant. `DPMicroAdamPlugin.prepare()` and `DPMicroAdamTrainer` both go through it, so
there is one implementation of the private step.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import math
import os
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from .privacy.accounting import PrivacyAccountant, calibrate_noise_multiplier, default_delta
from .privacy.data_loader import make_logical_batch_loader
from .privacy.dp_optimizer import make_dp_optimizer
from .privacy.grad_sample import PerExampleGradients
from .privacy.losses import compute_per_example_losses
from .privacy.sampling import PoissonBatchSampler, check_dataset_supports_poisson

if TYPE_CHECKING:
    from .accelerate_plugin import DPMicroAdamPlugin

logger = logging.getLogger(__name__)

DP_STATE_FILE = "dp_state.pt"
_STATE_VERSION = 1


class DPSettingsChangedError(ValueError):
    """A checkpoint's privacy state was saved by a run with other DP settings."""


class PrivacyBudgetExhaustedError(RuntimeError):
    """Raised instead of taking a step that would spend more than the target epsilon."""


def _resolve_processes(accelerator) -> tuple[int, int]:
    """Return (world size, rank) of the run, after checking that accelerate and torch.distributed agree.

    The sampler shards each logical batch by these numbers, while the DP optimizer
    all-reduces over the torch.distributed process group. If the two disagreed, every
    process could train on the whole logical batch and the all-reduce would count each
    example once per process, so the noise would no longer cover one example's change.
    """
    if dist.is_available() and dist.is_initialized():
        group_size, group_rank = dist.get_world_size(), dist.get_rank()
    else:
        group_size, group_rank = 1, 0
    if accelerator is None:
        return group_size, group_rank

    world_size, rank = accelerator.num_processes, accelerator.process_index
    if world_size != group_size or (world_size > 1 and rank != group_rank):
        raise ValueError(
            f"the accelerator runs {world_size} process(es) (distributed type "
            f"{accelerator.distributed_type}), but the torch.distributed process group has {group_size}: "
            "each process would train on whole logical batches of its own. On a machine without GPUs, set "
            "use_cpu=True in the training arguments (Accelerator(cpu=True) in a custom loop) or export "
            "ACCELERATE_USE_CPU=true, so that accelerate runs its multi-CPU mode over gloo"
        )
    accumulation_steps = getattr(accelerator, "gradient_accumulation_steps", 1)
    if accumulation_steps > 1:
        raise ValueError(
            f"the accelerator has gradient_accumulation_steps={accumulation_steps}, but one logical batch is "
            "one optimizer step: accelerate would skip optimizer.step() while the clipped sums of several "
            "logical batches pile up under one noise draw. Create the Accelerator without gradient "
            "accumulation and raise expected_batch_size instead"
        )
    return world_size, rank


class DPEngine:
    """Runtime of one private training run: hooks, sampler, DP optimizer and accountant.

    Args:
        config: the plugin holding the DP settings.
        num_examples: number of training examples N; the sample rate is B / N.
        max_steps, num_epochs: the length of the run, one of the two. A calibrated noise
            multiplier spends `target_epsilon` at exactly this number of logical steps.
        accelerator: optional `accelerate.Accelerator`; its process count and rank shard
            each logical batch across processes. Without one, the torch.distributed
            process group (if initialized) gives them.

    With several processes, every process draws the same logical batch and keeps a
    disjoint share of it. The clipped sums are all-reduced and rank 0 alone adds the
    noise, so the guarantee and the accounting are those of one process with the same
    settings. Only rank 0 writes the privacy state.

    NOTE: several processes have been tested on CPU with gloo only; NCCL on GPUs has not run.
    """

    def __init__(
        self,
        config: DPMicroAdamPlugin,
        *,
        num_examples: int,
        max_steps: int | None = None,
        num_epochs: float | None = None,
        accelerator=None,
    ):
        if (max_steps is None) == (num_epochs is None):
            raise ValueError("give exactly one of max_steps or num_epochs")
        self.config = config
        self.accelerator = accelerator
        self.num_examples = num_examples
        self.world_size, self.rank = _resolve_processes(accelerator)

        batch_size = config.expected_batch_size
        if num_examples < 1:
            raise ValueError("the training set is empty")
        if batch_size > num_examples:
            raise ValueError(
                f"expected batch size {batch_size} is larger than the training set ({num_examples} examples); "
                "lower it so that the sample rate B / N is at most 1"
            )
        self.sample_rate = batch_size / num_examples
        # Without a seed, the sampler shares one drawn from os.urandom across processes,
        # and the noise generator seeds itself from os.urandom (only rank 0 adds noise).
        self.noise_seed = None if config.seed is None else config.seed + 1
        self.sampler = PoissonBatchSampler(
            num_examples,
            batch_size,
            seed=config.seed,
            num_replicas=self.world_size,
            rank=self.rank,
            secure_mode=bool(config.secure_mode),
        )
        self.steps_per_epoch = len(self.sampler)
        if max_steps is None:
            max_steps = max(1, math.ceil(num_epochs * self.steps_per_epoch))
        self.planned_steps = max_steps
        self.delta = config.target_delta if config.target_delta is not None else default_delta(num_examples)
        self.noise_multiplier = self._resolve_noise_multiplier()
        self.accountant = PrivacyAccountant(
            mechanism=config.accountant,
            noise_multiplier=self.noise_multiplier,
            sample_rate=self.sample_rate,
            delta=self.delta,
        )
        self.max_steps_within_budget = self._compute_budget_steps()

        self.grad_sample: PerExampleGradients | None = None
        self.optimizer = None
        self.task: str | None = None

    # ---- Setup ----

    def _resolve_noise_multiplier(self) -> float:
        config = self.config
        if config.disable_dp:
            return 0.0
        if config.noise_multiplier is not None:
            return float(config.noise_multiplier)
        sigma = calibrate_noise_multiplier(
            target_epsilon=config.target_epsilon,
            delta=self.delta,
            sample_rate=self.sample_rate,
            steps=self.planned_steps,
            accountant=config.accountant,
        )
        logger.info(
            "Calibrated noise multiplier %.4f for epsilon=%g, delta=%.3g, sample rate %.5f, %d steps (%s)",
            sigma, config.target_epsilon, self.delta, self.sample_rate, self.planned_steps, config.accountant,
        )
        return sigma

    def _compute_budget_steps(self) -> int | None:
        """Return the number of steps the target epsilon allows, or None when there is no budget."""
        if self.config.disable_dp or self.config.target_epsilon is None or self.noise_multiplier == 0:
            return None
        allowed = self.accountant.max_steps_within(self.config.target_epsilon)
        if allowed < 1:
            raise ValueError(
                f"target_epsilon={self.config.target_epsilon} does not allow a single step with noise multiplier "
                f"{self.noise_multiplier:.4g} and sample rate {self.sample_rate:.4g}; raise the noise multiplier "
                "or the budget, or lower the expected batch size"
            )
        if allowed < self.planned_steps:
            logger.warning(
                "target_epsilon=%g allows %d of the %d planned steps; training will stop after step %d",
                self.config.target_epsilon, allowed, self.planned_steps, allowed,
            )
        return allowed

    def make_data_loader(self, dataset, *, collate_fn=None, num_workers: int = 0, pin_memory: bool = False):
        """Return a data loader that yields this process's share of one Poisson logical batch per step."""
        check_dataset_supports_poisson(dataset)
        if len(dataset) != self.num_examples:
            raise ValueError(
                f"the dataset has {len(dataset)} examples but the engine was built for {self.num_examples}; "
                "the sample rate would not match what the sampler does"
            )
        return make_logical_batch_loader(
            dataset,
            self.sampler,
            collate_fn=collate_fn,
            micro_batch_size=self.config.micro_batch_size,
            num_workers=num_workers,
            pin_memory=pin_memory,
        )

    def attach(self, model, *, train_dataset=None, collate_fn=None, task: str | None = None) -> None:
        """Attach per-example gradient hooks to `model` after the pre-flight checks.

        With several processes, rank 0's parameters and buffers are first copied to every
        rank, so that all ranks start from the same model whatever each one initialized.
        """
        from .privacy.validation import check_model_for_dp

        self.broadcast_model_from_rank0(model)
        self.task = task
        probe_batch = None
        if train_dataset is not None and len(train_dataset) > 0:
            examples = [train_dataset[index] for index in range(min(2, len(train_dataset)))]
            probe_batch = (collate_fn or torch.utils.data.default_collate)(examples)
        self.grad_sample = PerExampleGradients(model)
        check_model_for_dp(
            model,
            self.grad_sample,
            probe_batch=probe_batch,
            task=task,
            token_reduction=self.config.loss_token_reduction,
        )

    def broadcast_model_from_rank0(self, model: torch.nn.Module) -> None:
        """Copy rank 0's parameters and buffers into `model` on every rank (nothing with one process).

        The DP optimizer applies the same privatized gradient on every rank, so the ranks
        stay identical only if they start identical. DistributedDataParallel does the same
        copy when it wraps a model; a custom loop has no such wrapper.
        """
        if self.world_size == 1:
            return
        with torch.no_grad():
            for tensor in itertools.chain(model.parameters(), model.buffers()):
                if tensor.is_contiguous():
                    dist.broadcast(tensor.data, src=0)
                else:
                    buffer = tensor.data.contiguous()
                    dist.broadcast(buffer, src=0)
                    tensor.data.copy_(buffer)

    def replicas_in_sync(self) -> bool:
        """Return whether the trainable parameters are bit-identical on every rank (True with one process).

        Every rank must call it, because it gathers one digest per rank. The ranks receive
        the same privatized gradient, but an update rule that adds in no fixed order (for
        example MicroAdam's `scatter_add_` on CUDA) can still make them drift apart in the
        last bits.
        """
        if self.world_size == 1 or self.optimizer is None:
            return True
        digest = hashlib.blake2b(digest_size=16)
        for param in self.optimizer.params:
            flat = param.detach().reshape(-1).contiguous().cpu()
            digest.update(flat.view(torch.uint8).numpy().tobytes())
        digests = [None] * self.world_size
        dist.all_gather_object(digests, digest.hexdigest())
        return len(set(digests)) == 1

    def make_optimizer(self, model_or_params, **overrides):
        """Build the DP optimizer over the trainable parameters and connect it to the accountant."""
        config = self.config
        if isinstance(model_or_params, torch.nn.Module):
            params = [p for p in model_or_params.parameters() if p.requires_grad]
        else:
            params = model_or_params
        if config.disable_dp:
            max_grad_norm = float("inf")
        else:
            max_grad_norm = config.max_grad_norm
        settings: dict[str, Any] = dict(
            lr=config.learning_rate,
            noise_multiplier=self.noise_multiplier,
            max_grad_norm=max_grad_norm,
            expected_batch_size=config.expected_batch_size,
            weight_decay=config.weight_decay,
            momentum=config.momentum,
            betas=(config.beta1, config.beta2),
            eps=config.eps,
            density=config.microadam_density,
            window=config.microadam_window,
            quant_bucket=config.microadam_quant_bucket,
            block_size=config.microadam_block_size,
            error_feedback=config.microadam_error_feedback,
            adambc_gamma=config.adambc_gamma,
            clipping=config.clipping,
            secure_mode=config.secure_mode,
            noise_seed=self.noise_seed,
        )
        settings.update(overrides)
        self.optimizer = make_dp_optimizer(config.optimizer, params, **settings)
        self.optimizer.attach_step_hook(self._on_private_step)
        return self.optimizer

    # ---- Training step ----

    def _on_private_step(self, _optimizer) -> None:
        # Runs after the noise draw and before the update rule: raising here releases nothing.
        if self.budget_exhausted:
            raise PrivacyBudgetExhaustedError(
                f"step {self.accountant.steps + 1} would exceed target_epsilon={self.config.target_epsilon} "
                f"(epsilon spent so far: {self.epsilon:.4g}); the update was not applied"
            )
        self.accountant.step()

    @property
    def budget_exhausted(self) -> bool:
        """Whether the next step would exceed the target epsilon."""
        return self.max_steps_within_budget is not None and self.accountant.steps >= self.max_steps_within_budget

    @property
    def epsilon(self) -> float:
        """Epsilon spent so far at the engine's delta (inf without noise)."""
        if self.config.disable_dp:
            return math.inf
        return self.accountant.get_epsilon()

    def per_example_losses(self, model, batch: dict):
        """Return `(losses, outputs)` with one loss per example; labels never reach the HF loss.

        With an accelerator, the batch is first moved to its device. A model wrapped in
        `DistributedDataParallel` is unwrapped first: a forward pass through the wrapper
        would make it all-reduce the raw, unclipped gradients during backward.
        """
        if self.accelerator is not None:
            from accelerate.utils import send_to_device

            batch = send_to_device(batch, self.accelerator.device)
        while isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        return compute_per_example_losses(
            model, batch, task=self.task, token_reduction=self.config.loss_token_reduction
        )

    def backward(self, losses: torch.Tensor) -> None:
        """Backpropagate the summed per-example losses and fold the clipped gradients into the running sum."""
        if self.optimizer is None:
            raise RuntimeError("make_optimizer() must run before backward()")
        losses.sum().backward()
        self.optimizer.clip_and_accumulate()

    # ---- Report and checkpoints ----

    def privacy_report(self):
        """Return the `PrivacyReport` of the run so far."""
        return self.accountant.report(
            expected_batch_size=self.config.expected_batch_size,
            num_examples=self.num_examples,
            target_epsilon=self.config.target_epsilon,
            secure_mode=self.config.secure_mode,
            max_grad_norm=None if self.config.disable_dp else self.config.max_grad_norm,
            disabled=self.config.disable_dp,
        )

    def state_dict(self) -> dict:
        """Return everything a resumed run needs to continue the accounting and the trajectory."""
        return {
            "version": _STATE_VERSION,
            "settings": self._fingerprint(),
            # For information only: a run may resume with another number of processes.
            "world_size": self.world_size,
            "accountant": self.accountant.state_dict(),
            "sampler": self.sampler.state_dict(batches_consumed=self._batches_consumed_in_epoch()),
            "privatizer": self.optimizer.privacy_state_dict() if self.optimizer is not None else None,
        }

    def _batches_consumed_in_epoch(self) -> int | None:
        # A data loader with worker processes draws batches ahead of training; the
        # accountant's step count says how many of the current epoch were really used.
        if self.sampler.epoch < 0:
            return None
        return self.accountant.steps - self.sampler.epoch * self.steps_per_epoch

    def load_state_dict(self, state: dict) -> None:
        """Restore a state saved by `state_dict()`.

        Raises DPSettingsChangedError for a state saved by a run with other DP settings.
        Settings that a state saved by an older version lacks are not compared.
        """
        saved, current = state.get("settings", {}), self._fingerprint()
        changed = {
            key: (saved[key], value) for key, value in current.items() if key in saved and saved[key] != value
        }
        if changed:
            details = ", ".join(f"{key}: saved {old!r}, now {new!r}" for key, (old, new) in changed.items())
            hint = ""
            if set(changed) == {"noise_multiplier"}:
                hint = (" The noise multiplier is calibrated from target_epsilon, target_delta, the expected batch "
                        "size and the number of planned steps, so one of them changed.")
            raise DPSettingsChangedError(
                f"the checkpoint's privacy state comes from a run with other DP settings ({details}).{hint} "
                "Resume with the same settings, or start a new run"
            )
        saved_world_size = state.get("world_size", state.get("settings", {}).get("world_size"))
        if saved_world_size is not None and saved_world_size != self.world_size:
            logger.info(
                "Resuming a run saved with %d process(es) on %d: the logical batches, the noise and the "
                "accounting continue unchanged, and each logical batch is now split %d ways",
                saved_world_size, self.world_size, self.world_size,
            )
        self.accountant.load_state_dict(state["accountant"])
        self.sampler.load_state_dict(state["sampler"])
        if self.optimizer is not None and state.get("privatizer") is not None:
            self.optimizer.load_privacy_state_dict(state["privatizer"])

    def _fingerprint(self) -> dict:
        # The settings a resumed run must share with the saved one. The number of processes
        # is not among them, because the logical batches depend only on the sampler's
        # generator state and position, the noise only on rank 0's generator, and the
        # accountant only on (sigma, q) per step. A run resumed on another number of
        # processes continues the same sequence, up to float rounding of the all-reduced sums.
        calibrated = not self.config.disable_dp and self.config.noise_multiplier is None
        return {
            # With a calibrated noise multiplier, these two name the option a user changed.
            "target_epsilon": self.config.target_epsilon if calibrated else None,
            "planned_steps": self.planned_steps if calibrated else None,
            "noise_multiplier": self.noise_multiplier,
            "sample_rate": self.sample_rate,
            "expected_batch_size": self.config.expected_batch_size,
            "num_examples": self.num_examples,
            "max_grad_norm": self.config.max_grad_norm,
            "accountant": self.config.accountant,
            "delta": self.delta,
            "disable_dp": bool(self.config.disable_dp),
        }

    def save(self, directory: str) -> None:
        """Write the privacy state to `directory/dp_state.pt` (main process only)."""
        if self.rank != 0:
            return
        torch.save(self.state_dict(), os.path.join(directory, DP_STATE_FILE))

    def load(self, directory: str) -> None:
        """Read the privacy state from `directory/dp_state.pt`; a missing file is an error."""
        path = os.path.join(directory, DP_STATE_FILE)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"checkpoint {directory} has no {DP_STATE_FILE}: resuming without the accountant history, sampler "
                "and noise states would restart epsilon at 0. Resume from a checkpoint written by "
                "DPMicroAdamTrainer, or start a new run without resume_from_checkpoint"
            )
        self.load_state_dict(torch.load(path, map_location="cpu", weights_only=False))
