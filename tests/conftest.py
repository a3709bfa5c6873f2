"""Suite-wide settings: tiny tensors run fastest on one thread (two cores are shared by the whole suite)."""

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
