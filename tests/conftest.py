"""Fixtures shared by several test modules."""
import pytest
import torch


@pytest.fixture
def one_thread():
    """One intra-op thread for the test (restored afterwards): the models in the tests are tiny, and on a shared
    2-core machine extra threads only add synchronization, which costs seconds."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
