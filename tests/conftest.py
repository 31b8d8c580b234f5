import pytest
import torch

# The test problems are tiny and launch-bound: intra-op threads only add spin-waiting (and thrash when the
# two CI cores are shared with a second pytest worker or anything else).
torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
