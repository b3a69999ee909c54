"""Settings for the update-rule tests."""

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def single_intra_op_thread():
    """Run these tests on one intra-op thread and restore the setting afterwards.

    Their tensors are small, so a second thread saves little, and on a loaded machine
    every parallel op can wait for a descheduled thread.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
