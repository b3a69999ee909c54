"""Poisson sampling of logical batches, their split into micro-batches, and checks.

Privacy amplification by subsampling, which the accountant assumes, holds only if
every logical batch includes each training example independently with probability
q = B / N, and only if the batches stay secret. `PoissonBatchSampler` does the first
and, unless a seed is passed, draws its seed from `os.urandom` so that the public
training seed does not determine the batches.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Mapping
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.distributed as dist
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from opacus.utils.uniform_sampler import (
    DistributedUniformWithReplacementSampler,
    UniformWithReplacementSampler,
)
from torch.utils.data import DataLoader, IterableDataset

__all__ = [
    "PoissonBatchSampler",
    "check_dataset_supports_poisson",
    "check_poisson_data_loader",
    "check_poisson_sampling",
    "collate_allowing_empty",
    "split_into_micro_batches",
]


def _shared_entropy_seed(num_replicas: int) -> int:
    """Return a seed from `os.urandom`, the same on every rank of the process group."""
    seed = int.from_bytes(os.urandom(8), "little") >> 1
    if num_replicas == 1:
        return seed
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError(
            f"num_replicas={num_replicas} needs the same sampler seed on every rank. Pass "
            "seed= explicitly, or initialize torch.distributed first so that rank 0 can "
            "share a seed drawn from os.urandom."
        )
    if dist.get_world_size() != num_replicas:
        raise ValueError(
            f"num_replicas={num_replicas} differs from the torch.distributed world size "
            f"{dist.get_world_size()}."
        )
    shared = [seed]
    dist.broadcast_object_list(shared, src=0)
    return int(shared[0])


class SecureUniformGenerator:
    """Cryptographically secure uniforms for Poisson sampling in `secure_mode`.

    Draw t is the ChaCha20 keystream of a 256-bit key under the 96-bit nonce t, turned
    into float64 uniforms. The key comes from `os.urandom` (rank 0 shares it with the
    other ranks), so the batches cannot be predicted from earlier ones, unlike those of
    torch's Mersenne Twister, whose state can be recovered from its output. Because a
    draw depends only on the key and its index, the state is the pair (key, index): it
    restores exactly, and it is as sensitive as the training data.

    It offers the two methods of `torch.Generator` that the sampler uses for its state,
    `get_state()` and `set_state()`, with the state packed into a uint8 tensor.
    """

    _KEY_BYTES = 32

    def __init__(self, key: bytes):
        if len(key) != self._KEY_BYTES:
            raise ValueError(f"the ChaCha20 key must have {self._KEY_BYTES} bytes, got {len(key)}.")
        self._key = bytes(key)
        self._index = 0

    def uniforms(self, count: int) -> torch.Tensor:
        """Return `count` float64 uniforms in [0, 1) and advance to the next draw."""
        # cryptography's 16-byte ChaCha20 nonce is a 4-byte block counter followed by a
        # 12-byte nonce: the counter starts at 0 and the draw index is the nonce.
        nonce = (0).to_bytes(4, "little") + self._index.to_bytes(12, "little")
        encryptor = Cipher(algorithms.ChaCha20(self._key, nonce), mode=None).encryptor()
        words = np.frombuffer(encryptor.update(bytes(8 * count)), dtype=np.uint64)
        self._index += 1
        # The top 53 bits give a multiple of 2^-53 in [0, 1).
        return torch.from_numpy((words >> np.uint64(11)).astype(np.float64) * (2.0**-53))

    def get_state(self) -> torch.Tensor:
        packed = self._key + self._index.to_bytes(16, "little")
        return torch.frombuffer(bytearray(packed), dtype=torch.uint8).clone()

    def set_state(self, state: torch.Tensor) -> None:
        packed = bytes(state.to(torch.uint8).tolist())
        if len(packed) != self._KEY_BYTES + 16:
            raise ValueError(
                "invalid secure sampler state: expected a ChaCha20 key and a draw index "
                f"({self._KEY_BYTES + 16} bytes), got {len(packed)} bytes; the checkpoint was "
                "probably written without secure_mode"
            )
        self._key = packed[: self._KEY_BYTES]
        self._index = int.from_bytes(packed[self._KEY_BYTES :], "little")


def _shared_entropy_key(num_replicas: int) -> bytes:
    """Return a 256-bit key from `os.urandom`, the same on every rank of the process group."""
    key = os.urandom(SecureUniformGenerator._KEY_BYTES)
    if num_replicas == 1:
        return key
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError(
            f"num_replicas={num_replicas} needs the same sampler key on every rank: "
            "initialize torch.distributed first so that rank 0 can share one."
        )
    shared = [key]
    dist.broadcast_object_list(shared, src=0)
    return bytes(shared[0])


class PoissonBatchSampler(UniformWithReplacementSampler):
    """Batch sampler that draws Poisson-subsampled logical batches from a map-style dataset.

    Every step includes each of the `num_examples` indices independently with
    probability `sample_rate = expected_batch_size / num_examples`. Batches therefore
    vary in size, and an empty batch is yielded as an empty list so that the training
    loop still takes its (noise-only) step. One iteration over the sampler is one epoch
    of `steps_per_epoch` batches.

    With `num_replicas > 1`, every rank draws the same logical batch from the same seed
    and keeps the entries at positions `rank, rank + num_replicas, ...` of the sorted
    batch. The shares are disjoint and together form the whole logical batch, so no
    example is on two ranks and none is dropped.

    It subclasses Opacus' `UniformWithReplacementSampler` (same `sample_rate`,
    `num_samples`, `steps` and `generator` attributes) and adds replicas and a state
    that resumes inside an epoch.

    Args:
        num_examples: dataset size N.
        expected_batch_size: B, so q = B / N. Must satisfy 0 < B <= N.
        steps_per_epoch: batches per iteration. Defaults to round(N / B), at least 1,
            so that an epoch includes each example once on average.
        seed: seed of the sampler's generator. Give it only for tests, debugging or to
            share it across ranks yourself. `None` draws it from `os.urandom` (shared
            from rank 0 when `num_replicas > 1` and torch.distributed is initialized).
        num_replicas: number of processes that split each logical batch.
        rank: this process's index in [0, num_replicas).
        secure_mode: draw the inclusion decisions from a ChaCha20 keystream keyed from
            `os.urandom` (`SecureUniformGenerator`) instead of torch's Mersenne Twister.
            It cannot be combined with `seed`.

    NOTE: the generator state in `state_dict()` determines all future batches. Treat a
    checkpoint that contains it as sensitive as the training data.
    """

    def __init__(
        self,
        num_examples: int,
        expected_batch_size: float,
        *,
        steps_per_epoch: Optional[int] = None,
        seed: Optional[int] = None,
        num_replicas: int = 1,
        rank: int = 0,
        secure_mode: bool = False,
    ):
        if isinstance(num_examples, bool) or int(num_examples) != num_examples or num_examples <= 0:
            raise ValueError(f"num_examples must be a positive integer, got {num_examples!r}.")
        num_examples = int(num_examples)
        if not (0 < expected_batch_size <= num_examples):
            raise ValueError(
                f"expected_batch_size must be in (0, num_examples={num_examples}], "
                f"got {expected_batch_size!r}."
            )
        if num_replicas < 1 or not (0 <= rank < num_replicas):
            raise ValueError(
                f"Need num_replicas >= 1 and 0 <= rank < num_replicas, got "
                f"num_replicas={num_replicas}, rank={rank}."
            )
        if steps_per_epoch is None:
            steps_per_epoch = max(1, round(num_examples / expected_batch_size))
        elif steps_per_epoch < 1:
            raise ValueError(f"steps_per_epoch must be >= 1, got {steps_per_epoch}.")

        if secure_mode and seed is not None:
            raise ValueError(
                "secure_mode draws the sampler's key from os.urandom and cannot be seeded; "
                "pass seed=None, or turn secure_mode off for a reproducible test run."
            )
        self.secure_mode = secure_mode
        self.seeded = seed is not None
        if secure_mode:
            generator = SecureUniformGenerator(_shared_entropy_key(num_replicas))
        else:
            generator = torch.Generator()
            generator.manual_seed(int(seed) if seed is not None else _shared_entropy_seed(num_replicas))
        super().__init__(
            num_samples=num_examples,
            sample_rate=expected_batch_size / num_examples,
            generator=generator,
            steps=int(steps_per_epoch),
        )
        self.expected_batch_size = expected_batch_size
        self.num_replicas = num_replicas
        self.rank = rank

        # Position in the sequence: the index of the epoch started last, the generator
        # state at its start, and the number of batches yielded in it.
        self.epoch = -1
        self._epoch_start_state: Optional[torch.Tensor] = None
        self._batches_yielded = 0
        self._resume: Optional[tuple[int, int]] = None

    @property
    def num_examples(self) -> int:
        return self.num_samples

    @property
    def steps_per_epoch(self) -> int:
        return self.steps

    def _draw_logical_batch(self) -> torch.Tensor:
        if self.secure_mode:
            uniforms = self.generator.uniforms(self.num_samples)
        else:
            uniforms = torch.rand(self.num_samples, generator=self.generator)
        mask = uniforms < self.sample_rate
        return mask.nonzero(as_tuple=False).reshape(-1)

    def __iter__(self):
        if self._resume is not None:
            self.epoch, start = self._resume
            self._resume = None
        else:
            self.epoch += 1
            start = 0
        self._epoch_start_state = self.generator.get_state()
        self._batches_yielded = start

        # Resuming inside an epoch redraws the batches before the saved position,
        # because the saved generator state is the one at the start of the epoch.
        for _ in range(start):
            self._draw_logical_batch()

        for step in range(start, self.steps):
            logical_batch = self._draw_logical_batch()
            self._batches_yielded = step + 1
            yield logical_batch[self.rank :: self.num_replicas].tolist()

    def __len__(self) -> int:
        return self.steps

    def state_dict(self, batches_consumed: Optional[int] = None) -> dict[str, Any]:
        """Return the state that lets a new sampler continue this exact batch sequence.

        Args:
            batches_consumed: batches of the current epoch that training has used. By
                default the number this sampler has yielded, which is too high when a
                data loader prefetches (worker processes, or accelerate's loaders, which
                fetch one batch ahead). Pass the count of finished logical steps in the
                epoch then.
        """
        if self._resume is not None:
            epoch, position = self._resume
            epoch_start_state = self.generator.get_state()
            if batches_consumed is not None and batches_consumed != position:
                raise ValueError(
                    f"batches_consumed={batches_consumed}, but the sampler was just "
                    f"restored at position {position} and has not been iterated since."
                )
        elif self._epoch_start_state is None:
            if batches_consumed not in (None, 0):
                raise ValueError(
                    f"batches_consumed={batches_consumed}, but no epoch has started."
                )
            epoch, position, epoch_start_state = 0, 0, self.generator.get_state()
        else:
            position = self._batches_yielded if batches_consumed is None else int(batches_consumed)
            if not (0 <= position <= self._batches_yielded):
                raise ValueError(
                    f"batches_consumed must be in [0, {self._batches_yielded}] (the batches "
                    f"yielded in this epoch), got {batches_consumed}."
                )
            epoch, epoch_start_state = self.epoch, self._epoch_start_state
            if position == self.steps:
                # A finished epoch resumes at the start of the next one. Every batch of
                # it has been drawn, so the current generator state is that start.
                epoch, position, epoch_start_state = epoch + 1, 0, self.generator.get_state()
        return {
            "num_examples": self.num_samples,
            "expected_batch_size": self.expected_batch_size,
            "steps_per_epoch": self.steps,
            "epoch": epoch,
            "position": position,
            "epoch_start_generator_state": epoch_start_state.clone(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a state from `state_dict()`.

        The next iteration continues the saved epoch at the saved position, so the
        caller must not skip batches itself.

        Raises:
            ValueError: if the dataset size, expected batch size or steps per epoch
                differ from the saved ones, because the sequence and the accounted
                sample rate would then differ.
        """
        for key, current in (
            ("num_examples", self.num_samples),
            ("expected_batch_size", self.expected_batch_size),
            ("steps_per_epoch", self.steps),
        ):
            if state[key] != current:
                raise ValueError(
                    f"Sampler state was saved with {key}={state[key]!r}, but this sampler "
                    f"has {key}={current!r}. Resume with the saved configuration."
                )
        self.generator.set_state(state["epoch_start_generator_state"])
        self._resume = (int(state["epoch"]), int(state["position"]))


def split_into_micro_batches(batch: Any, max_micro_batch_size: int) -> list[Any]:
    """Split a logical batch into consecutive micro-batches of at most the given size.

    `batch` is a sequence of indices, a tensor (split along dimension 0), or a mapping
    of such values with equal lengths, for example a collated Hugging Face batch. An
    empty logical batch gives an empty list: the training loop then runs no forward
    pass but must still call `optimizer.step()` for the noise-only update.
    """
    if max_micro_batch_size < 1:
        raise ValueError(f"max_micro_batch_size must be >= 1, got {max_micro_batch_size}.")

    if isinstance(batch, Mapping):
        lengths = {key: len(value) for key, value in batch.items()}
        if len(set(lengths.values())) > 1:
            raise ValueError(f"Batch fields have different lengths: {lengths}.")
        size = next(iter(lengths.values()), 0)
        return [
            {key: value[start : start + max_micro_batch_size] for key, value in batch.items()}
            for start in range(0, size, max_micro_batch_size)
        ]
    return [
        batch[start : start + max_micro_batch_size]
        for start in range(0, len(batch), max_micro_batch_size)
    ]


def collate_allowing_empty(collate_fn: Callable[[list], Any]) -> Callable[[list], Any]:
    """Wrap a collate function so that an empty Poisson batch collates to an empty list.

    torch's `default_collate` and transformers' `default_data_collator` raise
    IndexError on an empty list of examples (torch 2.13, transformers 5.25). The wrapped function returns `[]` for it, which
    `split_into_micro_batches` turns into zero micro-batches.
    """

    @functools.wraps(collate_fn)
    def collate(examples: list) -> Any:
        if len(examples) == 0:
            return []
        return collate_fn(examples)

    return collate


_POISSON_SAMPLERS = (UniformWithReplacementSampler, DistributedUniformWithReplacementSampler)


def check_dataset_supports_poisson(dataset: Any) -> None:
    """Raise TypeError unless `dataset` is map-style (`__len__` and `__getitem__`).

    Poisson sampling draws indices, so a stream (a torch `IterableDataset`, a Hugging
    Face `datasets.IterableDataset`, or any object without `__len__`) cannot be sampled.
    """
    if isinstance(dataset, IterableDataset) or not (
        hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__")
    ):
        raise TypeError(
            f"Poisson sampling needs a map-style dataset with __len__ and __getitem__, got "
            f"{type(dataset).__name__}. Convert it to a map-style dataset (for example "
            "datasets.Dataset instead of datasets.IterableDataset)."
        )


def check_poisson_sampling(
    dataset: Any, batch_sampler: Any, *, sample_rate: Optional[float] = None
) -> None:
    """Raise unless the dataset and batch sampler give Poisson-subsampled batches.

    Poisson accounting is valid only for a map-style dataset read through a Poisson
    batch sampler (`PoissonBatchSampler`, or Opacus' uniform samplers). Shuffled
    fixed-size batches and re-sharded batches are not Poisson subsampling.

    Args:
        sample_rate: the q the accountant uses. If given, it must equal the sampler's.

    Raises:
        TypeError: for an IterableDataset or another batch sampler.
        ValueError: if the sampler's sample rate differs from `sample_rate`.
    """
    check_dataset_supports_poisson(dataset)
    if not isinstance(batch_sampler, _POISSON_SAMPLERS):
        raise TypeError(
            f"Poisson accounting needs a PoissonBatchSampler as batch_sampler, got "
            f"{type(batch_sampler).__name__}. Fixed-size or shuffled batches, and batches "
            "re-sharded by another wrapper, are not Poisson-subsampled and would be "
            "accounted wrongly."
        )
    if sample_rate is not None and not math.isclose(
        batch_sampler.sample_rate, sample_rate, rel_tol=1e-9, abs_tol=0.0
    ):
        raise ValueError(
            f"The sampler draws with sample rate {batch_sampler.sample_rate}, but the "
            f"accountant uses {sample_rate}. Both must be expected_batch_size / num_examples."
        )


def check_poisson_data_loader(data_loader: DataLoader, *, sample_rate: Optional[float] = None) -> None:
    """Raise unless `data_loader` yields Poisson-subsampled batches (see `check_poisson_sampling`)."""
    check_poisson_sampling(
        data_loader.dataset, data_loader.batch_sampler, sample_rate=sample_rate
    )
