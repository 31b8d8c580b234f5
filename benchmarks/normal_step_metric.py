"""Per-layer and per-coordinate metrics W for the damped Gauss-Newton normal step: can any reach feasibility fast?

    v = -W J^T (J W J^T + mu I)^{-1} c,   mu = nu * mean(diag(J W J^T))

on the scaling benchmark's model (tanh MLP 8-224-224-224-1, ~1e5 params) and constraints
c = model(Xc).squeeze(1) - Yc, pure feasibility (no objective, no tangential step).

J is never formed for the per-layer metrics: per-sample factors (A_{l-1}, D_l) give
G_l = J_l J_l^T = (D_l D_l^T) o (A_{l-1} A_{l-1}^T + 1) and J_l^T y = ((D_l * y)^T A_{l-1}, D_l^T y).
The per-coordinate (Jacobi) metric forms J_l in chunks of output units to get J W J^T.
The factors are checked against torch.func (vmap(grad)) at start (--check).

Damping policies:
  pkg    - the package's rule (sqpoptim/_damping.py, exact mode): nu0 = 1e-6, Nielsen on rho >= 0,
           reject + escalate x2, x4, ... on rho < 0 (a rejection consumes a step; the retry is not judged),
           nu in [1e-6, 1e4].
  length - pkg, but a rejection also raises nu to at least the value at which the bound
           ||v|| <= ||c|| / (2 sqrt(mu)) caps the retaken step at ||v_rejected|| / (4 (1 - rho))
           (the length at which an error quadratic in the step gives rho = 3/4); not the package's rule.
  retry  - pkg, with the length policy's nu for the retaken step only (the doubled nu kept after it).
  oracle - greedy: every step the best of NU_GRID by the new ||c|| (staying put allowed).
  geodesic - the oracle, each nu also trying the step with geodesic acceleration, v + a/2 with
           a = -W J^T (J W J^T + mu I)^{-1} r_vv and r_vv = (2/h) ((c(x + h v) - c(x)) / h - J v), h = 0.1
           (Transtrum & Sethna, "Improvements to the Levenberg-Marquardt algorithm for nonlinear least-squares
           minimization", arXiv:1201.5885): one more evaluation of c and one more solve with the same factor.

Usage (RESULTS.md, "The metric of the normal step"):
  python benchmarks/normal_step_metric.py --check --m 10 100 > metric.jsonl
  python benchmarks/normal_step_metric.py --m 1000 >> metric.jsonl
  python benchmarks/normal_step_metric.py --table metric.jsonl
  python benchmarks/normal_step_metric.py --spectrum
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

import torch
from torch import nn

torch.set_num_threads(1)

NU_GRID = [1e-8, 1e-6, 1e-4, 1e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0]
NU_MIN, NU_MAX, NU0 = 1e-6, 1e4, 1e-6


def mlp(width: int) -> nn.Module:
    return nn.Sequential(
        nn.Linear(8, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(),
        nn.Linear(width, 1),
    )  # fmt: skip


def problem(m: int, seed_model: int, seed_gen: int, dtype: torch.dtype, first_scale: float = 1.0):
    torch.manual_seed(seed_model)
    model = mlp(224)  # float32 init, as in the benchmark
    with torch.no_grad():  # a rougher network: the first layer's weights scaled (1: the benchmark's init)
        model[0].weight.mul_(first_scale)
    gen = torch.Generator().manual_seed(seed_gen)
    torch.rand(1024, 8, generator=gen), torch.rand(1024, 1, generator=gen)  # the benchmark's batch: advances gen
    Xc, Yc = torch.rand(m, 8, generator=gen), torch.rand(m, generator=gen)
    lins = [mod for mod in model if isinstance(mod, nn.Linear)]
    theta = [[lin.weight.detach().to(dtype).clone(), lin.bias.detach().to(dtype).clone()] for lin in lins]
    return theta, Xc.to(dtype), Yc.to(dtype)


def forward(theta, X):
    acts = [X]
    h = X
    for i, (W, b) in enumerate(theta):
        z = h @ W.T + b
        h = torch.tanh(z) if i < len(theta) - 1 else z
        acts.append(h)
    return acts  # acts[-1]: output [m, 1]


def residual(theta, Xc, Yc):
    return forward(theta, Xc)[-1].squeeze(1) - Yc


def factors(theta, Xc):
    """Per layer l: (A_{l-1} [m, in], D_l [m, out]) with dc_a/dW_l = D_l[a] outer A_{l-1}[a], dc_a/db_l = D_l[a]."""
    acts = forward(theta, Xc)
    L = len(theta)
    D = [None] * L
    d = torch.ones(Xc.shape[0], 1, dtype=Xc.dtype)
    for l in reversed(range(L)):
        D[l] = d
        if l > 0:
            d = (d @ theta[l][0]) * (1 - acts[l] ** 2)
    return [(acts[l], D[l]) for l in range(L)], acts[-1].squeeze(1)


def layer_grams(F):
    """G_l = J_l J_l^T in float64."""
    out = []
    for A, D in F:
        A64, D64 = A.double(), D.double()
        out.append((D64 @ D64.T) * (A64 @ A64.T + 1))
    return out


def jt(F, y):
    """J^T y per layer as [dW, db] in the factors' dtype."""
    y = y.to(F[0][0].dtype)
    return [[(D * y[:, None]).T @ A, D.T @ y] for A, D in F]


def jacobi_diag(F):
    """diag(J_l^T J_l) per layer as [dW, db]."""
    return [[(D**2).T @ (A**2), (D**2).sum(0)] for A, D in F]


def gram_coordinate(F, w, chunk=16):
    """J diag(w) J^T in float64, w per coordinate ([wW, wb] per layer); J formed in chunks of output units."""
    m = F[0][0].shape[0]
    G = torch.zeros(m, m, dtype=torch.float64)
    for (A, D), (wW, wb) in zip(F, w):
        A64, D64 = A.double(), D.double()
        for s in range(0, D.shape[1], chunk):
            Jc = (D64[:, s : s + chunk, None] * A64[:, None, :]).reshape(m, -1)
            G.addmm_(Jc * wW[s : s + chunk].double().reshape(-1), Jc.T)
        G.addmm_(D64 * wb.double(), D64.T)
    return G


def norm2(tensors):
    return sum(float((t.double() ** 2).sum()) for t in tensors)


# ---------------------------------------------------------------- metrics: per layer scalar w_l or per coordinate
def metric(name, theta, F, Gl):
    """Returns (G_W, w) with w a list of per-layer [wW, wb] (scalars or tensors)."""
    L = len(theta)
    numel = [sum(p.numel() for p in layer) for layer in theta]
    tr = [float(torch.trace(G)) for G in Gl]
    if name == "jacobi":
        dg = jacobi_diag(F)
        allv = torch.cat([t.reshape(-1).double() for layer in dg for t in layer])
        floor = 1e-8 * float(allv.mean())
        w = [[1.0 / (t.double() + floor) for t in layer] for layer in dg]
        w = [[t.to(theta[0][0].dtype) for t in layer] for layer in w]
        return gram_coordinate(F, w), w
    if name == "euclid":
        s = [1.0] * L
    elif name == "trace":  # every layer an equal share of J W J^T
        s = [1.0 / t for t in tr]
    elif name == "lars":  # relative scale ||theta_l||^2 / numel_l
        s = [norm2(layer) / n for layer, n in zip(theta, numel)]
    elif name == "lastonly":  # only (W4, b4): c is linear there
        s = [0.0] * (L - 1) + [1.0]
    elif name.startswith("last"):  # last layer boosted: last100, last1e4
        s = [1.0] * L
        s[-1] = float(name[4:])
    elif name == "numel":
        s = [1.0 / n for n in numel]
    elif name == "jacobi_layer":  # block-Jacobi scalar: 1 / mean_l diag(J_l^T J_l) = numel_l / tr(G_l)
        s = [n / t for n, t in zip(numel, tr)]
    elif name.startswith("trace_last"):  # equal share, last layer boosted further: trace_last10
        s = [1.0 / t for t in tr]
        s[-1] *= float(name[10:])
    elif name.startswith("top2_"):  # last two layers boosted: top2_100
        s = [1.0] * L
        s[-1] = s[-2] = float(name[5:])
    else:
        raise ValueError(name)
    G = sum(si * G for si, G in zip(s, Gl))
    return G, [[si, si] for si in s]


def step_for(G, c, F, w, nu, dtype):
    Gd = G.clone()
    Gd.diagonal().add_(nu * float(torch.diagonal(G).mean()))
    L_, info = torch.linalg.cholesky_ex(Gd)
    if int(info) != 0:
        y = torch.linalg.lstsq(Gd, -c.double().unsqueeze(1)).solution.squeeze(1)
    else:
        y = torch.cholesky_solve(-c.double().unsqueeze(1), L_).squeeze(1)
    g = jt(F, y)
    v = [[wi * gi for wi, gi in zip(wl, gl)] for wl, gl in zip(w, g)]
    v = [[t.to(dtype) for t in layer] for layer in v]
    Jv_pred = G @ y  # J v = J W J^T y
    return v, y, Jv_pred


def add(theta, v):
    return [[p + d for p, d in zip(pl, vl)] for pl, vl in zip(theta, v)]


def run(m, metric_name, policy, steps, seed_model, seed_gen, dtype, nu_grid=None, nu_floor=None, first_scale=1.0):
    theta, Xc, Yc = problem(m, seed_model, seed_gen, dtype, first_scale)
    traj, cnorm, nus, vnorms = [], [], [], []
    rejections = 0
    first_v = None
    t0 = time.process_time()
    if policy in ("oracle", "geodesic"):
        c = residual(theta, Xc, Yc)
        grid = NU_GRID if nu_grid is None else nu_grid
        traj.append(float(c.abs().max()))
        cnorm.append(float(c.double().norm()))
        for _ in range(steps):
            F, c = factors(theta, Xc)
            c = c - Yc
            G, w = metric(metric_name, theta, F, layer_grams(F))
            best = (float(torch.linalg.vector_norm(c.double())), None, None, 0.0)
            for nu in grid:
                v, _, Jv = step_for(G, c, F, w, nu, dtype)
                candidates = [v]
                if policy == "geodesic":  # the second directional derivative of c along v, by differences
                    h = 0.1
                    c_h = residual(add(theta, [[h * t for t in layer] for layer in v]), Xc, Yc)
                    r_vv = (2.0 / h) * ((c_h - c).double() / h - Jv)
                    a, _, _ = step_for(G, r_vv, F, w, nu, dtype)
                    candidates.append([[t + 0.5 * u for t, u in zip(vl, al)] for vl, al in zip(v, a)])
                for d in candidates:
                    th = add(theta, d)
                    cn = residual(th, Xc, Yc)
                    r = float(torch.linalg.vector_norm(cn.double()))
                    if math.isfinite(r) and r < best[0]:
                        best = (r, th, nu, math.sqrt(norm2([t for layer in d for t in layer])))
            if best[1] is not None:
                theta = best[1]
                if first_v is None:
                    first_v = best[3]
            nus.append(best[2])
            vnorms.append(best[3])
            cc = residual(theta, Xc, Yc)
            traj.append(float(cc.abs().max()))
            cnorm.append(float(cc.double().norm()))
    else:  # the package's exact-mode rule ("length": its variant), one closure call per step; traj[k] = what
        # call k+1 returns
        nu_min = NU_MIN if nu_floor is None else nu_floor
        nu, esc = max(NU0, nu_min) if nu_floor is None else nu_floor, 2.0
        model = None  # (||c_k||, ||c_k + J v_k||) of the last step, None when not judged
        model_scales = (1.0, 1.0)  # (||v_k||, mean diag(J W J^T)) of the last step
        nu_once = None  # the retry policy's nu for the next step only
        x_acc, c_acc = theta, None
        for call in range(steps + 1):
            F, c = factors(theta, Xc)
            c = c - Yc
            cn = float(torch.linalg.vector_norm(c.double()))
            if model is not None:
                before, pred = model
                if before - pred > 0 and math.isfinite(cn):
                    rho = (before - cn) / (before - pred)
                    if rho < 0:  # rejected: back to x_k, nu escalated, this call ends
                        rejections += 1
                        theta = x_acc
                        nu_length = 0.0
                        if policy in ("length", "retry"):  # the retaken step at most L / (4 (1 - rho)) long
                            v_rejected, mean_diag = model_scales
                            cap = v_rejected / (4.0 * (1.0 - rho))
                            nu_length = before**2 / (4.0 * cap**2) / mean_diag
                        if policy == "retry":  # the cap for the retaken step alone
                            nu = min(max(nu * esc, nu_min), NU_MAX)
                            nu_once = min(max(nu, nu_length), NU_MAX)
                        else:
                            nu = min(max(nu * esc, nu_length, nu_min), NU_MAX)
                        esc = min(2 * esc, 2.0**20)
                        model = None  # the retry is not judged
                        traj.append(float(c_acc.abs().max()))
                        cnorm.append(float(c_acc.double().norm()))
                        nus.append(("rej", rho))
                        continue
                    nu = min(max(nu * max(1 / 3, 1 - (2 * rho - 1) ** 3), nu_min), NU_MAX)
                    esc = 2.0
                    nus.append(("ok", rho))
                else:
                    nus.append(("nj", None))
            traj.append(float(c.abs().max()))
            cnorm.append(cn)
            if call == steps:
                break
            G, w = metric(metric_name, theta, F, layer_grams(F))
            v, _, Jv = step_for(G, c, F, w, nu if nu_once is None else nu_once, dtype)
            nu_once = None
            vn = math.sqrt(norm2([t for layer in v for t in layer]))
            vnorms.append(vn)
            if first_v is None:
                first_v = vn  # (first step taken; with nu0 it is accepted unless rejected at call 1)
            model = (cn, float(torch.linalg.vector_norm(c.double() + Jv)))
            model_scales = (vn, float(torch.diagonal(G).mean()))
            x_acc, c_acc = theta, c
            theta = add(theta, v)
    return dict(
        m=m, metric=metric_name, policy=policy, nu_floor=nu_floor, seed_model=seed_model, seed_gen=seed_gen,
        first_scale=first_scale,
        dtype=str(dtype).replace("torch.", ""), c0=traj[0], c10=traj[10] if len(traj) > 10 else None,
        c12=traj[-1], traj=traj, cnorm=cnorm, rejections=rejections, first_v=first_v, vnorms=vnorms, nus=nus,
        theta_norm=math.sqrt(norm2([t for layer in theta for t in layer])), cpu_s=time.process_time() - t0,
    )  # fmt: skip


def check():
    """Factors against torch.func: per-sample grads of c for a few points; and G_coordinate with w=1 vs layer_grams."""
    from torch.func import functional_call, grad, vmap

    torch.manual_seed(0)
    model = mlp(224).double()
    gen = torch.Generator().manual_seed(1)
    Xc, Yc = torch.rand(7, 8, generator=gen, dtype=torch.float64), torch.rand(7, generator=gen, dtype=torch.float64)
    params = {k: v.detach() for k, v in model.named_parameters()}

    def f(p, x, y):
        return functional_call(model, p, (x.unsqueeze(0),)).squeeze() - y

    J = vmap(grad(f), in_dims=(None, 0, 0))(params, Xc, Yc)
    lins = [mod for mod in model if isinstance(mod, nn.Linear)]
    theta = [[lin.weight.detach(), lin.bias.detach()] for lin in lins]
    F, out = factors(theta, Xc)
    err = 0.0
    for l, (A, D) in enumerate(F):
        idx = 2 * l
        JW = D[:, :, None] * A[:, None, :]
        err = max(err, float((JW - J[f"{idx}.weight"]).abs().max()), float((D - J[f"{idx}.bias"]).abs().max()))
    ref = functional_call(model, params, (Xc,)).squeeze(1) - Yc
    err = max(err, float((out - Yc - ref).abs().max()))
    Gl = layer_grams(F)
    Gc = gram_coordinate(F, [[torch.ones_like(W), torch.ones_like(b)] for W, b in theta])
    err_g = float((sum(Gl) - Gc).abs().max() / Gc.abs().max())
    Jfull = torch.cat([J[k].reshape(7, -1) for k in params], 1)
    err_g2 = float((Jfull @ Jfull.T - sum(Gl)).abs().max() / Gc.abs().max())
    print(
        f"check: factors vs vmap(grad) max err {err:.2e}; gram coordinate vs layer {err_g:.2e}; vs J J^T {err_g2:.2e}",
        file=sys.stderr,
    )
    assert err < 1e-12 and err_g < 1e-12 and err_g2 < 1e-12


def spectrum() -> None:
    """Eigenvalues of each layer's Gram block and of their sum at the random network, relative to the largest."""
    for m in [100, 1000]:
        theta, Xc, Yc = problem(m, 0, 1, torch.float64)
        F, out = factors(theta, Xc)
        c = out - Yc
        Gl = layer_grams(F)
        print(f"m={m} |c|={c.norm():.3g} max|c|={c.abs().max():.3g}")
        for label, G in [*((f"G{l + 1}", G) for l, G in enumerate(Gl)), ("sum", sum(Gl))]:
            e = torch.linalg.eigvalsh(G).flip(0)
            at = " ".join(f"{i + 1}:{e[i] / e[0]:.1e}" for i in [0, 1, 2, 5, 9, 19, 49, 99, 199, 499, 999] if i < m)
            print(f"  {label} trace={G.trace():.3g} eigenvalue/largest at {at}")


def table(paths: list[str]) -> None:
    """The Markdown table of JSON lines written by this script."""
    rows = [json.loads(line) for path in paths for line in open(path) if line.startswith("{")]
    print("| m | seeds | dtype | metric | policy | max|c| 0 → 10 | ‖c‖ 0 → 10 | rejections | ‖v‖ first step |")
    print("|---:|---|---|---|---|---|---|---:|---:|")
    for r in rows:
        floor = f" ν≥{r['nu_floor']:g}" if r.get("nu_floor") else ""
        print(
            f"| {r['m']} | {r['seed_model']},{r['seed_gen']} | {r['dtype']} | {r['metric']} | {r['policy']}{floor} | "
            f"{r['c0']:.2f} → **{r['c10']:.2g}** | {r['cnorm'][0]:.3g} → {r['cnorm'][10]:.3g} | {r['rejections']} | "
            f"{r['first_v'] or 0:.3g} |"
        )


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--m", type=int, nargs="+", default=[10, 100, 1000])
    metrics = ["euclid", "trace", "lars", "last100", "last1e4", "numel", "jacobi_layer", "jacobi"]
    ap.add_argument("--metrics", nargs="+", default=metrics)
    ap.add_argument("--policies", nargs="+", default=["pkg", "oracle"])
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--seed-model", type=int, default=0)
    ap.add_argument("--seed-gen", type=int, default=1)
    ap.add_argument("--dtype", default="float64", choices=["float64", "float32"])
    ap.add_argument("--check", action="store_true")
    ap.add_argument("--nu-floor", type=float, default=None, help="pkg policy: nu0 = floor = this (default 1e-6)")
    ap.add_argument("--nu-grid", type=float, nargs="+", default=None, help="the oracle's nu grid (default NU_GRID)")
    ap.add_argument("--first-scale", type=float, default=1.0, help="scale of the first layer's weights (1: as built)")
    ap.add_argument("--spectrum", action="store_true", help="print the layer Gram spectra and stop")
    ap.add_argument("--table", nargs="+", help="print the Markdown table of these JSON-lines files and stop")
    a = ap.parse_args()
    if a.spectrum:
        return spectrum()
    if a.table:
        return table(a.table)
    if a.check:
        check()
    dtype = getattr(torch, a.dtype)
    for m in a.m:
        for name in a.metrics:
            for pol in a.policies:
                r = run(m, name, pol, a.steps, a.seed_model, a.seed_gen, dtype, a.nu_grid, a.nu_floor, a.first_scale)
                print(json.dumps(r), flush=True)
                tr = " ".join(f"{x:.2g}" for x in r["traj"])
                print(
                    f"m={m:5d} {name:13s} {pol:6s} c10={r['c10']:.3g} rej={r['rejections']} "
                    f"|v1|={r['first_v'] or 0:.3g} |c|: {r['cnorm'][0]:.3g}->{r['cnorm'][10]:.3g} "
                    f"cpu={r['cpu_s']:.0f}s  traj: {tr}",
                    file=sys.stderr,
                    flush=True,
                )


if __name__ == "__main__":
    main()
