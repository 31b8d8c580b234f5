import pytest
import torch


@pytest.fixture(scope="session")
def cache(tmp_path_factory):
    """One data cache for the whole test run: each problem's data are generated once. Tests that edit or
    corrupt cache files use a private folder of their own (``tmp_path``)."""
    return tmp_path_factory.mktemp("cache")


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
