"""Per-example gradient formulas for single layers ("grad samplers").

A grad sampler has Opacus' signature: `sampler(module, activations, backprops)` takes the
module, the list of its positional inputs and the gradient of the summed loss with respect
to its output, both with the batch on dimension 0, and returns
`{parameter: tensor of shape [n, *parameter.shape]}`.

Opacus 1.6 registers samplers for the torch layers (Linear, Conv, GroupNorm, InstanceNorm,
nn.RMSNorm, ...). This module reuses those and adds what Hugging Face models need:

- `transformers.pytorch_utils.Conv1D` (GPT-2), whose weight is stored as [in, out];
- nn.Embedding with `padding_idx` (BERT): autograd leaves the padding row's gradient at
  zero, and Opacus' sampler does not;
- nn.LayerNorm with `bias=False`, which Opacus' sampler does not accept;
- model-specific RMSNorm classes (LlamaRMSNorm, GemmaRMSNorm, T5LayerNorm, ...) and
  layer-scale modules (Dinov2LayerScale), recognised by running the module once on a
  random input and comparing the output with the formula the sampler assumes.

Modules without a sampler get the generic fallback in `replay.py`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from opacus.grad_sample import GradSampleHooks
from opacus.grad_sample.embedding import compute_embedding_grad_sample as _opacus_embedding_grad_sample
from opacus.utils.tensor_utils import sum_over_all_but_batch_and_last_n
from transformers.pytorch_utils import Conv1D

GradSampler = Callable[[nn.Module, list, torch.Tensor], dict]

# Attribute names under which RMSNorm implementations in transformers store epsilon.
_EPSILON_ATTRIBUTES = ("variance_epsilon", "eps", "epsilon")


def compute_conv1d_grad_sample(layer: Conv1D, activations: list, backprops: torch.Tensor) -> dict:
    """Compute per-example gradients of GPT-2's Conv1D, `y = x @ weight + bias` with weight [in, out]."""
    inputs = activations[0].to(backprops.dtype)
    grad_samples = {}
    if layer.weight.requires_grad:
        grad_samples[layer.weight] = torch.einsum("n...i,n...j->nij", inputs, backprops)
    if layer.bias is not None and layer.bias.requires_grad:
        grad_samples[layer.bias] = torch.einsum("n...j->nj", backprops)
    return grad_samples


def compute_embedding_grad_sample(layer: nn.Embedding, activations: list, backprops: torch.Tensor) -> dict:
    """Compute per-example gradients of nn.Embedding, with a zero gradient for the padding row."""
    grad_samples = _opacus_embedding_grad_sample(layer, activations, backprops)
    if layer.padding_idx is not None and layer.weight in grad_samples:
        grad_samples[layer.weight][:, layer.padding_idx] = 0
    return grad_samples


def compute_layer_norm_grad_sample(layer: nn.LayerNorm, activations: list, backprops: torch.Tensor) -> dict:
    """Compute per-example gradients of nn.LayerNorm, with or without a bias."""
    inputs = activations[0]
    grad_samples = {}
    if layer.weight is not None and layer.weight.requires_grad:
        normalized = F.layer_norm(inputs, layer.normalized_shape, eps=layer.eps)
        grad_samples[layer.weight] = sum_over_all_but_batch_and_last_n(normalized * backprops, layer.weight.dim())
    if layer.bias is not None and layer.bias.requires_grad:
        grad_samples[layer.bias] = sum_over_all_but_batch_and_last_n(backprops, layer.bias.dim())
    return grad_samples


def _rms_normalize(inputs: torch.Tensor, eps: float) -> torch.Tensor:
    """Return `x / sqrt(mean(x^2) + eps)` over the last dimension, in the input's dtype.

    The normalization runs in float32 whatever the input dtype, as the transformers RMSNorm
    classes do, so the result matches theirs bit for bit.
    """
    normalized = inputs.float()
    normalized = normalized * torch.rsqrt(normalized.pow(2).mean(-1, keepdim=True) + eps)
    return normalized.to(inputs.dtype)


def _make_rms_norm_grad_sampler(eps: float) -> GradSampler:
    def compute_rms_norm_grad_sample(layer: nn.Module, activations: list, backprops: torch.Tensor) -> dict:
        # The output is `w * rms(x)` or `(1 + w) * rms(x)`, and both have the gradient rms(x) * dy.
        weight = layer.weight
        compute_dtype = torch.promote_types(backprops.dtype, torch.float32)
        normalized = _rms_normalize(activations[0], eps).to(compute_dtype)
        grad_sample = sum_over_all_but_batch_and_last_n(normalized * backprops.to(compute_dtype), 1)
        return {weight: grad_sample.to(weight.dtype)}

    return compute_rms_norm_grad_sample


def _make_scale_grad_sampler(parameter_name: str) -> GradSampler:
    def compute_scale_grad_sample(layer: nn.Module, activations: list, backprops: torch.Tensor) -> dict:
        # The output is `x * scale`, elementwise over the last dimension.
        scale = getattr(layer, parameter_name)
        inputs = activations[0].to(backprops.dtype)
        return {scale: sum_over_all_but_batch_and_last_n(inputs * backprops, 1)}

    return compute_scale_grad_sample


# Samplers by module class: Opacus' registry as of import time, with the entries below replacing its own.
_SAMPLERS: dict[type, GradSampler] = dict(GradSampleHooks.GRAD_SAMPLERS)
_SAMPLERS[Conv1D] = compute_conv1d_grad_sample
_SAMPLERS[nn.Embedding] = compute_embedding_grad_sample
_SAMPLERS[nn.LayerNorm] = compute_layer_norm_grad_sample


def _registered_sampler(module: nn.Module) -> GradSampler | None:
    """Return the sampler of the module's class, or of a base class whose forward it keeps."""
    module_class = type(module)
    for base in module_class.__mro__:
        if base in _SAMPLERS:
            # A subclass that overrides forward may compute something else.
            if module_class.forward is base.forward:
                return _SAMPLERS[base]
            return None
    return None


def _single_vector_parameter(module: nn.Module) -> tuple[str, nn.Parameter] | None:
    """Return the module's only parameter if it is 1-D and the module has no children."""
    if any(True for _ in module.children()):
        return None
    parameters = [(name, p) for name, p in module.named_parameters(recurse=False)]
    if len(parameters) != 1:
        return None
    name, parameter = parameters[0]
    if parameter.dim() != 1 or parameter.device.type == "meta":
        return None
    return name, parameter


def _run_with_parameter(module: nn.Module, name: str, value: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor | None:
    try:
        output = torch.func.functional_call(module, {name: value}, (inputs,))
    except (TypeError, RuntimeError, ValueError):
        return None
    if not isinstance(output, torch.Tensor) or output.shape != inputs.shape:
        return None
    return output


def _calibrated_sampler(module: nn.Module) -> GradSampler | None:
    """Recognise RMSNorm and layer-scale modules by their output on a random input.

    The module runs once under no_grad with a random value of its parameter. It gets the
    RMSNorm sampler if the output equals `w * rms(x)` or `(1 + w) * rms(x)` with the
    module's own epsilon, and the scale sampler if it equals `x * w`.
    """
    found = _single_vector_parameter(module)
    if found is None:
        return None
    name, parameter = found
    size = parameter.shape[0]
    dtype = parameter.dtype if parameter.dtype in (torch.float32, torch.float64) else torch.float32
    generator = torch.Generator(device="cpu").manual_seed(0)
    inputs = torch.randn(2, 3, size, generator=generator, dtype=dtype).to(parameter.device)
    value = torch.randn(size, generator=generator, dtype=dtype).to(parameter.device)
    tolerance = {"rtol": 1e-4, "atol": 1e-5}

    with torch.no_grad():
        output = _run_with_parameter(module, name, value, inputs)
        if output is None:
            return None
        output = output.to(dtype)

        if torch.allclose(output, inputs * value, **tolerance):
            return _make_scale_grad_sampler(name)

        if name != "weight":
            return None
        for attribute in _EPSILON_ATTRIBUTES:
            eps = getattr(module, attribute, None)
            if not isinstance(eps, float):
                continue
            normalized = _rms_normalize(inputs, eps).to(dtype)
            if torch.allclose(output, value * normalized, **tolerance):
                return _make_rms_norm_grad_sampler(eps)
            if torch.allclose(output, (1 + value) * normalized, **tolerance):
                return _make_rms_norm_grad_sampler(eps)
    return None


def find_grad_sampler(module: nn.Module) -> GradSampler | None:
    """Return the grad sampler for `module`, or None if it needs the generic fallback."""
    sampler = _registered_sampler(module)
    if sampler is not None:
        return sampler
    return _calibrated_sampler(module)


def unsupported_module_reason(module: nn.Module) -> str | None:
    """Return why no per-example gradient can be computed for the module, or None."""
    if isinstance(module, nn.Embedding):
        if module.max_norm is not None:
            return "nn.Embedding with max_norm rescales weight rows in place during the forward"
        if module.scale_grad_by_freq:
            return "nn.Embedding with scale_grad_by_freq scales gradients by batch-wide token counts"
        if module.sparse:
            return "nn.Embedding with sparse=True produces sparse gradients"
    return None
