import pytest
import torch


@pytest.fixture(scope="session", autouse=True)
def _one_thread():
    """The test models are tiny: one intra-op thread is as fast, and far faster on a busy 2-core machine
    (OpenMP spin-waits). Every comparison runs both sides under the same setting."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
