"""Fixtures shared by the problem tests."""

import pytest


@pytest.fixture(scope="session")
def cache(tmp_path_factory):
    """One data cache for the whole test run: each problem's data are generated once. Tests that edit or
    corrupt cache files use a private folder of their own (``tmp_path``)."""
    return tmp_path_factory.mktemp("cache")
