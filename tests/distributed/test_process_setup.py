"""DPEngine's process checks and its resume across process counts, on one process."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from hf_dp_microadam import DPMicroAdamPlugin
from trainer_helpers import pad_text_batch, text_classification_dataset, tiny_bert_classifier


class FakeAccelerator:
    """The attributes of `accelerate.Accelerator` that DPEngine reads."""

    def __init__(self, num_processes=1, process_index=0, gradient_accumulation_steps=1):
        self.num_processes = num_processes
        self.process_index = process_index
        self.gradient_accumulation_steps = gradient_accumulation_steps
        self.distributed_type = "NO" if num_processes == 1 else "MULTI_CPU"
        self.device = torch.device("cpu")


def make_plugin(**overrides) -> DPMicroAdamPlugin:
    settings = dict(noise_multiplier=1.0, expected_batch_size=4, micro_batch_size=2, seed=3)
    settings.update(overrides)
    return DPMicroAdamPlugin(**settings)


@pytest.fixture
def one_process_group(tmp_path):
    """A gloo process group with this process alone, destroyed after the test."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_gradient_accumulation_rejected():
    with pytest.raises(ValueError, match="gradient_accumulation_steps=2"):
        make_plugin().create_engine(
            num_examples=16, max_steps=2, accelerator=FakeAccelerator(gradient_accumulation_steps=2)
        )


def test_accelerator_without_process_group_rejected():
    # Two processes according to accelerate, but torch.distributed is not initialized.
    with pytest.raises(ValueError, match="process group has 1"):
        make_plugin().create_engine(
            num_examples=16, max_steps=2, accelerator=FakeAccelerator(num_processes=2, process_index=1)
        )


def test_state_from_other_process_count_loads():
    saved_engine = make_plugin().create_engine(num_examples=16, max_steps=4)
    batches = iter(saved_engine.sampler)
    for _ in range(2):
        next(batches)
        saved_engine.accountant.step()
    state = saved_engine.state_dict()
    state["world_size"] = 2
    state["settings"]["world_size"] = 2  # the key of checkpoints written before it left the settings

    engine = make_plugin(seed=4).create_engine(num_examples=16, max_steps=4)
    engine.load_state_dict(state)

    assert engine.accountant.steps == 2
    assert next(iter(engine.sampler)) == next(batches)


def test_state_with_other_noise_still_rejected():
    state = make_plugin().create_engine(num_examples=16, max_steps=4).state_dict()
    engine = make_plugin(noise_multiplier=2.0).create_engine(num_examples=16, max_steps=4)
    with pytest.raises(ValueError, match="noise_multiplier"):
        engine.load_state_dict(state)


def test_per_example_losses_unwraps_ddp(one_process_group):
    dataset = text_classification_dataset(16)
    plugin = make_plugin()
    engine = plugin.create_engine(num_examples=len(dataset), max_steps=1)
    model = tiny_bert_classifier()
    engine.attach(model, train_dataset=dataset, collate_fn=pad_text_batch)
    engine.make_optimizer(model)
    batch = pad_text_batch([dataset[index] for index in range(3)])

    expected, _ = engine.per_example_losses(model, batch)
    losses, _ = engine.per_example_losses(DistributedDataParallel(model), batch)

    assert losses.shape == (3,)
    torch.testing.assert_close(losses, expected)
