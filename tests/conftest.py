import os

# numpy's and scipy's OpenBLAS start a thread per core; on the suite's small matrices they spin-wait for each other,
# and on shared cores that costs far more CPU than the work (a batch of 200 4×4 expm: 0.003 s on one thread, up to
# 1.6 s of CPU on two under load). One thread, as for torch below; read when OpenBLAS loads, so before numpy is
# imported (child processes inherit it).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import pytest
import torch
from hypothesis import settings

# Property tests draw the same examples on every run, so that a pass or a failure reproduces (CI gates every
# landing on this suite); HYPOTHESIS_PROFILE=explore draws new ones each run, which is how the bound on v ⟂ u
# in test_linalg.test_identities was found to miss u's rounding error.
settings.register_profile("default", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


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
