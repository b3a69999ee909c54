"""Privacy accounting for Poisson-subsampled Gaussian steps, on Opacus' accountants.

`PrivacyAccountant` records one step (noise_multiplier, sample_rate) per logical batch
and converts the history to epsilon with Opacus' PRV accountant (the default) or its
RDP accountant. `calibrate_noise_multiplier` finds the noise multiplier for a target
(epsilon, delta), and `PrivacyReport` is the summary a training run writes.

Epsilon from the PRV accountant is an upper bound: Opacus returns its estimate plus
`eps_error`. Its default `eps_error=0.01` is absolute, which is 1% of epsilon = 1 and
10% of epsilon = 0.1, so `compute_epsilon` sets `eps_error` relative to the epsilon it
expects (see `_prv_eps_error`). The grid that Opacus builds for the PRV grows with the
number of steps and with epsilon, and `eps_error` is widened where the grid would get
too large for memory.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import warnings
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.analysis.prv import (
    PoissonSubsampledGaussianPRV,
    compute_safe_domain_size,
)

__all__ = [
    "ACCOUNTANTS",
    "PrivacyAccountant",
    "PrivacyReport",
    "calibrate_noise_multiplier",
    "compute_epsilon",
    "default_delta",
]

logger = logging.getLogger(__name__)

ACCOUNTANTS = ("prv", "rdp")

#: Largest PRV grid (number of points) before `eps_error` is widened. One float64
#: array of this size takes 32 MB, and Opacus keeps several of them.
MAX_PRV_GRID_SIZE = 4_000_000

#: Relative accuracy aimed at by the PRV upper bound: eps_error is at most this
#: fraction of the expected epsilon (and at most 0.01, Opacus' default).
PRV_RELATIVE_ERROR = 0.0025
PRV_MIN_EPS_ERROR = 1e-4

#: Largest noise multiplier `calibrate_noise_multiplier` tries.
MAX_NOISE_MULTIPLIER = 1e6

History = tuple[tuple[float, float, int], ...]


def default_delta(num_examples: int) -> float:
    """Return delta = 1 / N^1.1 for a dataset of N examples.

    A delta of 1 / N or more allows a mechanism that publishes one whole example, so
    delta must be well below 1 / N. The exponent 1.1 keeps it below for every N > 1.
    """
    if num_examples < 2:
        raise ValueError(f"num_examples must be at least 2, got {num_examples}.")
    return 1.0 / num_examples**1.1


def _validate_delta(delta: float) -> None:
    if not (0.0 < delta < 1.0):
        raise ValueError(f"delta must be in (0, 1), got {delta}.")


def _validate_sample_rate(sample_rate: float) -> None:
    if not (0.0 <= sample_rate <= 1.0):
        raise ValueError(f"sample_rate must be in [0, 1], got {sample_rate}.")


def _validate_noise_multiplier(noise_multiplier: float) -> None:
    if not (noise_multiplier >= 0 and math.isfinite(noise_multiplier)):
        raise ValueError(f"noise_multiplier must be finite and >= 0, got {noise_multiplier}.")


def _normalize_history(history: Sequence[Sequence[float]]) -> History:
    """Drop entries that cost nothing (no steps or sample rate 0) and freeze the rest."""
    entries = []
    for noise_multiplier, sample_rate, steps in history:
        if steps > 0 and sample_rate > 0:
            entries.append((float(noise_multiplier), float(sample_rate), int(steps)))
    return tuple(entries)


def _rdp_epsilon(history: History, delta: float) -> float:
    accountant = RDPAccountant()
    accountant.history = list(history)
    with warnings.catch_warnings():
        # Opacus warns when the best order is at the end of its default list, which
        # happens for large epsilon. The bound stays valid, only less tight.
        warnings.simplefilter("ignore", UserWarning)
        return float(accountant.get_epsilon(delta=delta))


def _prv_eps_error(history: History, delta: float, expected_epsilon: float) -> float:
    """Choose Opacus' `eps_error` for a PRV epsilon query.

    The target is `PRV_RELATIVE_ERROR` of the expected epsilon, between
    `PRV_MIN_EPS_ERROR` and 0.01. Opacus' grid has 2 L / mesh points, with mesh =
    eps_error / sqrt(steps * log(12 / delta_error) / 2), so where that count would pass
    `MAX_PRV_GRID_SIZE` the error is widened in proportion.
    """
    eps_error = min(0.01, max(PRV_MIN_EPS_ERROR, PRV_RELATIVE_ERROR * expected_epsilon))
    delta_error = delta / 1000
    total_steps = sum(steps for _, _, steps in history)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        half_width = compute_safe_domain_size(
            prvs=[PoissonSubsampledGaussianPRV(q, sigma) for sigma, q, _ in history],
            max_self_compositions=[steps for _, _, steps in history],
            eps_error=eps_error,
            delta_error=delta_error,
        )
    mesh = eps_error / math.sqrt(total_steps * math.log(12 / delta_error) / 2)
    grid_size = 2 * half_width / mesh
    if grid_size > MAX_PRV_GRID_SIZE:
        eps_error *= grid_size / MAX_PRV_GRID_SIZE
    return eps_error


def _prv_epsilon(history: History, delta: float) -> float:
    """Return the PRV upper bound, or the RDP bound where that is smaller or PRV fails.

    Both are valid upper bounds on epsilon. RDP wins only where the PRV grid had to be
    coarse (large epsilon) or Opacus' PRV code fails numerically.
    """
    rdp_epsilon = _rdp_epsilon(history, delta)
    if not math.isfinite(rdp_epsilon):
        return math.inf
    eps_error = _prv_eps_error(history, delta, rdp_epsilon)
    accountant = PRVAccountant()
    accountant.history = list(history)
    try:
        with warnings.catch_warnings(), np.errstate(over="ignore", divide="ignore", invalid="ignore"):
            warnings.simplefilter("ignore", UserWarning)
            prv_epsilon = float(
                accountant.get_epsilon(delta=delta, eps_error=eps_error, delta_error=delta / 1000)
            )
    except (RuntimeError, ValueError, FloatingPointError, OverflowError, MemoryError) as error:
        logger.warning(
            "PRV accounting failed for history %s (%s: %s); using the RDP bound %.6g.",
            list(history),
            type(error).__name__,
            error,
            rdp_epsilon,
        )
        return rdp_epsilon
    if not math.isfinite(prv_epsilon):
        return rdp_epsilon
    return min(prv_epsilon, rdp_epsilon)


@functools.lru_cache(maxsize=512)
def _cached_epsilon(history: History, delta: float, accountant: str) -> float:
    if any(sigma == 0 for sigma, _, _ in history):
        return math.inf
    if accountant == "rdp":
        return _rdp_epsilon(history, delta)
    return _prv_epsilon(history, delta)


def compute_epsilon(
    history: Sequence[Sequence[float]], delta: float, accountant: str = "prv"
) -> float:
    """Return epsilon after the steps in `history` at the given delta.

    Args:
        history: (noise_multiplier, sample_rate, steps) entries, as Opacus stores them.
        accountant: "prv" or "rdp".

    Returns 0 for an empty history and inf if a step with sample rate > 0 had no noise.
    Results are cached per (history, delta, accountant).
    """
    _validate_delta(delta)
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"accountant must be one of {ACCOUNTANTS}, got {accountant!r}.")
    normalized = _normalize_history(history)
    if not normalized:
        return 0.0
    return _cached_epsilon(normalized, float(delta), accountant)


def _extend_history(
    history: Sequence[Sequence[float]], noise_multiplier: float, sample_rate: float, steps: int
) -> list[tuple[float, float, int]]:
    """Append `steps` steps the way Opacus' `step()` would record them one by one."""
    extended = [tuple(entry) for entry in history]
    if steps <= 0:
        return extended
    if extended and extended[-1][0] == noise_multiplier and extended[-1][1] == sample_rate:
        extended[-1] = (noise_multiplier, sample_rate, extended[-1][2] + steps)
    else:
        extended.append((noise_multiplier, sample_rate, steps))
    return extended


class PrivacyAccountant:
    """Accountant of the Poisson-subsampled Gaussian steps of one training run.

    It wraps an Opacus accountant (`PRVAccountant` or `RDPAccountant`) whose history
    has (noise_multiplier, sample_rate, steps) entries. On top of it, this class adds
    the total step count (Opacus' `len()` counts history entries, not steps), epsilon
    after hypothetical future steps, the number of steps a target epsilon allows, a hook
    for `DPOptimizer`, and a serializable state.

    The run's settings given here are the defaults of every method below, and each
    method also takes them explicitly.

    Args:
        mechanism: "prv" (default, tighter) or "rdp".
        sample_rate: q = expected_batch_size / num_examples, from the configuration.
        noise_multiplier: sigma of the run's steps.
        delta: delta at which epsilon is reported.
    """

    def __init__(
        self,
        mechanism: str = "prv",
        *,
        sample_rate: Optional[float] = None,
        noise_multiplier: Optional[float] = None,
        delta: Optional[float] = None,
    ):
        if mechanism not in ACCOUNTANTS:
            raise ValueError(f"mechanism must be one of {ACCOUNTANTS}, got {mechanism!r}.")
        if sample_rate is not None:
            _validate_sample_rate(sample_rate)
        if noise_multiplier is not None:
            _validate_noise_multiplier(noise_multiplier)
        if delta is not None:
            _validate_delta(delta)
        self.mechanism = mechanism
        self.sample_rate = sample_rate
        self.noise_multiplier = noise_multiplier
        self.delta = delta
        self._accountant = PRVAccountant() if mechanism == "prv" else RDPAccountant()

    @property
    def history(self) -> list[tuple[float, float, int]]:
        """Recorded (noise_multiplier, sample_rate, steps) entries, oldest first."""
        return [tuple(entry) for entry in self._accountant.history]

    @property
    def steps(self) -> int:
        """Number of recorded steps."""
        return sum(steps for _, _, steps in self._accountant.history)

    def _resolve_step(
        self, noise_multiplier: Optional[float], sample_rate: Optional[float]
    ) -> tuple[float, float]:
        """Fill in sigma and q: the arguments, else the configured values.

        For sigma, the last recorded one is the fallback when none is configured.
        """
        if sample_rate is None:
            sample_rate = self.sample_rate
            if sample_rate is None:
                raise ValueError("No sample_rate: pass it here or to PrivacyAccountant().")
        if noise_multiplier is None:
            noise_multiplier = self.noise_multiplier
        if noise_multiplier is None:
            if not self._accountant.history:
                raise ValueError(
                    "No noise_multiplier: pass it here or to PrivacyAccountant(), or record a step first."
                )
            noise_multiplier = self._accountant.history[-1][0]
        return float(noise_multiplier), float(sample_rate)

    def _resolve_delta(self, delta: Optional[float]) -> float:
        if delta is None:
            delta = self.delta
            if delta is None:
                raise ValueError("No delta: pass it here or to PrivacyAccountant().")
        return delta

    def step(
        self, *, noise_multiplier: Optional[float] = None, sample_rate: Optional[float] = None
    ) -> None:
        """Record one logical step, by default with the configured sigma and q."""
        if noise_multiplier is not None:
            _validate_noise_multiplier(noise_multiplier)
        elif self.noise_multiplier is None:
            raise ValueError("No noise_multiplier: pass it here or to PrivacyAccountant().")
        noise_multiplier, sample_rate = self._resolve_step(noise_multiplier, sample_rate)
        _validate_sample_rate(sample_rate)
        self._accountant.step(noise_multiplier=noise_multiplier, sample_rate=sample_rate)

    def get_epsilon(
        self,
        delta: Optional[float] = None,
        *,
        additional_steps: int = 0,
        noise_multiplier: Optional[float] = None,
        sample_rate: Optional[float] = None,
    ) -> float:
        """Return epsilon after the recorded steps plus `additional_steps` future ones.

        Future steps use `noise_multiplier` and `sample_rate`, by default the configured
        ones (for sigma, the last recorded one if none is configured).
        """
        delta = self._resolve_delta(delta)
        if additional_steps < 0:
            raise ValueError(f"additional_steps must be >= 0, got {additional_steps}.")
        history = self._accountant.history
        if additional_steps:
            sigma, q = self._resolve_step(noise_multiplier, sample_rate)
            history = _extend_history(history, sigma, q, additional_steps)
        return compute_epsilon(history, delta, self.mechanism)

    def epsilon_after(
        self,
        steps: int,
        delta: Optional[float] = None,
        *,
        noise_multiplier: Optional[float] = None,
        sample_rate: Optional[float] = None,
    ) -> float:
        """Return epsilon after a total of `steps` steps, recorded ones included.

        Raises:
            ValueError: if `steps` is below the number of recorded steps.
        """
        if steps < self.steps:
            raise ValueError(
                f"steps={steps} is below the {self.steps} steps already recorded."
            )
        return self.get_epsilon(
            delta,
            additional_steps=steps - self.steps,
            noise_multiplier=noise_multiplier,
            sample_rate=sample_rate,
        )

    def remaining_steps(
        self,
        target_epsilon: float,
        delta: Optional[float] = None,
        *,
        noise_multiplier: Optional[float] = None,
        sample_rate: Optional[float] = None,
        max_steps: int = 10**8,
    ) -> int:
        """Return how many more steps keep epsilon at or below `target_epsilon`.

        The result k satisfies epsilon(k) <= target_epsilon < epsilon(k + 1) for the
        recorded history plus k future steps, or k = max_steps if even that many stay
        within the target. It is 0 when the recorded steps already reach the target.
        Call it once and count down, because each epsilon evaluation takes up to about
        a second: an exponential search followed by a bisection costs about
        2 * log2(k) evaluations.
        """
        delta = self._resolve_delta(delta)
        sigma, q = self._resolve_step(noise_multiplier, sample_rate)

        def within_budget(k: int) -> bool:
            history = _extend_history(self._accountant.history, sigma, q, k)
            return compute_epsilon(history, delta, self.mechanism) <= target_epsilon

        if not within_budget(0) or not within_budget(1):
            return 0
        low, high = 1, 2
        while high <= max_steps and within_budget(high):
            low, high = high, 2 * high
        if high > max_steps:
            if within_budget(max_steps):
                return max_steps
            high = max_steps
        # Invariant: within_budget(low) and not within_budget(high).
        while high - low > 1:
            middle = (low + high) // 2
            if within_budget(middle):
                low = middle
            else:
                high = middle
        return low

    def max_steps_within(
        self,
        target_epsilon: float,
        delta: Optional[float] = None,
        *,
        noise_multiplier: Optional[float] = None,
        sample_rate: Optional[float] = None,
        max_steps: int = 10**8,
    ) -> int:
        """Return the total step count (recorded plus future) that `target_epsilon` allows.

        This is `steps + remaining_steps(...)`, so it never falls below the recorded
        steps, even when they already exceed the target.
        """
        return self.steps + self.remaining_steps(
            target_epsilon,
            delta,
            noise_multiplier=noise_multiplier,
            sample_rate=sample_rate,
            max_steps=max_steps,
        )

    def optimizer_hook(self) -> Callable[[Any], None]:
        """Return a step hook for `DPOptimizer.attach_step_hook`.

        The hook records one step per logical batch with the optimizer's current
        noise multiplier and the configured sample rate.
        """
        if self.sample_rate is None:
            raise ValueError("The optimizer hook needs sample_rate=expected_batch_size/num_examples.")

        def record_step(optimizer) -> None:
            self.step(noise_multiplier=optimizer.noise_multiplier, sample_rate=self.sample_rate)

        return record_step

    def attach(self, optimizer):
        """Record a step at every logical step of `optimizer` and return the hook handle."""
        return optimizer.attach_step_hook(self.optimizer_hook())

    def state_dict(self) -> dict[str, Any]:
        """Return a JSON-serializable state: mechanism, configured values and history."""
        return {
            "mechanism": self.mechanism,
            "sample_rate": self.sample_rate,
            "noise_multiplier": self.noise_multiplier,
            "delta": self.delta,
            "history": [list(entry) for entry in self._accountant.history],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a state from `state_dict()`, replacing the recorded history.

        The history has the same form for both mechanisms, so a state saved with one
        can be loaded into the other. Configured values left unset here are taken from
        the state.

        Raises:
            KeyError: if the state has no history.
            ValueError: if the saved sample rate differs from the configured one.
        """
        if "history" not in state:
            raise KeyError(f"Accountant state has no 'history' entry: {sorted(state)}.")
        saved_rate = state.get("sample_rate")
        if self.sample_rate is None:
            self.sample_rate = saved_rate
        elif saved_rate is not None and not math.isclose(saved_rate, self.sample_rate, rel_tol=1e-12):
            raise ValueError(
                f"The checkpoint was accounted with sample_rate={saved_rate}, but this run "
                f"uses {self.sample_rate}. Resume with the saved expected_batch_size and "
                "dataset size."
            )
        if self.noise_multiplier is None:
            self.noise_multiplier = state.get("noise_multiplier")
        if self.delta is None:
            self.delta = state.get("delta")
        history = []
        for noise_multiplier, sample_rate, steps in state["history"]:
            history.append((float(noise_multiplier), float(sample_rate), int(steps)))
        self._accountant.history = history

    def report(
        self,
        *,
        expected_batch_size: float,
        num_examples: int,
        delta: Optional[float] = None,
        target_epsilon: Optional[float] = None,
        secure_mode: bool = False,
        max_grad_norm: Optional[float] = None,
        disabled: bool = False,
    ) -> "PrivacyReport":
        """Build the report of the epsilon spent so far.

        The noise multiplier is the configured one, else the last recorded one (the
        only one, in a run with a fixed noise multiplier). `disabled=True` marks a run
        trained without differential privacy, whose epsilon is inf.
        """
        delta = self._resolve_delta(delta)
        history = self._accountant.history
        noise_multiplier = self.noise_multiplier
        if noise_multiplier is None and history:
            noise_multiplier = history[-1][0]
        sample_rate = self.sample_rate
        if sample_rate is None and history:
            sample_rate = history[-1][1]
        return PrivacyReport(
            epsilon=math.inf if disabled else self.get_epsilon(delta),
            delta=delta,
            noise_multiplier=noise_multiplier,
            sample_rate=sample_rate,
            expected_batch_size=expected_batch_size,
            num_examples=num_examples,
            steps=self.steps,
            accountant=self.mechanism,
            target_epsilon=target_epsilon,
            secure_mode=secure_mode,
            max_grad_norm=max_grad_norm,
            disabled=disabled,
        )

    def __len__(self) -> int:
        return self.steps

    def __repr__(self) -> str:
        return (
            f"PrivacyAccountant(mechanism={self.mechanism!r}, sample_rate={self.sample_rate}, "
            f"noise_multiplier={self.noise_multiplier}, delta={self.delta}, steps={self.steps})"
        )


def calibrate_noise_multiplier(
    *,
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: str = "prv",
    relative_tolerance: float = 0.005,
) -> float:
    """Return the noise multiplier that spends `target_epsilon` in `steps` steps.

    Bisection over sigma until the epsilon of `compute_epsilon` lies in
    [target_epsilon * (1 - relative_tolerance), target_epsilon]. Opacus'
    `get_noise_multiplier` stops within an absolute 0.01, which is 10% of epsilon = 0.1.

    Raises:
        ValueError: for invalid arguments, or if no noise multiplier up to 1e6 reaches
            the target.
    """
    if not (target_epsilon > 0 and math.isfinite(target_epsilon)):
        raise ValueError(f"target_epsilon must be finite and > 0, got {target_epsilon}.")
    _validate_delta(delta)
    if not (0.0 < sample_rate <= 1.0):
        raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}.")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}.")
    if not (0.0 < relative_tolerance < 1.0):
        raise ValueError(f"relative_tolerance must be in (0, 1), got {relative_tolerance}.")

    def epsilon(sigma: float) -> float:
        return compute_epsilon([(sigma, sample_rate, steps)], delta, accountant)

    # Bracket: epsilon(high) <= target < epsilon(low).
    high = 1.0
    while epsilon(high) > target_epsilon:
        high *= 2
        if high > MAX_NOISE_MULTIPLIER:
            raise ValueError(
                f"No noise multiplier up to {MAX_NOISE_MULTIPLIER:g} reaches epsilon="
                f"{target_epsilon} at delta={delta} over {steps} steps with sample rate "
                f"{sample_rate}. Raise the target or lower the steps or sample rate."
            )
    low = high / 2
    while epsilon(low) <= target_epsilon:
        if low < 1e-6:
            return low
        high, low = low, low / 2

    lower_target = target_epsilon * (1 - relative_tolerance)
    for _ in range(200):
        if epsilon(high) >= lower_target or high - low <= 1e-12 * high:
            break
        middle = (low + high) / 2
        if epsilon(middle) <= target_epsilon:
            high = middle
        else:
            low = middle
    return high


NOT_COVERED_NOTE = (
    "The guarantee covers the model parameters released after training. Logged "
    "training losses and other metrics computed on private data without noise are "
    "not covered."
)


@dataclasses.dataclass
class PrivacyReport:
    """The privacy guarantee of a training run: (epsilon, delta) and its parameters."""

    epsilon: float
    delta: float
    noise_multiplier: Optional[float]
    sample_rate: Optional[float]
    expected_batch_size: float
    num_examples: int
    steps: int
    accountant: str
    target_epsilon: Optional[float] = None
    secure_mode: bool = False
    max_grad_norm: Optional[float] = None
    #: True for a run trained without differential privacy (no guarantee).
    disabled: bool = False
    note: str = NOT_COVERED_NOTE

    def to_dict(self) -> dict[str, Any]:
        """Return the fields as a dict. An infinite epsilon becomes the string "inf"."""
        data = dataclasses.asdict(self)
        for key, value in data.items():
            if isinstance(value, float) and not math.isfinite(value):
                data[key] = str(value)
        return data

    def save_json(self, path: Union[str, Path]) -> Path:
        """Write the report as JSON and return the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2, allow_nan=False) + "\n")
        return path

    def __str__(self) -> str:
        target = "" if self.target_epsilon is None else f" (target {self.target_epsilon:g})"
        if self.disabled:
            return (
                f"Differential privacy disabled: no privacy guarantee after {self.steps} "
                "steps (epsilon = inf)."
            )
        lines = [
            f"({self.epsilon:.4g}, {self.delta:.3g})-DP{target} after {self.steps} steps, "
            f"{self.accountant.upper()} accountant",
            f"  noise multiplier {self.noise_multiplier}, sample rate {self.sample_rate} "
            f"(expected batch size {self.expected_batch_size} of {self.num_examples} examples)",
        ]
        if self.max_grad_norm is not None:
            lines.append(f"  per-example clipping norm {self.max_grad_norm}")
        lines.append(f"  secure_mode noise: {'on' if self.secure_mode else 'off'}")
        lines.append(f"  {self.note}")
        return "\n".join(lines)
