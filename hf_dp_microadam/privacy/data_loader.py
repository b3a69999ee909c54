"""Data loading for private training: one Poisson logical batch per step, split into micro-batches."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from torch.utils.data import DataLoader, Dataset, default_collate


@dataclass
class LogicalBatch:
    """One logical batch (this process's share of it), already split into collated micro-batches.

    `num_examples` is the realized size of this share. It is reported for logging only: the
    privatized gradient is always normalized by the configured expected batch size.
    """

    micro_batches: list[Any]
    num_examples: int

    def __iter__(self) -> Iterator[Any]:
        return iter(self.micro_batches)

    def __len__(self) -> int:
        return len(self.micro_batches)


class MicroBatchCollator:
    """Collate function of a `DataLoader` whose batch sampler yields whole logical batches.

    It splits the examples of one logical batch into chunks of at most `micro_batch_size`
    and collates each chunk with `collate_fn`, so that padding is per micro-batch. An empty
    logical batch gives a `LogicalBatch` with no micro-batch: the step still happens, with
    noise only.
    """

    def __init__(self, collate_fn: Callable[[list[Any]], Any] | None, micro_batch_size: int):
        if micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be at least 1, got {micro_batch_size}")
        self.collate_fn = collate_fn if collate_fn is not None else default_collate
        self.micro_batch_size = micro_batch_size

    def __call__(self, examples: Sequence[Any]) -> LogicalBatch:
        examples = list(examples)
        micro_batches = [
            self.collate_fn(examples[start : start + self.micro_batch_size])
            for start in range(0, len(examples), self.micro_batch_size)
        ]
        return LogicalBatch(micro_batches=micro_batches, num_examples=len(examples))


def make_logical_batch_loader(
    dataset: Dataset,
    batch_sampler,
    *,
    collate_fn: Callable[[list[Any]], Any] | None,
    micro_batch_size: int,
    num_workers: int = 0,
    pin_memory: bool = False,
) -> DataLoader:
    """Build a `DataLoader` that yields one `LogicalBatch` per step of `batch_sampler`.

    The loader is never passed through `accelerate`'s `prepare`: its `BatchSamplerShard`
    would re-shard the variable-size Poisson batches and, with `even_batches=True`, repeat
    indices at the end of an epoch. The batch sampler shards the logical batch across
    processes itself.
    """
    return DataLoader(
        dataset,
        batch_sampler=batch_sampler,
        collate_fn=MicroBatchCollator(collate_fn, micro_batch_size),
        num_workers=num_workers,
        pin_memory=pin_memory,
    )
