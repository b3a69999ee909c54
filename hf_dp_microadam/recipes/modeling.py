"""Choose the trainable parameters of a pretrained model: LoRA adapters, the full model or its head."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence

import torch

from .arguments import LoraArguments, ModelArguments

logger = logging.getLogger(__name__)


def _matches(module_name: str, wanted: str) -> bool:
    return module_name == wanted or module_name.endswith("." + wanted)


def find_modules(model: torch.nn.Module, names: Sequence[str]) -> dict[str, list[str]]:
    """Return, for each name in `names`, the module paths of `model` equal to it or ending in `.name`."""
    found = {name: [] for name in names}
    for module_name, _ in model.named_modules():
        for name in names:
            if _matches(module_name, name):
                found[name].append(module_name)
    return found


def _require_modules(model: torch.nn.Module, names: Sequence[str]) -> None:
    missing = [name for name, paths in find_modules(model, names).items() if not paths]
    if missing:
        top_level = ", ".join(name for name, _ in model.named_children())
        raise ValueError(
            f"trainable_modules {missing} match no module of {type(model).__name__} "
            f"(its top-level modules: {top_level})"
        )


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """Return (trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


def freeze_parameters(model: torch.nn.Module, names: Sequence[str]) -> list[str]:
    """Set requires_grad=False on parameters whose name is in `names` or ends in `.name`; return them."""
    frozen = []
    for parameter_name, parameter in model.named_parameters():
        if any(_matches(parameter_name, name) for name in names) and parameter.requires_grad:
            parameter.requires_grad_(False)
            frozen.append(parameter_name)
    return frozen


def prepare_trainable_model(
    model: torch.nn.Module,
    model_args: ModelArguments,
    lora_args: LoraArguments,
    *,
    peft_task_type: str | None = None,
    default_trainable_modules: Sequence[str] = (),
    unused_parameters: Sequence[str] = (),
) -> torch.nn.Module:
    """Return the model to train, with `requires_grad` set by `model_args.finetuning`.

    - "full": every parameter is trained.
    - "head": only the modules in `model_args.trainable_modules` are trained.
    - "lora": PEFT LoRA adapters (see `LoraArguments`), plus the modules in
      `trainable_modules`, trained in full and saved with the adapter (`modules_to_save`).

    `trainable_modules` defaults to `default_trainable_modules` (the classification head).
    `unused_parameters` names parameters that the recipe's forward pass never reads, such
    as DINOv2's `mask_token` (read only with `bool_masked_pos`). They are frozen, because
    differentially private training needs a per-example gradient for every trainable
    parameter. The model is put in training mode: `from_pretrained` returns it in eval
    mode, in which the per-example gradient hooks record nothing.
    """
    if model_args.finetuning != "lora":
        defaults = LoraArguments()
        changed = [
            f"{field.name}={getattr(lora_args, field.name)!r}"
            for field in dataclasses.fields(lora_args)
            if getattr(lora_args, field.name) != getattr(defaults, field.name)
        ]
        if changed:
            logger.warning(
                "finetuning=%r trains no LoRA adapters, so %s has no effect; set finetuning to 'lora' to use it",
                model_args.finetuning, ", ".join(changed),
            )
    trainable_modules = list(model_args.trainable_modules or default_trainable_modules)
    if trainable_modules:
        _require_modules(model, trainable_modules)

    if model_args.finetuning == "lora":
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(
            r=lora_args.lora_r,
            lora_alpha=lora_args.lora_alpha,
            lora_dropout=lora_args.lora_dropout,
            target_modules=lora_args.lora_target_modules,
            modules_to_save=trainable_modules or None,
            task_type=peft_task_type,
        )
        model = get_peft_model(model, config)
    elif model_args.finetuning == "head":
        if not trainable_modules:
            raise ValueError("finetuning='head' needs trainable_modules, the names of the modules to train")
        model.requires_grad_(False)
        for name, module in model.named_modules():
            if any(_matches(name, wanted) for wanted in trainable_modules):
                module.requires_grad_(True)
    else:
        model.requires_grad_(True)

    frozen = freeze_parameters(model, unused_parameters)
    if frozen:
        logger.info("Frozen because the forward pass never reads them: %s", ", ".join(frozen))
    model.train()
    trainable, total = count_parameters(model)
    logger.info(
        "Fine-tuning %s: %s of %s parameters are trainable (%.2f%%)",
        model_args.finetuning, f"{trainable:,}", f"{total:,}", 100 * trainable / max(total, 1),
    )
    return model
