"""Per-sample linear-layer factors against the batched Jacobian (float64), and their detection's refusals."""

import pytest
import torch
from torch import nn

import sqpoptim
from sqpoptim._jacobian import batched_jacobian
from sqpoptim._layout import build_layout
from sqpoptim._linear_factors import LayerFactors, LinearCallRecorder, layer_factors

from .helpers import f64

GEN = torch.Generator().manual_seed(0)
PTS = torch.rand(7, 3, dtype=f64, generator=GEN)


def _mlp(bias: bool = True, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(3, 6, bias=bias), nn.Tanh(), nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 1, bias=bias)
    ).to(f64)


def _factors(model, make_c, params=None):
    layout = build_layout([{"params": list(model.parameters()) if params is None else params}])
    with torch.enable_grad():
        with LinearCallRecorder() as rec:
            c = make_c()
        return layout, c, layer_factors(c, rec.calls, layout, verify=True)


def _check_against_batched(layout, c, F):
    assert isinstance(F, LayerFactors), F
    J = batched_jacobian(c, layout.params, layout.n)
    x = torch.randn(layout.n, dtype=f64, generator=GEN)
    y = torch.randn(c.shape[0], dtype=f64, generator=GEN)
    w = torch.rand(layout.n, dtype=f64, generator=GEN) + 0.5
    torch.testing.assert_close(F.dense(), J, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(F.mv(x), J @ x, rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(F.rmv(y), J.T @ y, rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(F.gram(), J @ J.T, rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(F.gram(w), (J * w) @ J.T, rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(F.row_sq_norms(), (J * J).sum(1), rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(F.row_sq_norms(w), (J * J * w).sum(1), rtol=1e-12, atol=1e-13)
    assert torch.equal(F.row_check() == 0, (J == 0).all(1))


@pytest.mark.parametrize("bias", [True, False])
def test_factors_equal_the_batched_jacobian(bias):
    model = _mlp(bias)
    _check_against_batched(*_factors(model, lambda: torch.sin(model(PTS)).squeeze(1) - 0.3))


def test_a_layer_called_twice_contributes_the_sum_of_its_calls():
    model = _mlp()
    _check_against_batched(*_factors(model, lambda: (model(PTS) - 2 * model(PTS.flip(1))).squeeze(1)))


def test_frozen_and_foreign_parameters_get_no_or_zero_columns():
    model = _mlp()
    model[2].weight.requires_grad_(False)
    extra = nn.Parameter(torch.ones(2, dtype=f64))  # trained, but not used by c
    params = [p for p in model.parameters() if p.requires_grad] + [extra]
    layout, c, F = _factors(model, lambda: model(PTS).squeeze(1), params)
    _check_against_batched(layout, c, F)
    assert torch.equal(F.dense()[:, -2:], torch.zeros(7, 2, dtype=f64))


def test_the_gram_matrix_in_row_blocks_equals_the_whole(monkeypatch):
    import sqpoptim._linear_factors as lf

    model = _mlp()
    layout, c, F = _factors(model, lambda: model(PTS).squeeze(1))
    whole = F.gram()
    monkeypatch.setattr(lf, "_GRAM_CHUNK_BYTES", 16 * 7 * 2)  # two rows per block
    monkeypatch.setattr(lf, "_BLOCK_CHUNK_BYTES", 8 * 7 * 6)  # one output unit per explicit block
    torch.testing.assert_close(F.gram(), whole, rtol=1e-14, atol=1e-15)
    J = batched_jacobian(c, layout.params, layout.n)
    w = torch.rand(layout.n, dtype=f64, generator=GEN)
    torch.testing.assert_close(F.gram(w), (J * w) @ J.T, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("outputs", [1, 2])
def test_float32_factors_give_the_float64_gram_matrix_of_their_jacobian(outputs):
    """Several row blocks (m = 300, blocks of 128) over float32 factors: G equals J Jᵀ of the float64 J whose
    entries δ a are exact products of the float32 factors, to float64 rounding. One output unit takes the
    explicit block of the last layer (and a second call of it), two take the Hadamard form throughout."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(3, 40), nn.Tanh(), nn.Linear(40, 30), nn.Tanh(), nn.Linear(30, outputs))
    pts = torch.rand(300, 3, generator=GEN)
    layout, _, F = _factors(model, lambda: (model(pts) - 0.5 * model(pts.flip(1))).sum(1))
    assert isinstance(F, LayerFactors) and F.dtype == torch.float32 and len(F.groups[-1]) == 2
    J64 = torch.zeros(300, layout.n, dtype=f64)
    for cols, block in F._blocks(dtype=f64):  # float32 products formed in float64: exact
        J64[:, cols] = block
    G = F.gram(out=torch.full((300, 300), float("nan"), dtype=f64))  # every entry written, none read first
    ref = J64 @ J64.T
    torch.testing.assert_close(G, ref, rtol=1e-12, atol=1e-13 * float(ref.abs().max()))


@pytest.mark.parametrize("blocks", ["one", "two rows"])
def test_the_gram_matrix_from_a_reused_workspace_equals_a_fresh_one(monkeypatch, blocks):
    """The float64 operands and the row blocks' Hadamard factors sit in the workspace's buffers between steps: a
    second Jacobian of the same shapes (another network) reuses them and reads nothing stale; another m gets new
    ones."""
    import sqpoptim._linear_factors as lf
    from sqpoptim._workspace import Workspace

    if blocks == "two rows":
        monkeypatch.setattr(lf, "_GRAM_CHUNK_BYTES", 16 * 7 * 2)
    ws = Workspace()
    held = []
    for seed, pts in ((0, PTS), (1, PTS.flip(0)), (2, PTS[:5])):
        model = _mlp(seed=seed)
        _, _, F = _factors(model, lambda model=model, pts=pts: (model(pts) - model(pts.flip(1))).squeeze(1))
        G = F.gram(workspace=ws)
        torch.testing.assert_close(G, F.gram(), rtol=1e-14, atol=1e-15)
        held.append({k: b.data_ptr() for k, b in ws._buffers.items()})
    assert held[0] and held[0] == held[1] and held[1] != held[2]


def _reason(model, make_c, params=None):
    out = _factors(model, make_c, params)[2]
    assert isinstance(out, str), "the factors must be refused"
    return out


def test_coupled_points_are_detected():
    model = _mlp()

    def centred():
        out = model(PTS).squeeze(1)
        return out - out.mean()

    assert "couple the points" in _reason(model, centred)
    bn = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4, affine=False), nn.Tanh(), nn.Linear(4, 1)).to(f64).train()
    assert "couple the points" in _reason(bn, lambda: bn(PTS).squeeze(1))
    assert "couple the points" in _reason(model, lambda: model(PTS).squeeze(1).flip(0))


def test_input_derivatives_and_other_parameter_paths_are_detected():
    model = _mlp()

    def residual():
        x = PTS.clone().requires_grad_(True)
        u = model(x)
        ux = torch.autograd.grad(u.sum(), x, create_graph=True)[0][:, 0]
        return ux + u.squeeze(1)

    assert "reaches c other than" in _reason(model, residual)
    scale = nn.Parameter(torch.tensor(2.0, dtype=f64))
    params = [*model.parameters(), scale]
    assert "reaches c other than" in _reason(model, lambda: scale * model(PTS).squeeze(1), params)
    assert "reaches c other than" in _reason(model, lambda: (model(PTS) + model[0].weight.sum()).squeeze(1))


def test_other_shapes_and_in_place_changes_are_refused():
    model = _mlp()
    assert "no nn.Linear call on a batch" in _reason(model, lambda: model(PTS).reshape(-1)[:3])

    def in_place():
        h = model[0](PTS)
        h.mul_(2.0)
        return model[4](torch.tanh(model[2](torch.tanh(h)))).squeeze(1)

    assert "in place" in _reason(model, in_place)


def test_row_check_witnesses_zero_and_non_finite_rows():
    model = _mlp()
    mask = torch.ones(7, dtype=f64)
    mask[2] = 0.0
    _, _, F = _factors(model, lambda: mask * model(PTS).squeeze(1))
    check = F.row_check()
    assert check[2] == 0 and (check[torch.arange(7) != 2] > 0).all()
    term = F.groups[0][0]
    term.A = term.A.clone()  # (the first layer's input is PTS itself)
    term.A[4, 1] = float("nan")
    assert not F.row_check()[4].isfinite() and F.row_check()[:4].isfinite().all()


# ------------------------------------------------------------------------------------------ in the optimizer


def _run(jacobian, steps=3, **kw):
    model = _mlp(seed=1)
    x = torch.rand(16, 3, dtype=f64, generator=torch.Generator().manual_seed(5))
    opt = sqpoptim.ProjectedAdamSQP(model.parameters(), lr=1e-2, jacobian=jacobian, **kw)
    for _ in range(steps):
        opt.step(lambda: (((model(x) - 1) ** 2).mean(), model(PTS).squeeze(1) - 0.2 * PTS[:, 0]))
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]), opt.diagnostics()


def test_the_optimizer_takes_the_layer_path_by_default_and_matches_the_batched_one():
    x_layers, diag = _run("auto")
    x_batched, diag_b = _run("batched")
    assert diag["jacobian"] == "layers" and diag_b["jacobian"] == "batched" and diag["solver"] == "dense"
    # the two Gram matrices agree to rounding (1e-16 relative); cond(G) ≈ 1e6 here amplifies it in the solves
    torch.testing.assert_close(x_layers, x_batched, rtol=1e-8, atol=1e-10)


def test_auto_falls_back_for_input_derivatives_and_layers_refuses_them():
    model = _mlp()

    def closure():
        x = PTS.clone().requires_grad_(True)
        u = model(x)
        ux = torch.autograd.grad(u.sum(), x, create_graph=True)[0][:, 0]
        return (u**2).mean(), ux + u.squeeze(1)

    opt = sqpoptim.ProjectedAdamSQP(model.parameters(), lr=1e-3)
    opt.step(closure)
    assert opt.diagnostics()["jacobian"] == "batched"
    opt.step(closure)  # recording has stopped: the batched path directly
    assert opt.diagnostics()["jacobian"] == "batched"
    strict = sqpoptim.ProjectedAdamSQP(model.parameters(), lr=1e-3, jacobian="layers")
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=r"jacobian='layers' does not apply.*reaches c other than"):
        strict.step(closure)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    with pytest.raises(ValueError, match="Invalid jacobian"):
        sqpoptim.ProjectedAdamSQP(model.parameters(), jacobian="fast")
