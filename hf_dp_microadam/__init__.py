"""Differentially private fine-tuning of Hugging Face models with DP-MicroAdam.

The public names are imported lazily, so that `import hf_dp_microadam` stays cheap and
the optimizers can be used without loading transformers.
"""

from importlib import import_module

__version__ = "0.1.0"

_PUBLIC_NAMES = {
    "MicroAdam": "hf_dp_microadam.optim.microadam",
    "AdamBC": "hf_dp_microadam.optim.adambc",
    "DPOptimizer": "hf_dp_microadam.privacy.dp_optimizer",
    "DPMicroAdam": "hf_dp_microadam.privacy.dp_optimizer",
    "make_dp_optimizer": "hf_dp_microadam.privacy.dp_optimizer",
    "PerExampleGradients": "hf_dp_microadam.privacy.grad_sample",
    "PoissonBatchSampler": "hf_dp_microadam.privacy.sampling",
    "PrivacyAccountant": "hf_dp_microadam.privacy.accounting",
    "PrivacyReport": "hf_dp_microadam.privacy.accounting",
    "DPTrainingArguments": "hf_dp_microadam.arguments",
    "DPMicroAdamTrainer": "hf_dp_microadam.trainer",
    "DPMicroAdamPlugin": "hf_dp_microadam.accelerate_plugin",
    "MeanPooledBertForSequenceClassification": "hf_dp_microadam.modeling_mean_pooling",
}

__all__ = sorted(_PUBLIC_NAMES)


def __getattr__(name):
    if name not in _PUBLIC_NAMES:
        raise AttributeError(f"module 'hf_dp_microadam' has no attribute {name!r}")
    value = getattr(import_module(_PUBLIC_NAMES[name]), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(list(globals()) + __all__)
