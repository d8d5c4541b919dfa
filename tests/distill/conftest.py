"""The distill tests run tiny models: one intra-op thread is fastest and keeps a shared machine calm."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
