"""sqpoptim.fast_float32_products: oneDNN's bfloat16 split float32 products, verified accuracy, a scoped setting."""

import pytest
import torch

from sqpoptim import _fast_float32 as ff

EPS32 = torch.finfo(torch.float32).eps
F64 = torch.float64
# PyTorch before 2.9 has no oneDNN float32-precision setting: the products are then IEEE and nothing here applies.
pytestmark = pytest.mark.skipif(ff._backend() is None, reason="needs torch.backends.mkldnn.matmul.fp32_precision")
needs_fast = pytest.mark.skipif(
    not ff.float32_products_verified(), reason="oneDNN's bfloat16 products are absent or not float32-accurate here"
)


def _setting():
    return torch.backends.mkldnn.matmul.fp32_precision


@pytest.fixture
def default_setting():
    old = _setting()
    torch.backends.mkldnn.matmul.fp32_precision = "none"
    yield
    torch.backends.mkldnn.matmul.fp32_precision = old


def _componentwise_error(a, b):
    exact = a.double() @ b.double()
    return float(((a @ b).double() - exact).abs().div(a.double().abs() @ b.double().abs()).max())


@needs_fast
@pytest.mark.usefixtures("default_setting")
def test_products_inside_the_block_keep_float32_accuracy():
    gen = torch.Generator().manual_seed(1)
    cases = [
        (torch.randn(200, 200, generator=gen), torch.randn(200, 3000, generator=gen)),  # C3's A_i y, narrower
        (torch.randn(50, 150, 200, generator=gen), None),  # a Gram matrix J J^T
        (torch.randn(7, 1000, generator=gen), torch.randn(1000, 3, generator=gen)),
    ]
    with ff.fast_float32_products(torch.device("cpu")) as on:
        assert on and _setting() == "bf16"
        for a, b in cases:
            b = a.mT if b is None else b
            assert _componentwise_error(a, b) <= 16 * EPS32
            assert ff.fast_products_on(a)
    assert _setting() == "none"


@pytest.mark.usefixtures("default_setting")
def test_the_setting_is_restored_after_an_error():
    with pytest.raises(KeyError), ff.fast_float32_products(torch.device("cpu")):
        raise KeyError("inside")
    assert _setting() == "none"


def test_an_explicit_user_setting_is_respected():
    old = _setting()
    try:
        torch.backends.mkldnn.matmul.fp32_precision = "ieee"
        with ff.fast_float32_products(torch.device("cpu")) as on:
            assert not on and _setting() == "ieee"
        assert _setting() == "ieee"
    finally:
        torch.backends.mkldnn.matmul.fp32_precision = old


@pytest.mark.usefixtures("default_setting")
def test_other_devices_and_dtypes_are_left_alone():
    with ff.fast_float32_products(torch.device("cuda")) as on:  # only the device type is read
        assert not on and _setting() == "none"
    with ff.fast_float32_products(torch.device("cpu")):
        assert not ff.fast_products_on(torch.zeros(2, dtype=F64))


@pytest.mark.usefixtures("default_setting")
def test_a_failed_check_leaves_the_products_ieee(monkeypatch):
    ff.float32_products_verified.cache_clear()
    monkeypatch.setattr(ff, "_worst_error", lambda: 1e-3)  # what a plain bfloat16 product measures
    try:
        assert not ff.float32_products_verified()
        assert _setting() == "none"  # the check restores the setting it tried
        with ff.fast_float32_products(torch.device("cpu")) as on:
            assert not on and _setting() == "none"
    finally:
        ff.float32_products_verified.cache_clear()


def test_pytorchs_highest_matmul_precision_is_respected():
    old, general = _setting(), torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")  # an explicit call sets oneDNN's matmul precision to "ieee"
        with ff.fast_float32_products(torch.device("cpu")) as on:
            assert not on and _setting() == "ieee"
    finally:
        torch.set_float32_matmul_precision(general)
        torch.backends.mkldnn.matmul.fp32_precision = old
