"""`DPMicroAdamPlugin`: differentially private training for custom accelerate loops.

A custom loop gets the same private training as `DPMicroAdamTrainer` (which is built on
this plugin) with a few added lines::

    accelerator = Accelerator()
    plugin = DPMicroAdamPlugin(target_epsilon=8.0, expected_batch_size=256, micro_batch_size=32,
                               learning_rate=1e-3)
    model, optimizer, train_loader = plugin.prepare(model, train_dataset, num_epochs=3,
                                                    collate_fn=collator, accelerator=accelerator)
    for logical_batch in train_loader:
        for micro_batch in logical_batch:
            losses, _ = plugin.per_example_losses(model, micro_batch)
            plugin.backward(losses)
        optimizer.step()
        optimizer.zero_grad()
    print(plugin.privacy_report())

Run the same script on several processes with `accelerate launch` or `torchrun`. Each
process then gets a disjoint share of every logical batch, the clipped sums are
all-reduced and only rank 0 adds noise, so the privacy guarantee does not depend on the
number of processes. Keep the model, the optimizer and the data loader out of
`accelerator.prepare()`: a DistributedDataParallel wrapper would all-reduce raw gradients,
and accelerate's batch sampler would re-shard the Poisson batches. On a machine without
GPUs, create the accelerator with `Accelerator(cpu=True)`.
"""

from __future__ import annotations

import difflib
import logging
import os
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

from .arguments import (
    ACCOUNTANT_NAMES,
    CLIPPING_MODES,
    DP_OPTIMIZER_NAMES,
    ERROR_FEEDBACK_MODES,
    TOKEN_REDUCTIONS,
)

if TYPE_CHECKING:
    from .arguments import DPTrainingArguments
    from .engine import DPEngine

logger = logging.getLogger(__name__)

ENV_PREFIX = "DP_MICROADAM_"

# Values used when neither the constructor nor the environment sets a field.
_DEFAULTS: dict[str, Any] = {
    "max_grad_norm": 1.0,
    "micro_batch_size": 32,
    "accountant": "prv",
    "clipping": "flat",
    "loss_token_reduction": "mean",
    "secure_mode": False,
    "disable_dp": False,
    "optimizer": "dp-microadam",
    "learning_rate": 1e-3,
    "weight_decay": 0.0,
    "beta1": 0.9,
    "beta2": 0.999,
    "eps": 1e-8,
    "momentum": 0.0,
    "microadam_density": 0.01,
    "microadam_window": 10,
    "microadam_quant_bucket": 64,
    "microadam_error_feedback": "4bit",
    "adambc_gamma": 1e-8,
}


_INT_FIELDS = frozenset(
    ("expected_batch_size", "micro_batch_size", "seed", "microadam_window", "microadam_quant_bucket",
     "microadam_block_size")
)
_BOOL_FIELDS = frozenset(("secure_mode", "disable_dp"))
_STR_FIELDS = frozenset(("accountant", "clipping", "loss_token_reduction", "optimizer", "microadam_error_feedback"))


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected a boolean (true/false, 1/0), got {text!r}")


@dataclass
class DPMicroAdamPlugin:
    """Configuration of differentially private training with DP-MicroAdam or a baseline.

    Every field left at `None` is read from the environment variable `DP_MICROADAM_<FIELD>`
    (the field name in upper case, e.g. `DP_MICROADAM_TARGET_EPSILON=8`), and otherwise takes
    the default given below. `expected_batch_size` and one of `target_epsilon` or
    `noise_multiplier` have no default (unless `disable_dp` is set).

    `prepare()` builds the runtime (`DPEngine`): per-example gradient hooks on the model, the
    Poisson data loader, the DP optimizer and the accountant. The plugin keeps it in
    `self.engine` for the report and for checkpoints.

    Args:
        target_epsilon: Privacy budget. The noise multiplier is calibrated for the planned
            number of steps, and training cannot take a step that would exceed it.
        target_delta: Privacy parameter delta. Default: 1 / N^1.1 for N training examples.
        noise_multiplier: Noise standard deviation relative to `max_grad_norm`, instead of
            calibrating it. 0 keeps sampling and clipping and drops the noise (epsilon inf).
        max_grad_norm: Per-example clipping norm C (L2). Default 1.0.
        expected_batch_size: Expected size B of a Poisson logical batch; the sample rate is
            B / N and the sum of clipped gradients is divided by B.
        micro_batch_size: Largest number of examples in one forward/backward pass. Default 32.
        accountant: "prv" (default) or "rdp".
        clipping: "flat" (default, one norm over all trainable parameters) or "per_layer".
        loss_token_reduction: Causal LM: "mean" (default) or "sum" of an example's token losses.
        secure_mode: Draw noise from a cryptographically secure source. Default False.
        seed: Seed of the sampler and the noise, for tests only. Default: OS entropy.
        disable_dp: Non-private baseline (no clipping, no noise, epsilon inf). Default False.
        optimizer: "dp-microadam" (default), "dp-adam", "dp-adambc" or "dp-sgd".
        learning_rate: Learning rate of the update rule. Default 1e-3.
        weight_decay: Decoupled weight decay. Default 0.
        beta1, beta2, eps: Adam-family moment decays and epsilon. Defaults 0.9, 0.999, 1e-8.
        momentum: dp-sgd momentum. Default 0 (plain SGD).
        microadam_density, microadam_window, microadam_quant_bucket, microadam_block_size,
        microadam_error_feedback: MicroAdam settings. Defaults 0.01, 10, 64, chosen by
            MicroAdam, "4bit".
        adambc_gamma: dp-adambc floor of the corrected second moment. Default 1e-8.
    """

    target_epsilon: float | None = field(default=None, metadata={"help": "Privacy budget epsilon."})
    target_delta: float | None = field(default=None, metadata={"help": "Privacy parameter delta."})
    noise_multiplier: float | None = field(
        default=None, metadata={"help": "Noise standard deviation relative to max_grad_norm."}
    )
    max_grad_norm: float | None = field(default=None, metadata={"help": "Per-example clipping norm C."})
    expected_batch_size: int | None = field(
        default=None, metadata={"help": "Expected Poisson logical batch size B."}
    )
    micro_batch_size: int | None = field(
        default=None, metadata={"help": "Largest number of examples per forward/backward pass."}
    )
    accountant: str | None = field(default=None, metadata={"help": "'prv' or 'rdp'."})
    clipping: str | None = field(default=None, metadata={"help": "'flat' or 'per_layer'."})
    loss_token_reduction: str | None = field(default=None, metadata={"help": "'mean' or 'sum'."})
    secure_mode: bool | None = field(default=None, metadata={"help": "Cryptographically secure noise."})
    seed: int | None = field(default=None, metadata={"help": "Sampler and noise seed, for tests only."})
    disable_dp: bool | None = field(default=None, metadata={"help": "Non-private baseline."})
    optimizer: str | None = field(default=None, metadata={"help": "Update rule of the privatized gradient."})
    learning_rate: float | None = field(default=None, metadata={"help": "Learning rate."})
    weight_decay: float | None = field(default=None, metadata={"help": "Decoupled weight decay."})
    beta1: float | None = field(default=None, metadata={"help": "First-moment decay."})
    beta2: float | None = field(default=None, metadata={"help": "Second-moment decay."})
    eps: float | None = field(default=None, metadata={"help": "Adam epsilon."})
    momentum: float | None = field(default=None, metadata={"help": "dp-sgd momentum."})
    microadam_density: float | None = field(default=None, metadata={"help": "MicroAdam top-k density."})
    microadam_window: int | None = field(default=None, metadata={"help": "MicroAdam window length."})
    microadam_quant_bucket: int | None = field(default=None, metadata={"help": "MicroAdam quantization bucket."})
    microadam_block_size: int | None = field(default=None, metadata={"help": "MicroAdam top-k block size."})
    microadam_error_feedback: str | None = field(default=None, metadata={"help": "'4bit' or 'fp32'."})
    adambc_gamma: float | None = field(default=None, metadata={"help": "dp-adambc second-moment floor."})

    engine: DPEngine | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self):
        self._warn_about_unknown_environment_variables()
        for dataclass_field in fields(self):
            if dataclass_field.name == "engine" or getattr(self, dataclass_field.name) is not None:
                continue
            env_name = ENV_PREFIX + dataclass_field.name.upper()
            if env_name in os.environ:
                setattr(self, dataclass_field.name, self._parse_env(dataclass_field.name, os.environ[env_name]))
            elif dataclass_field.name in _DEFAULTS:
                setattr(self, dataclass_field.name, _DEFAULTS[dataclass_field.name])
        self._check()

    def _warn_about_unknown_environment_variables(self) -> None:
        # A misspelled variable would otherwise leave its field at the default unnoticed.
        known = {ENV_PREFIX + f.name.upper() for f in fields(self) if f.name != "engine"}
        for name in sorted(os.environ):
            if name.startswith(ENV_PREFIX) and name not in known:
                close = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.6)
                hint = f" (did you mean {close[0]}?)" if close else ""
                logger.warning("unknown environment variable %s is ignored: DPMicroAdamPlugin has no such field%s",
                               name, hint)

    def _parse_env(self, name: str, text: str) -> Any:
        try:
            if name in _INT_FIELDS:
                return int(text)
            if name in _BOOL_FIELDS:
                return _parse_bool(text)
            if name in _STR_FIELDS:
                return text.strip()
            return float(text)
        except ValueError as error:
            raise ValueError(f"invalid value in environment variable {ENV_PREFIX}{name.upper()}: {error}") from None

    def _check(self) -> None:
        problems = []
        if self.expected_batch_size is None:
            problems.append(
                f"expected_batch_size is required (argument or {ENV_PREFIX}EXPECTED_BATCH_SIZE)"
            )
        elif self.expected_batch_size < 1:
            problems.append(f"expected_batch_size must be at least 1, got {self.expected_batch_size}")
        if self.micro_batch_size < 1:
            problems.append(f"micro_batch_size must be at least 1, got {self.micro_batch_size}")
        if not self.disable_dp:
            if self.target_epsilon is None and self.noise_multiplier is None:
                problems.append(
                    "set target_epsilon (the noise is then calibrated) or noise_multiplier, "
                    "or disable_dp=True for a non-private baseline"
                )
            if not (self.max_grad_norm > 0 and self.max_grad_norm < float("inf")):
                problems.append(f"max_grad_norm must be a positive finite number, got {self.max_grad_norm}")
        if self.secure_mode and self.seed is not None:
            problems.append(
                f"secure_mode=True draws the sampler and noise keys from os.urandom and cannot be seeded "
                f"(seed={self.seed}); unset seed"
            )
        if self.target_epsilon is not None and not self.target_epsilon > 0:
            problems.append(f"target_epsilon must be positive, got {self.target_epsilon}")
        if self.target_delta is not None and not 0 < self.target_delta < 1:
            problems.append(f"target_delta must be in (0, 1), got {self.target_delta}")
        if self.noise_multiplier is not None and self.noise_multiplier < 0:
            problems.append(f"noise_multiplier must be >= 0, got {self.noise_multiplier}")
        for name, allowed in (
            ("optimizer", DP_OPTIMIZER_NAMES),
            ("accountant", ACCOUNTANT_NAMES),
            ("clipping", CLIPPING_MODES),
            ("loss_token_reduction", TOKEN_REDUCTIONS),
            ("microadam_error_feedback", ERROR_FEEDBACK_MODES),
        ):
            if getattr(self, name) not in allowed:
                problems.append(f"{name}={getattr(self, name)!r} is not one of {', '.join(allowed)}")
        if problems:
            raise ValueError("Invalid DPMicroAdamPlugin settings:\n  - " + "\n  - ".join(problems))

    @classmethod
    def from_training_arguments(cls, args: DPTrainingArguments) -> DPMicroAdamPlugin:
        """Build the plugin from the Trainer's arguments (the Trainer's single source of DP settings)."""
        return cls(
            target_epsilon=args.target_epsilon,
            target_delta=args.target_delta,
            noise_multiplier=args.noise_multiplier,
            max_grad_norm=args.per_sample_max_grad_norm,
            expected_batch_size=args.logical_batch_size,
            micro_batch_size=args.per_device_train_batch_size,
            accountant=args.accountant,
            clipping=args.clipping,
            loss_token_reduction=args.loss_token_reduction,
            secure_mode=args.secure_mode,
            seed=args.dp_seed,
            disable_dp=args.disable_dp,
            optimizer=args.dp_optimizer,
            learning_rate=args.learning_rate,
            weight_decay=args.weight_decay,
            beta1=args.adam_beta1,
            beta2=args.adam_beta2,
            eps=args.adam_epsilon,
            momentum=args.dp_sgd_momentum,
            microadam_density=args.microadam_density,
            microadam_window=args.microadam_window,
            microadam_quant_bucket=args.microadam_quant_bucket,
            microadam_block_size=args.microadam_block_size,
            microadam_error_feedback=args.microadam_error_feedback,
            adambc_gamma=args.adambc_gamma,
        )

    # ---- Runtime ----

    def create_engine(
        self,
        *,
        num_examples: int,
        max_steps: int | None = None,
        num_epochs: float | None = None,
        accelerator=None,
    ) -> DPEngine:
        """Create the runtime for `num_examples` training examples and a run of `max_steps` or `num_epochs`."""
        from .engine import DPEngine

        if self.engine is not None and self.engine.accountant.steps > 0:
            raise RuntimeError(
                "this plugin already trained for "
                f"{self.engine.accountant.steps} steps; a new engine would restart epsilon at 0. "
                "Use a new plugin for a new run, or resume from a checkpoint"
            )
        self.engine = DPEngine(
            self, num_examples=num_examples, max_steps=max_steps, num_epochs=num_epochs, accelerator=accelerator
        )
        return self.engine

    def prepare(
        self,
        model,
        train_dataset,
        *,
        num_epochs: float | None = None,
        max_steps: int | None = None,
        collate_fn=None,
        accelerator=None,
        num_workers: int = 0,
        task: str | None = None,
    ):
        """Make `model`, an optimizer and a data loader private; return `(model, optimizer, data_loader)`.

        The model is returned as it is (same object, same class), moved to the accelerator's
        device, with per-example gradient hooks attached after a pre-flight check. The data
        loader yields one `LogicalBatch` per step: with several processes, this process's
        share of it. Give either `num_epochs` or `max_steps`: the noise is calibrated for
        that number of steps. With several processes, every rank gets rank 0's parameters.
        """
        if (num_epochs is None) == (max_steps is None):
            raise ValueError("prepare() needs exactly one of num_epochs or max_steps")
        engine = self.create_engine(
            num_examples=len(train_dataset), max_steps=max_steps, num_epochs=num_epochs, accelerator=accelerator
        )
        if accelerator is not None:
            model = model.to(accelerator.device)
        data_loader = engine.make_data_loader(train_dataset, collate_fn=collate_fn, num_workers=num_workers)
        engine.attach(model, train_dataset=train_dataset, collate_fn=collate_fn, task=task)
        optimizer = engine.make_optimizer(model)
        return model, optimizer, data_loader

    def _require_engine(self) -> DPEngine:
        if self.engine is None:
            raise RuntimeError("the plugin has no engine yet: call prepare() first")
        return self.engine

    def per_example_losses(self, model, batch: dict):
        """Return `(losses, outputs)`: one loss per example of `batch`, and the model outputs."""
        return self._require_engine().per_example_losses(model, batch)

    def backward(self, losses) -> None:
        """Backpropagate the sum of per-example losses and clip them into the running sum."""
        self._require_engine().backward(losses)

    def privacy_report(self):
        """Return the `PrivacyReport` of the privacy spent so far."""
        return self._require_engine().privacy_report()

    def state_dict(self) -> dict:
        """Return the privacy state a checkpoint must keep: accountant, sampler and noise states."""
        return self._require_engine().state_dict()

    def load_state_dict(self, state: dict) -> None:
        """Restore the privacy state saved by `state_dict()`."""
        self._require_engine().load_state_dict(state)

    def save(self, directory: str) -> None:
        """Write the privacy state to `directory/dp_state.pt`; only rank 0 writes."""
        self._require_engine().save(directory)

    def load(self, directory: str) -> None:
        """Read the privacy state from `directory/dp_state.pt` on every rank; a missing file is an error."""
        self._require_engine().load(directory)
