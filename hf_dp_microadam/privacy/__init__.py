"""Per-example gradients, clipping and noise, Poisson sampling and privacy accounting.

`PerExampleGradients` is loaded lazily from `hf_dp_microadam.privacy.grad_sample`, so
the other names import without it.
"""

from importlib import import_module
from importlib.util import find_spec

from hf_dp_microadam.privacy.accounting import (
    PrivacyAccountant,
    PrivacyReport,
    calibrate_noise_multiplier,
    compute_epsilon,
    default_delta,
)
from hf_dp_microadam.privacy.dp_optimizer import (
    DP_OPTIMIZER_NAMES,
    DPMicroAdam,
    DPOptimizer,
    make_dp_optimizer,
)
from hf_dp_microadam.privacy.noise import (
    NoiseSource,
    SecureGaussianNoise,
    TorchGaussianNoise,
    create_noise_source,
)
from hf_dp_microadam.privacy.sampling import (
    PoissonBatchSampler,
    check_dataset_supports_poisson,
    check_poisson_data_loader,
    check_poisson_sampling,
    collate_allowing_empty,
    split_into_micro_batches,
)

_LAZY_NAMES = {"PerExampleGradients": "hf_dp_microadam.privacy.grad_sample"}

__all__ = [
    "DP_OPTIMIZER_NAMES",
    "DPMicroAdam",
    "DPOptimizer",
    "NoiseSource",
    "PoissonBatchSampler",
    "PrivacyAccountant",
    "PrivacyReport",
    "SecureGaussianNoise",
    "TorchGaussianNoise",
    "calibrate_noise_multiplier",
    "check_dataset_supports_poisson",
    "check_poisson_data_loader",
    "check_poisson_sampling",
    "collate_allowing_empty",
    "compute_epsilon",
    "create_noise_source",
    "default_delta",
    "make_dp_optimizer",
    "split_into_micro_batches",
]
# Listed only when present, so that `from hf_dp_microadam.privacy import *` works
# before the per-example gradient package exists.
if find_spec("hf_dp_microadam.privacy.grad_sample") is not None:
    __all__.append("PerExampleGradients")


def __getattr__(name):
    if name not in _LAZY_NAMES:
        raise AttributeError(f"module 'hf_dp_microadam.privacy' has no attribute {name!r}")
    value = getattr(import_module(_LAZY_NAMES[name]), name)
    globals()[name] = value
    return value
