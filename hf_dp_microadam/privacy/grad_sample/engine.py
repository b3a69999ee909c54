"""Per-example gradients for Hugging Face and PEFT models, by hooks on the model's modules.

The model object stays as it is: same class, `save_pretrained`, `generate`, `config`,
`gradient_checkpointing_enable` and forward signature. Only hooks are added.

How a micro-batch of n examples is processed:

1. A forward pre-hook on the model reads n from its inputs (`input_ids`, `pixel_values`,
   ...), so that a module whose activations have batch 1 cannot change it.
2. Each module that owns trainable parameters gets a forward hook. It keeps the module's
   inputs and registers a hook on the module's output tensors. A trainable nn.Embedding
   can be called with an index of batch 1 (HF's default `position_ids` of shape [1, T]).
   Its index is expanded to [n, T] first: the output values stay the same, but each
   example gets its own rows, so its gradient can be separated.
3. In the backward, the output hook receives dL/d(output) and computes per-example
   gradients, with a layer formula (`samplers.py`) or by replaying the module
   (`replay.py`), and adds them to `p.grad_sample`. A parameter used by several modules
   (GPT-2's tied `wte` and `lm_head`) gets the sum of all its uses.
   A module call whose outputs do not have the batch on dimension 0 cannot be split per
   example at its own output. Examples are Swin's relative position bias, computed once
   for the whole batch, and layers on flattened windows or tokens. Such a call is deferred
   to the closest enclosing module call whose outputs are batched. In the backward that
   call is replayed, with proxy copies of the deferred calls' parameters, and the
   gradients with respect to the proxies are split per example. That costs one backward
   through the enclosing module per example.
4. At the end of the backward, every covered trainable parameter that no hook reached
   gets zeros, and a parameter that received `p.grad` but no per-example gradient (used
   outside any module call) raises an error.

Opacus' GradSampleHooks is not used as the hook manager because it infers n from each
module's activations, keeps activations on the module until a backward consumes them,
accumulates micro-batches into a list, and its functorch fallback drops keyword inputs.
Its layer formulas are used through `samplers.py`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn as nn
from torch.autograd.graph import register_multi_grad_hook
from torch.utils import _pytree as pytree

from .calls import (
    CapturedCall,
    Frame,
    HookedModule,
    parameter_slots,
    restore_parameters,
    restoring_swaps,
    swap_in_proxies,
)
from .replay import capture_forward_state, per_example_vjp, restored_forward_state
from .samplers import find_grad_sampler, unsupported_module_reason

# Model inputs that carry the batch on dimension 0, in the order they are tried.
_BATCH_INPUT_NAMES = (
    "input_ids",
    "inputs_embeds",
    "pixel_values",
    "input_values",
    "input_features",
    "attention_mask",
)

# Attribute set on a model while an engine is attached, so that a second engine is rejected.
_ENGINE_ATTRIBUTE = "_per_example_gradients_engine"


def infer_batch_size(args: tuple, kwargs: dict) -> int | None:
    """Return the batch size of a model call: dimension 0 of its main input, or None."""
    for name in _BATCH_INPUT_NAMES:
        value = kwargs.get(name)
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return value.shape[0]
    for value in list(args) + list(kwargs.values()):
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return value.shape[0]
    return None


def clear_grad_samples(model: nn.Module) -> None:
    """Set `p.grad_sample` to None on every parameter of `model` that has one."""
    for parameter in model.parameters():
        if getattr(parameter, "grad_sample", None) is not None:
            parameter.grad_sample = None


def _owned_trainable_parameters(module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """Trainable parameters that `module` uses itself: its own, and those of ParameterDict/List children.

    A ParameterDict is never called, so its parameters belong to the module that reads them
    (PEFT keeps `lora_embedding_A` and `lora_embedding_B` this way).
    """
    owned = [(name, p) for name, p in module.named_parameters(recurse=False) if p.requires_grad]
    for child_name, child in module.named_children():
        if isinstance(child, (nn.ParameterDict, nn.ParameterList)):
            owned += [(f"{child_name}.{name}", p) for name, p in child.named_parameters() if p.requires_grad]
    return owned


def _is_token_embedding(module: nn.Module) -> bool:
    """Whether the module looks up rows by an index input: nn.Embedding, or a PEFT LoRA wrapper of one."""
    return isinstance(module, nn.Embedding) or isinstance(getattr(module, "base_layer", None), nn.Embedding)


@dataclass
class _ReplayPlan:
    """State of a replay of an enclosing call for its deferred calls."""

    deferred_calls: dict[int, HookedModule]
    proxies: dict[int, torch.Tensor]
    batch_size: int
    next_index: int = 0


class PerExampleGradients:
    """Fill `p.grad_sample` with per-example gradients for every trainable parameter of a model.

    Usage, for a micro-batch of n examples::

        engine = PerExampleGradients(model)      # after get_peft_model and requires_grad_
        losses = per_example_losses(...)          # shape [n], one loss per example
        losses.sum().backward()                   # summed, never averaged
        # p.grad_sample: [n, *p.shape] for every trainable p
        engine.clear_grad_samples()               # before the next micro-batch
        engine.remove()                           # detach all hooks

    Hooks are inactive in eval mode, under no_grad, and inside `engine.disabled()`.

    Args:
        model: the model to attach to, called as a whole for each micro-batch (a PEFT
            model, or a transformers model). Apply `get_peft_model` and set
            `requires_grad` before attaching: parameters that become trainable later
            have no hooks, and the next training forward raises.
        batch_size: fixed micro-batch size, for models whose inputs do not show it;
            by default it is read from each call's inputs. See `set_batch_size`.
    """

    def __init__(self, model: nn.Module, *, batch_size: int | None = None) -> None:
        if getattr(model, _ENGINE_ATTRIBUTE, None) is not None:
            raise ValueError(
                "this model already has a PerExampleGradients engine attached: call remove() on it first"
            )
        self.model = model
        self._batch_size_override = batch_size
        self._batch_size: int | None = None
        self._generation = 0
        self._call_sequence = 0
        self._enabled = True
        self._replaying = False
        self._replay: _ReplayPlan | None = None
        self._capture_in_eval = False
        self._callback_queued = False
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._frames: list[Frame] = []
        self._covered: dict[int, nn.Parameter] = {}
        self._names: dict[int, str] = {}
        self._grad_sample_generation: dict[int, int] = {}
        self._contributed: set[int] = set()
        self._grad_received: set[int] = set()
        self._unused_names: list[str] = []
        self._attach()
        setattr(model, _ENGINE_ATTRIBUTE, self)

    # ---- public API ----

    def set_batch_size(self, batch_size: int | None) -> None:
        """Fix the micro-batch size n for the following forwards, or None to read it from the inputs."""
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer or None, got {batch_size}")
        self._batch_size_override = batch_size

    def clear_grad_samples(self) -> None:
        """Set `p.grad_sample` to None on every parameter that this engine covers."""
        for parameter in self._covered.values():
            parameter.grad_sample = None

    def remove(self) -> None:
        """Remove all hooks, and the `grad_sample` attribute from the covered parameters."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for parameter in self._covered.values():
            if hasattr(parameter, "grad_sample"):
                del parameter.grad_sample
        self._covered.clear()
        self._enabled = False
        if getattr(self.model, _ENGINE_ATTRIBUTE, None) is self:
            delattr(self.model, _ENGINE_ATTRIBUTE)

    @contextlib.contextmanager
    def disabled(self) -> Iterator[None]:
        """Run the body with all hooks inactive (a non-private forward and backward)."""
        previous = self._enabled
        self._enabled = False
        try:
            yield
        finally:
            self._enabled = previous

    def covers(self, parameter: torch.Tensor) -> bool:
        """Return whether `parameter` gets per-example gradients from this engine."""
        return id(parameter) in self._covered

    @property
    def covered_parameter_names(self) -> list[str]:
        """Names of the parameters that get per-example gradients."""
        return [self._names[key] for key in self._covered]

    @property
    def unused_parameter_names(self) -> list[str]:
        """Trainable parameters that got no gradient at all in the latest backward (zero-filled)."""
        return list(self._unused_names)

    def uncovered_trainable_parameter_names(self) -> list[str]:
        """Names of trainable parameters without hooks (made trainable after the engine was attached)."""
        return [name for name, p in self.model.named_parameters() if p.requires_grad and not self.covers(p)]

    # ---- attaching ----

    def _attach(self) -> None:
        for name, parameter in self.model.named_parameters(remove_duplicate=False):
            self._names.setdefault(id(parameter), name)

        problems = []
        hooked_names = []
        for module_name, module in self.model.named_modules():
            if isinstance(module, (nn.ParameterDict, nn.ParameterList)):
                continue  # never called, covered through the module that reads it
            owned = _owned_trainable_parameters(module)
            if not owned:
                continue
            reason = unsupported_module_reason(module)
            if reason is not None:
                problems.append(f"{module_name or type(module).__name__}: {reason}")
                continue
            own_parameters = {id(p) for p in module.parameters(recurse=False)}
            sampler = find_grad_sampler(module)
            if sampler is not None and not all(id(p) in own_parameters for _, p in owned):
                sampler = None
            slots = parameter_slots(module, [name for name, _ in owned])
            hooked = HookedModule(module_name, module, [p for _, p in owned], slots, sampler)
            self._handles.append(
                module.register_forward_pre_hook(partial(self._before_hooked_call, hooked), with_kwargs=True)
            )
            self._handles.append(
                module.register_forward_hook(partial(self._after_hooked_call, hooked), with_kwargs=True)
            )
            hooked_names.append(module_name)
            for _, parameter in owned:
                self._covered[id(parameter)] = parameter
        if problems:
            self.remove()
            raise ValueError(
                "per-example gradients are not supported for these trainable modules: "
                + "; ".join(problems)
                + ". Freeze them with requires_grad_(False) or change their configuration."
            )

        self._register_frame_hooks(hooked_names)
        # Prepended last, so that it runs before every other hook of the model.
        self._handles.append(
            self.model.register_forward_pre_hook(self._on_model_forward, with_kwargs=True, prepend=True)
        )
        for parameter in self._covered.values():
            parameter.grad_sample = None
            self._handles.append(parameter.register_post_accumulate_grad_hook(self._on_grad_accumulated))

    def _register_frame_hooks(self, hooked_names: list[str]) -> None:
        """Give every module that encloses a hooked module the hooks of a possible replay."""
        modules = dict(self.model.named_modules())
        ancestors = set()
        for name in hooked_names:
            parts = name.split(".") if name else []
            ancestors.update(".".join(parts[:length]) for length in range(len(parts)))
        device = next((p.device for p in self._covered.values()), torch.device("cpu"))
        for name in sorted(ancestors):
            module = modules[name]
            # Prepended, so that a frame starts before the module's own hooked call is numbered.
            self._handles.append(
                module.register_forward_pre_hook(partial(self._push_frame, name, device), prepend=True)
            )
            self._handles.append(module.register_forward_hook(partial(self._pop_frame, name), with_kwargs=True))

    # ---- forward hooks ----

    def _counts_as_call(self, module: nn.Module) -> bool:
        return self._enabled and torch.is_grad_enabled() and (module.training or self._capture_in_eval)

    def _is_capturing(self, module: nn.Module) -> bool:
        return not self._replaying and self._counts_as_call(module)

    def _on_model_forward(self, model: nn.Module, args: tuple, kwargs: dict) -> None:
        if not self._is_capturing(model):
            return
        uncovered = self.uncovered_trainable_parameter_names()
        if uncovered:
            raise RuntimeError(
                f"{len(uncovered)} trainable parameters have no per-example gradient hooks, for example "
                f"{', '.join(uncovered[:5])}. They became trainable after PerExampleGradients was attached "
                "(for example get_peft_model was applied afterwards), so their updates would not be private. "
                "Call remove() on the engine, finish preparing the model (get_peft_model, requires_grad_), "
                "then attach a new PerExampleGradients."
            )
        self._generation += 1
        self._frames.clear()
        self._batch_size = self._batch_size_override or infer_batch_size(args, kwargs)
        self._contributed.clear()
        self._grad_received.clear()

    def _current_batch_size(self, hooked: HookedModule) -> int:
        if self._batch_size_override is not None:
            return self._batch_size_override
        if self._batch_size is None:
            raise RuntimeError(
                f"the micro-batch size is unknown when {hooked.name or 'the model'} runs. Call the model "
                "that PerExampleGradients was attached to with its batch inputs (input_ids, pixel_values, ...), "
                "or call set_batch_size(n)."
            )
        return self._batch_size

    @staticmethod
    def _expand_index(module: nn.Module, args: tuple, batch_size: int | None) -> tuple:
        """Expand an embedding's index of batch 1 (HF's default [1, T] position_ids) to the batch size."""
        if not _is_token_embedding(module) or not args or not isinstance(args[0], torch.Tensor):
            return args
        index = args[0]
        if batch_size is None or batch_size == 1 or index.dim() == 0 or index.shape[0] != 1:
            return args
        return (index.expand(batch_size, *index.shape[1:]),) + tuple(args[1:])

    def _before_hooked_call(self, hooked: HookedModule, module: nn.Module, args: tuple, kwargs: dict):
        if self._replay is not None:
            return self._before_replayed_call(hooked, module, args, kwargs)
        if not self._is_capturing(module):
            return None
        sequence = self._call_sequence
        self._call_sequence += 1
        state = capture_forward_state(hooked.parameters[0].device) if hooked.sampler is None else None
        hooked.pending_calls.append((sequence, state))
        expanded = self._expand_index(module, args, self._batch_size_override or self._batch_size)
        return None if expanded is args else (expanded, kwargs)

    def _before_replayed_call(self, hooked: HookedModule, module: nn.Module, args: tuple, kwargs: dict):
        """Number the call inside a replay, and give a deferred call its proxy parameters."""
        if not self._counts_as_call(module):
            return None
        plan = self._replay
        index = plan.next_index
        plan.next_index += 1
        target = plan.deferred_calls.get(index)
        if target is not None and target is not hooked:
            raise RuntimeError(
                f"a replay ran {hooked.name} where the forward ran {target.name}, but per-example "
                "gradients need a forward that repeats the same module calls for the same inputs"
            )
        hooked.replay_swaps.append(swap_in_proxies(hooked, plan.proxies) if target is not None else None)
        expanded = self._expand_index(module, args, plan.batch_size)
        return None if expanded is args else (expanded, kwargs)

    def _after_hooked_call(self, hooked: HookedModule, module: nn.Module, args: tuple, kwargs: dict, output) -> None:
        if self._replay is not None:
            if self._counts_as_call(module) and hooked.replay_swaps:
                swapped = hooked.replay_swaps.pop()
                if swapped:
                    restore_parameters(swapped)
            return
        if not self._is_capturing(module) or not hooked.pending_calls:
            return
        sequence, state = hooked.pending_calls.pop()
        if hooked.sampler is not None and not isinstance(output, torch.Tensor):
            raise RuntimeError(
                f"{hooked.name} ({type(module).__name__}) returned {type(output).__name__}, but its grad sampler "
                "expects a single tensor output"
            )
        leaves = pytree.tree_leaves(output)
        indices = [i for i, leaf in enumerate(leaves) if isinstance(leaf, torch.Tensor) and leaf.requires_grad]
        outputs = [leaves[i] for i in indices]
        if not indices or self._defer_if_shared(hooked, sequence, (args, kwargs), outputs):
            return

        if hooked.sampler is not None:
            # Grad samplers take the inputs positionally, in the order of the forward signature.
            call = self._capture_call(hooked, tuple(args) + tuple(kwargs.values()), {})
            output.register_hook(partial(self._backward_with_sampler, call))
        else:
            call = self._capture_call(hooked, args, kwargs)
            call.state = state
            call.output_leaf_indices = indices
            register_multi_grad_hook(outputs, partial(self._backward_with_replay, call))

    @staticmethod
    def _is_batched(inputs, outputs: list[torch.Tensor], batch_size: int) -> bool:
        """Return whether a call can be split per example at its outputs.

        Every output must have the batch on dimension 0, and so must at least one tensor
        input: a call without batched inputs (Swin's and BEiT's relative position bias
        modules take none) computes something shared by the whole batch.
        """
        # NOTE: a shared tensor whose first dimension happens to equal the micro-batch size
        # passes as batched when it also reaches the call through a batched-looking input.
        def has_batch(tensor: torch.Tensor) -> bool:
            return tensor.dim() > 0 and tensor.shape[0] == batch_size

        input_tensors = [leaf for leaf in pytree.tree_leaves(inputs) if isinstance(leaf, torch.Tensor)]
        return all(has_batch(output) for output in outputs) and any(has_batch(t) for t in input_tensors)

    def _defer_if_shared(self, hooked: HookedModule, sequence: int, inputs, outputs: list[torch.Tensor]) -> bool:
        """Hand the call to the enclosing call if it cannot be split per example at its outputs.

        Returns True when the call needs no per-example hook of its own.
        """
        batch_size = self._current_batch_size(hooked)
        if self._is_batched(inputs, outputs, batch_size):
            return False
        frame = next((f for f in reversed(self._frames) if f.module is not hooked.module), None)
        if frame is not None:
            frame.deferred.append((sequence, hooked))
            return True
        if torch._C._current_graph_task_id() != -1:
            # A recomputation inside the backward (gradient checkpointing). Its outputs
            # receive no gradient from a non-reentrant checkpoint, and with a reentrant one
            # the end-of-backward check reports the parameters as missed.
            return True
        self._raise_not_separable(hooked.name, type(hooked.module).__name__, outputs, batch_size)

    @staticmethod
    def _raise_not_separable(name: str, class_name: str, outputs: list[torch.Tensor], batch_size: int):
        shapes = [tuple(output.shape) for output in outputs]
        raise RuntimeError(
            f"{name} ({class_name}) produced outputs of shape {shapes} for a micro-batch of {batch_size} "
            "examples, and no enclosing module call has outputs with the batch on dimension 0, so its "
            "per-example gradients cannot be separated. Freeze its parameters with requires_grad_(False), "
            "or call set_batch_size(n) if the batch size is wrong."
        )

    def _push_frame(self, name: str, device: torch.device, module: nn.Module, args: tuple) -> None:
        if self._is_capturing(module):
            self._frames.append(Frame(name, module, capture_forward_state(device), self._call_sequence))

    def _pop_frame(self, name: str, module: nn.Module, args: tuple, kwargs: dict, output) -> None:
        if not self._is_capturing(module):
            return
        # Discard frames of calls that raised before their forward hook ran.
        while self._frames and self._frames[-1].module is not module:
            self._frames.pop()
        if not self._frames:
            return
        frame = self._frames.pop()
        if not frame.deferred:
            return

        leaves = pytree.tree_leaves(output)
        indices = [i for i, leaf in enumerate(leaves) if isinstance(leaf, torch.Tensor) and leaf.requires_grad]
        outputs = [leaves[i] for i in indices]
        if not outputs:
            return
        batch_size = self._batch_size_override or self._batch_size
        if not self._is_batched((args, kwargs), outputs, batch_size):
            if self._frames:
                self._frames[-1].deferred.extend(frame.deferred)
            elif torch._C._current_graph_task_id() == -1:
                first = frame.deferred[0][1]
                self._raise_not_separable(first.name, type(first.module).__name__, outputs, batch_size)
            return

        parameters = list({id(p): p for _, deferred in frame.deferred for p in deferred.parameters}.values())
        hooked = HookedModule(name, module, parameters, slots=[], sampler=None)
        call = self._capture_call(hooked, args, kwargs)
        call.state = frame.state
        call.output_leaf_indices = indices
        call.deferred_calls = {sequence - frame.start: deferred for sequence, deferred in frame.deferred}
        register_multi_grad_hook(outputs, partial(self._backward_with_frame_replay, call))

    def _capture_call(self, hooked: HookedModule, args: tuple, kwargs: dict) -> CapturedCall:
        # NOTE: under non-reentrant gradient checkpointing these references keep the inputs
        # of hooked modules alive from the first forward until the backward, so checkpointing
        # saves less memory for them (the per-example gradients stay exact).
        versions: list[tuple[torch.Tensor, int]] = []

        def detach(value):
            if not isinstance(value, torch.Tensor):
                return value
            versions.append((value, value._version))
            return value.detach()

        args, kwargs = pytree.tree_map(detach, (tuple(args), dict(kwargs)))
        return CapturedCall(hooked, args, kwargs, versions, self._current_batch_size(hooked), self._generation)

    # ---- backward hooks ----

    def _check_call(self, call: CapturedCall, output_grads: list[torch.Tensor]) -> None:
        name = f"{call.hooked.name} ({type(call.hooked.module).__name__})"
        for tensor, version in call.versions:
            if tensor._version != version:
                raise RuntimeError(
                    f"an input of {name} was modified in place after the module ran, so its per-example "
                    "gradient cannot be computed"
                )
        batched = [grad for grad in output_grads if grad.dim() > 0 and grad.shape[0] == call.batch_size]
        if len(batched) != len(output_grads):
            shapes = [tuple(grad.shape) for grad in output_grads]
            raise RuntimeError(
                f"{name} produced outputs of shape {shapes} for a micro-batch of {call.batch_size} examples. "
                "Per-example gradients need the batch on dimension 0 of every output of a trainable module. "
                "A module that sees one shared input for the whole batch (batch dimension 1) mixes the "
                "examples. If the batch size is wrong, call set_batch_size(n)."
            )

    def _backward_with_sampler(self, call: CapturedCall, output_grad: torch.Tensor) -> None:
        if not self._enabled:
            return
        self._check_call(call, [output_grad])
        inputs = call.args
        if inputs and isinstance(inputs[0], torch.Tensor) and (inputs[0].dim() == 0 or inputs[0].shape[0] != call.batch_size):
            raise RuntimeError(
                f"{call.hooked.name} ({type(call.hooked.module).__name__}) received an input of shape "
                f"{tuple(inputs[0].shape)} for a micro-batch of {call.batch_size} examples, but per-example "
                "gradients need the batch on dimension 0"
            )
        grad_samples = call.hooked.sampler(call.hooked.module, list(inputs), output_grad)
        for parameter, grad_sample in grad_samples.items():
            self._add_grad_sample(parameter, grad_sample, call)
        self._queue_end_of_backward(call)

    def _backward_with_replay(self, call: CapturedCall, output_grads) -> None:
        """Replay a module call and take per-example gradients of the module's own parameters."""
        if not self._enabled:
            return
        pairs = [(index, grad) for index, grad in zip(call.output_leaf_indices, output_grads) if grad is not None]
        if not pairs:
            return
        self._check_call(call, [grad for _, grad in pairs])

        self._replaying = True
        try:
            with restored_forward_state(call.state), torch.enable_grad():
                replayed = pytree.tree_leaves(call.hooked.module(*call.args, **call.kwargs))
            outputs = [replayed[index] for index, _ in pairs]
            grads = per_example_vjp(outputs, [grad for _, grad in pairs], call.hooked.parameters, call.batch_size)
        finally:
            self._replaying = False

        for parameter, grad_sample in zip(call.hooked.parameters, grads):
            if grad_sample is not None:
                self._add_grad_sample(parameter, grad_sample, call)
        self._queue_end_of_backward(call)

    def _backward_with_frame_replay(self, call: CapturedCall, output_grads) -> None:
        """Replay an enclosing call and take per-example gradients through its deferred calls only.

        The deferred calls run with proxy copies of their parameters, so that other calls
        of the same modules, which have their own hooks, are not counted twice.
        """
        if not self._enabled:
            return
        pairs = [(index, grad) for index, grad in zip(call.output_leaf_indices, output_grads) if grad is not None]
        if not pairs:
            return
        self._check_call(call, [grad for _, grad in pairs])

        parameters = call.hooked.parameters
        proxies = {id(p): p.detach().requires_grad_(True) for p in parameters}
        deferred_modules = list({id(h): h for h in call.deferred_calls.values()}.values())
        self._replay = _ReplayPlan(call.deferred_calls, proxies, call.batch_size)
        self._replaying = True
        try:
            with restoring_swaps(deferred_modules), restored_forward_state(call.state), torch.enable_grad():
                replayed = pytree.tree_leaves(call.hooked.module(*call.args, **call.kwargs))
            if self._replay.next_index <= max(call.deferred_calls):
                raise RuntimeError(
                    f"a replay of {call.hooked.name} made fewer module calls than its forward, but per-example "
                    "gradients need a forward that repeats the same module calls for the same inputs"
                )
            outputs = [replayed[index] for index, _ in pairs]
            grads = per_example_vjp(
                outputs, [grad for _, grad in pairs], [proxies[id(p)] for p in parameters], call.batch_size
            )
        finally:
            self._replay = None
            self._replaying = False

        for parameter, grad_sample in zip(parameters, grads):
            if grad_sample is not None:
                self._add_grad_sample(parameter, grad_sample, call)
        self._queue_end_of_backward(call)

    def _add_grad_sample(self, parameter: nn.Parameter, grad_sample: torch.Tensor, call: CapturedCall) -> None:
        key = id(parameter)
        if key not in self._covered or not parameter.requires_grad:
            return
        expected = (call.batch_size,) + tuple(parameter.shape)
        if tuple(grad_sample.shape) != expected:
            raise RuntimeError(
                f"per-example gradient of {self._names[key]} has shape {tuple(grad_sample.shape)}, expected {expected}"
            )
        grad_sample = grad_sample.to(parameter.dtype)
        current = getattr(parameter, "grad_sample", None)
        if current is None:
            parameter.grad_sample = grad_sample.contiguous()
            self._grad_sample_generation[key] = call.generation
        elif self._grad_sample_generation.get(key) != call.generation:
            raise RuntimeError(
                f"{self._names[key]}.grad_sample still contains the per-example gradients of an earlier "
                "micro-batch. Clear them (engine.clear_grad_samples(), or let the DP optimizer consume them) "
                "before the next backward, and run one backward per forward."
            )
        else:
            current.add_(grad_sample)
        self._contributed.add(key)

    def _on_grad_accumulated(self, parameter: torch.Tensor) -> None:
        self._grad_received.add(id(parameter))

    def _queue_end_of_backward(self, call: CapturedCall) -> None:
        if self._callback_queued:
            return
        self._callback_queued = True
        torch.autograd.Variable._execution_engine.queue_callback(
            partial(self._on_backward_end, call.batch_size, call.generation)
        )

    def _on_backward_end(self, batch_size: int, generation: int) -> None:
        # With reentrant gradient checkpointing this also runs at the end of each nested
        # backward. Zero-filling early is harmless because later gradients are added to it.
        self._callback_queued = False
        missed, unused = [], []
        for key, parameter in self._covered.items():
            if not parameter.requires_grad or key in self._contributed:
                continue
            if key in self._grad_received:
                missed.append(self._names[key])
                continue
            unused.append(self._names[key])
            if getattr(parameter, "grad_sample", None) is None:
                parameter.grad_sample = torch.zeros(
                    (batch_size,) + tuple(parameter.shape), dtype=parameter.dtype, device=parameter.device
                )
                self._grad_sample_generation[key] = generation
        self._unused_names = unused
        if missed:
            raise RuntimeError(
                f"these parameters received a gradient but no per-example gradient: {', '.join(missed)}. "
                "They are used outside a call of the module that owns them (for example a weight read as "
                "module.weight by another module), which the per-example hooks cannot see, or inside a "
                "layer checkpointed with use_reentrant=True in a computation shared by the whole batch. "
                "Freeze them with requires_grad_(False)."
            )

    def __repr__(self) -> str:
        return f"{type(self).__name__}({type(self.model).__name__}, {len(self._covered)} parameters)"
