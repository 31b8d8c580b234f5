import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    # The layer tests run thousands of tiny batched ops: intra-op threads only add synchronisation overhead
    # (5x slower with two threads on a shared two-core machine). Restored after each test.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
