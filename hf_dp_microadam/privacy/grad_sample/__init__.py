"""Per-example gradients for Hugging Face and PEFT models, without wrapping the model."""

from .engine import PerExampleGradients, clear_grad_samples, infer_batch_size

__all__ = ["PerExampleGradients", "clear_grad_samples", "infer_batch_size"]
