import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread_and_seed():
    """One torch thread per test: small dense kernels thrash when two pytest-xdist workers each
    spread over both cores. A fixed seed for every test."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(before)
