"""`DPTrainingArguments`: the differential-privacy options of `DPMicroAdamTrainer`."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from transformers import TrainingArguments

DP_OPTIMIZER_NAMES = ("dp-microadam", "dp-adam", "dp-adambc", "dp-sgd")
ACCOUNTANT_NAMES = ("prv", "rdp")
CLIPPING_MODES = ("flat", "per_layer")
TOKEN_REDUCTIONS = ("mean", "sum")
ERROR_FEEDBACK_MODES = ("4bit", "fp32")


@dataclass
class DPTrainingArguments(TrainingArguments):
    """`TrainingArguments` plus the options of differentially private training.

    One Trainer step is one logical batch drawn by Poisson sampling: each training example
    is included independently with probability `logical_batch_size / len(train_dataset)`.
    The logical batch is processed in micro-batches of at most
    `per_device_train_batch_size` examples, so the micro-batch size changes memory use and
    never the privacy guarantee.

    Three settings are rejected because transformers applies them in a way that breaks the
    accounting: `max_grad_norm > 0` (it clips the summed gradient, after per-example
    clipping has already bounded it; use `per_sample_max_grad_norm`),
    `gradient_accumulation_steps > 1` (several Trainer batches would share one noise draw
    while the accountant counts each as a step; raise `logical_batch_size` instead) and
    `fp16` (the GradScaler multiplies per-example gradients by the loss scale before
    clipping; use `bf16`).
    """

    target_epsilon: float | None = field(
        default=None,
        metadata={
            "help": "Privacy budget epsilon. The noise multiplier is calibrated so that the planned number of "
            "steps spends at most this budget, and training stops before a step that would exceed it."
        },
    )
    target_delta: float | None = field(
        default=None,
        metadata={"help": "Privacy parameter delta. Default: 1 / N^1.1 for a training set of N examples."},
    )
    noise_multiplier: float | None = field(
        default=None,
        metadata={
            "help": "Standard deviation of the Gaussian noise relative to per_sample_max_grad_norm, used instead "
            "of calibrating it from target_epsilon. 0 keeps Poisson sampling and clipping and drops the noise "
            "(epsilon is then infinite); useful for debugging."
        },
    )
    per_sample_max_grad_norm: float = field(
        default=1.0,
        metadata={"help": "Clipping norm C: each example's gradient is scaled to an L2 norm of at most C."},
    )
    logical_batch_size: int = field(
        default=256,
        metadata={
            "help": "Expected size B of the Poisson-sampled logical batch; one optimizer step per logical batch. "
            "The sum of clipped gradients is divided by this public constant, never by the realized size."
        },
    )
    accountant: str = field(
        default="prv",
        metadata={"help": "Privacy accountant: 'prv' (privacy loss random variables) or 'rdp' (Renyi DP).",
                  "choices": list(ACCOUNTANT_NAMES)},
    )
    dp_optimizer: str = field(
        default="dp-microadam",
        metadata={"help": "Update rule applied to the privatized gradient.", "choices": list(DP_OPTIMIZER_NAMES)},
    )
    microadam_density: float = field(
        default=0.01,
        metadata={"help": "MicroAdam: fraction of each block's entries kept by top-k at each step."},
    )
    microadam_window: int = field(
        default=10, metadata={"help": "MicroAdam: number of past sparse gradients kept for the moments."}
    )
    microadam_quant_bucket: int = field(
        default=64,
        metadata={"help": "MicroAdam: entries per bucket of the 4-bit error feedback (one min and max per bucket)."},
    )
    microadam_block_size: int | None = field(
        default=None,
        metadata={"help": "MicroAdam: entries per top-k block, at most 32768. Default: chosen by MicroAdam."},
    )
    microadam_error_feedback: str = field(
        default="4bit",
        metadata={"help": "MicroAdam: error feedback storage, '4bit' or dense 'fp32'.",
                  "choices": list(ERROR_FEEDBACK_MODES)},
    )
    dp_sgd_momentum: float = field(default=0.0, metadata={"help": "dp-sgd: momentum (0 gives plain SGD)."})
    adambc_gamma: float = field(
        default=1e-8, metadata={"help": "dp-adambc: floor of the bias-corrected second moment."}
    )
    clipping: str = field(
        default="flat",
        metadata={"help": "Per-example clipping: 'flat' (one norm over all trainable parameters) or "
                  "'per_layer' (each parameter tensor gets a share of the clipping norm).",
                  "choices": list(CLIPPING_MODES)},
    )
    loss_token_reduction: str = field(
        default="mean",
        metadata={"help": "Causal LM: reduce an example's token losses by 'mean' over its own tokens or 'sum'.",
                  "choices": list(TOKEN_REDUCTIONS)},
    )
    secure_mode: bool = field(
        default=False,
        metadata={"help": "Draw the noise from a cryptographically secure source (slower, not seedable)."},
    )
    dp_seed: int | None = field(
        default=None,
        metadata={
            "help": "Seed of the Poisson sampler and of the noise, for tests and debugging only. By default "
            "both are seeded from the operating system's entropy source, so that knowing `seed` reveals "
            "neither the batches nor the noise."
        },
    )
    disable_dp: bool = field(
        default=False,
        metadata={
            "help": "Non-private baseline: same Poisson batches and update rule, no clipping and no noise. "
            "Epsilon is reported as infinite."
        },
    )
    max_grad_norm: float = field(
        default=0.0,
        metadata={"help": "Must stay 0: per-example clipping is set by per_sample_max_grad_norm."},
    )

    def __post_init__(self):
        super().__post_init__()
        self._check_dp_settings()

    def _check_dp_settings(self) -> None:
        problems = []
        if self.max_grad_norm and self.max_grad_norm > 0:
            problems.append(
                f"max_grad_norm={self.max_grad_norm} would clip the summed gradient after per-example clipping; "
                "set max_grad_norm=0 and use per_sample_max_grad_norm for the clipping norm"
            )
        if self.gradient_accumulation_steps != 1:
            problems.append(
                f"gradient_accumulation_steps={self.gradient_accumulation_steps} is not supported: one Trainer step "
                "is one logical batch; raise logical_batch_size instead (per_device_train_batch_size sets the "
                "micro-batch size)"
            )
        if self.fp16:
            problems.append(
                "fp16=True uses a GradScaler that multiplies per-example gradients by the loss scale before "
                "clipping; use bf16=True instead"
            )
        if self.auto_find_batch_size:
            problems.append(
                "auto_find_batch_size=True restarts training after an out-of-memory error, and the steps already "
                "taken would be spent twice; set per_device_train_batch_size yourself"
            )
        if self.train_sampling_strategy not in ("random",):
            problems.append(
                f"train_sampling_strategy={self.train_sampling_strategy!r} is ignored by Poisson sampling; "
                "leave it at 'random'"
            )
        if self.logical_batch_size < 1:
            problems.append(f"logical_batch_size must be at least 1, got {self.logical_batch_size}")
        if not self.per_sample_max_grad_norm > 0 or math.isinf(self.per_sample_max_grad_norm):
            problems.append(
                f"per_sample_max_grad_norm must be a positive finite number, got {self.per_sample_max_grad_norm}"
            )
        if self.target_epsilon is not None and not self.target_epsilon > 0:
            problems.append(f"target_epsilon must be positive, got {self.target_epsilon}")
        if self.target_delta is not None and not 0 < self.target_delta < 1:
            problems.append(f"target_delta must be in (0, 1), got {self.target_delta}")
        if self.noise_multiplier is not None and self.noise_multiplier < 0:
            problems.append(f"noise_multiplier must be >= 0, got {self.noise_multiplier}")
        if self.secure_mode and self.dp_seed is not None:
            problems.append(
                f"secure_mode=True draws the sampler and noise keys from os.urandom and cannot be seeded "
                f"(dp_seed={self.dp_seed}); unset dp_seed"
            )
        if not self.disable_dp and self.target_epsilon is None and self.noise_multiplier is None:
            problems.append(
                "set target_epsilon (the noise is then calibrated) or noise_multiplier; "
                "for a non-private baseline set disable_dp=True"
            )
        for name, value, allowed in (
            ("dp_optimizer", self.dp_optimizer, DP_OPTIMIZER_NAMES),
            ("accountant", self.accountant, ACCOUNTANT_NAMES),
            ("clipping", self.clipping, CLIPPING_MODES),
            ("loss_token_reduction", self.loss_token_reduction, TOKEN_REDUCTIONS),
            ("microadam_error_feedback", self.microadam_error_feedback, ERROR_FEEDBACK_MODES),
        ):
            if value not in allowed:
                problems.append(f"{name}={value!r} is not one of {', '.join(allowed)}")
        if problems:
            raise ValueError("Invalid DPTrainingArguments:\n  - " + "\n  - ".join(problems))
