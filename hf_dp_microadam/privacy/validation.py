"""Pre-flight checks that reject models and settings the privacy guarantee does not cover.

`check_model_for_dp` runs before training and raises one `UnsupportedModelError` that lists
every problem it found:

- the model is in eval mode (`from_pretrained` returns eval mode, and hooks record
  nothing in eval mode), or a trainable submodule is;
- a layer mixes examples, such as BatchNorm in training mode (trainable or frozen), which
  computes statistics over the batch, or another layer that Opacus' ModuleValidator rejects;
- a PEFT method or LoRA variant whose per-example gradients are not verified;
- trainable parameters without per-example gradient hooks (the engine was attached
  before `get_peft_model`, or `requires_grad` changed afterwards);
- fp16 training with a GradScaler (see `find_mixed_precision_problems`);
- with a probe batch, a forward/backward on its first examples finds three kinds of
  trainable parameters. Some get no gradient at all (unused, such as DINOv2's
  `mask_token`). Some have per-example gradients that do not add up to the batch
  gradient (used outside the module that owns them). Some have a per-example gradient
  that changes when the other examples of the micro-batch change.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import torch
import torch.nn as nn
from opacus.validators import ModuleValidator

from .grad_sample import PerExampleGradients, infer_batch_size
from .grad_sample.samplers import unsupported_module_reason
from .losses import compute_per_example_losses

# Relative tolerance of the probe's gradient comparisons, by parameter dtype.
_PROBE_TOLERANCE = {torch.float64: 1e-7, torch.float32: 1e-3}
_LOW_PRECISION_TOLERANCE = 5e-2
_MAX_NAMES = 8

LossFunction = Callable[[nn.Module, Mapping], torch.Tensor]


class UnsupportedModelError(ValueError):
    """A model or setting that differentially private training does not support.

    `problems` contains one sentence per problem, and the message lists all of them.
    """

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        lines = "\n".join(f"- {problem}" for problem in self.problems)
        super().__init__(f"differentially private training cannot start:\n{lines}")


def _list_names(names: list[str]) -> str:
    listed = ", ".join(names[:_MAX_NAMES])
    if len(names) > _MAX_NAMES:
        listed += f" and {len(names) - _MAX_NAMES} more"
    return listed


# ---- mixed precision ----


def find_mixed_precision_problems(*, fp16: bool = False, bf16: bool = False, grad_scaler=None) -> list[str]:
    """Return the problems of a mixed-precision setting: fp16 training with a GradScaler.

    A GradScaler multiplies the loss, and so every per-example gradient, by the loss scale
    before clipping, and skips the steps whose gradients overflow: that decision depends on
    the private data. bf16 autocast needs no loss scaling and is accepted.

    Args:
        fp16: the `fp16` training argument (transformers and accelerate pair it with a GradScaler).
        bf16: the `bf16` training argument, always accepted.
        grad_scaler: a `torch.amp.GradScaler` if the training loop has one.
    """
    del bf16  # bf16 autocast needs no loss scaling, so any value is accepted.
    problems = []
    if fp16:
        problems.append(
            "fp16=True trains with a GradScaler, which multiplies every per-example gradient by the loss "
            "scale before clipping and skips steps whose gradients overflow, a decision that depends on "
            "the private data. Use bf16=True (bf16 autocast, no loss scaling) or full precision."
        )
    elif grad_scaler is not None and grad_scaler.is_enabled():
        problems.append(
            "an enabled GradScaler multiplies every per-example gradient by the loss scale before clipping "
            "and skips steps whose gradients overflow, a decision that depends on the private data. "
            "Remove the GradScaler and use bf16 autocast or full precision."
        )
    return problems


def check_mixed_precision(*, fp16: bool = False, bf16: bool = False, grad_scaler=None) -> None:
    """Raise UnsupportedModelError for fp16 training with a GradScaler (see `find_mixed_precision_problems`)."""
    problems = find_mixed_precision_problems(fp16=fp16, bf16=bf16, grad_scaler=grad_scaler)
    if problems:
        raise UnsupportedModelError(problems)


# ---- static checks ----


def _find_mode_problems(model: nn.Module) -> list[str]:
    if not model.training:
        return [
            "the model is in eval mode (from_pretrained returns models in eval mode), so the per-example "
            "hooks record nothing and dropout is off. Call model.train() before training."
        ]
    in_eval = [
        name
        for name, module in model.named_modules()
        if not module.training and any(p.requires_grad for p in module.parameters(recurse=False))
    ]
    if in_eval:
        return [
            f"these trainable modules are in eval mode, so their per-example hooks record nothing: "
            f"{_list_names(in_eval)}. Call model.train()."
        ]
    return []


def _find_cross_example_layers(model: nn.Module) -> list[str]:
    problems = []
    batch_norms = [
        name or type(model).__name__
        for name, module in model.named_modules()
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.training
    ]
    if batch_norms:
        problems.append(
            f"BatchNorm layers in training mode normalize each example with statistics of the whole batch, "
            f"so one example's gradient depends on the others: {_list_names(batch_norms)}. Replace them with "
            "GroupNorm (opacus.validators.ModuleValidator.fix(model)), or, if they are frozen, put them in eval "
            "mode after model.train() so that they use their running statistics."
        )
    # Opacus' other validators (LSTM, MultiheadAttention, InstanceNorm with running stats, ...).
    # They run here per module so that the message can name the module.
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            continue
        if not any(p.requires_grad for p in module.parameters(recurse=False)):
            continue
        validator = ModuleValidator.VALIDATORS.get(type(module))
        if validator is not None:
            problems += [f"{name}: {error}" for error in validator(module)]
    for name, module in model.named_modules():
        if any(p.requires_grad for p in module.parameters(recurse=False)):
            reason = unsupported_module_reason(module)
            if reason is not None:
                problems.append(f"{name}: {reason}. Freeze it with requires_grad_(False).")
    return problems


def _find_peft_problems(model: nn.Module) -> list[str]:
    try:
        from peft.tuners import lora
        from peft.tuners.lora.variants import DoraLinearVariant
        from peft.tuners.tuners_utils import BaseTunerLayer
        from peft.utils.other import AuxiliaryTrainingWrapper, ModulesToSaveWrapper
    except ImportError:
        return []

    problems = []
    peft_config = getattr(model, "peft_config", None)
    if isinstance(peft_config, Mapping):
        prompt_learning = [name for name, config in peft_config.items() if getattr(config, "is_prompt_learning", False)]
        if prompt_learning:
            problems.append(
                f"PEFT prompt-learning adapters ({_list_names(prompt_learning)}) are not supported: their virtual "
                "tokens are not verified to get per-example gradients. Use LoRA."
            )

    # Layer types and LoRA variants whose per-example gradients the tests compare with a
    # per-example backward loop. DoRA on embeddings returns its magnitude scale as a
    # second output shared by the batch, so it cannot be split per example.
    supported_layers = (lora.Linear, lora.Embedding)
    unsupported_layers, unsupported_variants = [], []
    for name, module in model.named_modules():
        if isinstance(module, BaseTunerLayer):
            if type(module) not in supported_layers:
                unsupported_layers.append(f"{name} ({type(module).__module__}.{type(module).__name__})")
                continue
            for adapter, variant in getattr(module, "lora_variant", {}).items():
                if not (type(module) is lora.Linear and type(variant) is DoraLinearVariant):
                    unsupported_variants.append(f"{name} [{adapter}: {type(variant).__name__}]")
        elif isinstance(module, AuxiliaryTrainingWrapper) and not isinstance(module, ModulesToSaveWrapper):
            unsupported_layers.append(f"{name} ({type(module).__name__})")
    if unsupported_layers:
        problems.append(
            f"these PEFT layers are not supported (supported: LoRA on Linear, GPT-2 Conv1D and Embedding "
            f"layers, DoRA on Linear layers, modules_to_save): {_list_names(unsupported_layers)}"
        )
    if unsupported_variants:
        problems.append(
            f"these LoRA variants are not supported (supported: plain LoRA, and DoRA on Linear layers): "
            f"{_list_names(unsupported_variants)}"
        )
    return problems


def _find_engine_problems(model: nn.Module, engine: PerExampleGradients | None) -> list[str]:
    if engine is None:
        return []
    uncovered = [name for name, p in model.named_parameters() if p.requires_grad and not engine.covers(p)]
    if not uncovered:
        return []
    return [
        f"{len(uncovered)} trainable parameters have no per-example gradient hooks, for example "
        f"{_list_names(uncovered)}. The PerExampleGradients engine was attached before they became trainable "
        "(for example before get_peft_model), so their updates would skip clipping and noise. Call "
        "engine.remove(), apply get_peft_model and requires_grad_ first, then attach a new engine."
    ]


def find_model_problems(model: nn.Module, engine: PerExampleGradients | None = None) -> list[str]:
    """Return the problems that need no forward pass: mode, cross-example layers, PEFT, hooks."""
    problems = []
    if not any(p.requires_grad for p in model.parameters()):
        problems.append("the model has no trainable parameters")
    problems += _find_mode_problems(model)
    problems += _find_cross_example_layers(model)
    problems += _find_peft_problems(model)
    problems += _find_engine_problems(model, engine)
    return problems


# ---- probe ----


def _slice_batch(batch: Mapping, start: int, stop: int, batch_size: int) -> dict:
    return {
        key: value[start:stop] if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == batch_size else value
        for key, value in batch.items()
    }


def _tolerance(parameter: torch.Tensor) -> float:
    return _PROBE_TOLERANCE.get(parameter.dtype, _LOW_PRECISION_TOLERANCE)


def _error_floor(gradients: list[torch.Tensor]) -> float:
    """Return the smallest norm that relative errors are measured against.

    Some gradients are zero in exact arithmetic (the key bias of softmax attention) and
    rounding noise in practice. Measured against their own norm, that noise would look
    like a large error. The floor is 1e-3 of the root-mean-square parameter-gradient norm.
    """
    if not gradients:
        return 0.0
    squares = sum(torch.linalg.vector_norm(g.double()).item() ** 2 for g in gradients)
    return 1e-3 * math.sqrt(squares / len(gradients))


def _relative_error(actual: torch.Tensor, expected: torch.Tensor, floor: float) -> float:
    """Return ||actual - expected|| / max(||expected||, floor)."""
    difference = torch.linalg.vector_norm((actual - expected).double()).item()
    scale = max(torch.linalg.vector_norm(expected.double()).item(), floor)
    return difference / scale if scale > 0 else difference


class _Probe:
    """Forward/backward passes on the first examples of a batch, with every side effect undone."""

    def __init__(self, model: nn.Module, engine: PerExampleGradients, batch: Mapping, loss_fn: LossFunction, size: int):
        batch = dict(batch)
        full_size = infer_batch_size((), batch)
        if full_size is None:
            raise ValueError("the probe batch has no tensor input with a batch dimension")
        self.size = min(size, full_size)
        self.batch = _slice_batch(batch, 0, self.size, full_size)
        self.model = model
        self.engine = engine
        self.loss_fn = loss_fn
        self.parameters = [(name, p) for name, p in model.named_parameters() if p.requires_grad]

    def _backward(self, batch: Mapping) -> None:
        for _, parameter in self.parameters:
            parameter.grad = None
        self.engine.clear_grad_samples()
        losses = self.loss_fn(self.model, batch)
        examples = infer_batch_size((), dict(batch))
        if losses.shape != (examples,):
            raise ValueError(f"the loss function returned shape {tuple(losses.shape)}, expected one loss per example ({examples},)")
        losses.sum().backward()

    def check_training_pass(self) -> list[str]:
        """Find unused parameters and parameters whose per-example gradients miss a use."""
        self._backward(self.batch)
        unused = [name for name, parameter in self.parameters if parameter.grad is None]
        floor = _error_floor([parameter.grad for _, parameter in self.parameters if parameter.grad is not None])
        mismatched = []
        for name, parameter in self.parameters:
            if parameter.grad is None:
                continue
            grad_sample = getattr(parameter, "grad_sample", None)
            if grad_sample is None:
                mismatched.append(f"{name} (no per-example gradient)")
                continue
            error = _relative_error(grad_sample.sum(dim=0), parameter.grad, floor)
            if error > _tolerance(parameter):
                mismatched.append(f"{name} (relative error {error:.1e})")

        problems = []
        if unused:
            problems.append(
                f"these trainable parameters get no gradient in a forward/backward on {self.size} training "
                f"examples: {_list_names(unused)}. They are unused in this configuration (for example DINOv2's "
                "mask_token, read only when bool_masked_pos is passed). Freeze them with requires_grad_(False)."
            )
        if mismatched:
            problems.append(
                f"the per-example gradients of these parameters do not add up to their batch gradient: "
                f"{_list_names(mismatched)}. They are used outside a call of the module that owns them, which "
                "the per-example hooks cannot see. Freeze them with requires_grad_(False)."
            )
        return problems

    def check_independence(self) -> list[str]:
        """Compare each example's per-example gradient with a backward on that example alone.

        The model runs in eval mode (no dropout) with the hooks forced on, so that the
        batched pass and the single-example passes compute the same function.
        """
        if self.size < 2:
            return []
        self.engine._capture_in_eval = True
        try:
            self.model.eval()
            self._backward(self.batch)
            batched = {name: parameter.grad_sample.clone() for name, parameter in self.parameters}
        finally:
            self.engine._capture_in_eval = False

        coupled = set()
        for index in range(self.size):
            with self.engine.disabled():
                self._backward(_slice_batch(self.batch, index, index + 1, self.size))
            alone = {
                name: parameter.grad if parameter.grad is not None else torch.zeros_like(parameter)
                for name, parameter in self.parameters
            }
            floor = _error_floor(list(alone.values()))
            for name, parameter in self.parameters:
                if _relative_error(batched[name][index], alone[name], floor) > _tolerance(parameter):
                    coupled.add(name)
        if not coupled:
            return []
        names = [name for name, _ in self.parameters if name in coupled]
        return [
            f"the per-example gradients of {_list_names(names)} change when other examples are in the "
            "micro-batch, so one example's gradient depends on the others (a batch statistic such as "
            "BatchNorm, a loss normalized over the batch, or inputs shared across the batch)"
        ]

    def run(self) -> list[str]:
        saved_grads = {name: parameter.grad for name, parameter in self.parameters}
        saved_modes = {module: module.training for module in self.model.modules()}
        devices = sorted({p.device for _, p in self.parameters if p.device.type != "cpu"}, key=str)
        saved_batch_size = self.engine._batch_size_override
        if saved_batch_size is not None:
            self.engine.set_batch_size(self.size)
        try:
            with torch.random.fork_rng(devices=devices, device_type=devices[0].type if devices else "cpu"):
                problems = self.check_training_pass()
                if not problems:
                    problems = self.check_independence()
        finally:
            self.engine.set_batch_size(saved_batch_size)
            for module, training in saved_modes.items():
                module.training = training
            self.engine.clear_grad_samples()
            for name, parameter in self.parameters:
                parameter.grad = saved_grads[name]
        return problems


def check_model_for_dp(
    model: nn.Module,
    engine: PerExampleGradients | None = None,
    *,
    probe_batch: Mapping | None = None,
    task: str | None = None,
    loss_fn: LossFunction | None = None,
    token_reduction: str = "mean",
    fp16: bool = False,
    bf16: bool = False,
    grad_scaler=None,
    probe_size: int = 2,
) -> None:
    """Raise UnsupportedModelError listing every reason `model` cannot be trained privately.

    Args:
        model: the model as it will be trained (PEFT already applied, in training mode).
        engine: the PerExampleGradients attached to `model`. Without one, a temporary
            engine is attached for the probe and removed afterwards.
        probe_batch: a collated training batch. Its first `probe_size` examples run one
            forward/backward in training mode. With two or more examples, the probe also
            compares batched and single-example gradients in eval mode. Parameters,
            gradients, modes and the RNG state are restored afterwards. Without a probe
            batch only the static checks run.
        task, token_reduction: passed to `compute_per_example_losses` (the default loss).
        loss_fn: `loss_fn(model, batch) -> Tensor[n]` of per-example losses, replacing the
            default loss.
        fp16, bf16, grad_scaler: the mixed-precision settings (see `find_mixed_precision_problems`).
        probe_size: number of examples the probe uses.
    """
    problems = find_mixed_precision_problems(fp16=fp16, bf16=bf16, grad_scaler=grad_scaler)
    model_problems = find_model_problems(model, engine)
    problems += model_problems
    if probe_batch is not None and not model_problems:
        if loss_fn is None:

            def loss_fn(model: nn.Module, batch: Mapping) -> torch.Tensor:
                return compute_per_example_losses(model, batch, task=task, token_reduction=token_reduction)[0]

        own_engine = engine is None
        probe_engine = PerExampleGradients(model) if own_engine else engine
        try:
            problems += _Probe(model, probe_engine, probe_batch, loss_fn, probe_size).run()
        except (RuntimeError, ValueError, NotImplementedError) as error:
            problems.append(f"a forward/backward on {probe_size} training examples failed: {error}")
        finally:
            if own_engine:
                probe_engine.remove()
    if problems:
        raise UnsupportedModelError(problems)
