"""Why HardNet++ trains poorly on the learned-MPC task (RESULTS.md, HardNet++ Table I): continuity of the layer's
output and finite differences of its gradient at an untrained backbone's raw output, and short training runs.

    python benchmarks/layer_tables_mpc_diagnosis.py jumps        # output moved by a 1e-6 change of the raw output
    python benchmarks/layer_tables_mpc_diagnosis.py lm_sources   # which part of the iteration jumps
    python benchmarks/layer_tables_mpc_diagnosis.py fd3          # implicit / unrolled gradient vs central differences
    python benchmarks/layer_tables_mpc_diagnosis.py paper_check  # the paper iteration: cost, implicit gradient vs FD
    python benchmarks/layer_tables_mpc_diagnosis.py kkt_check    # the orthogonal projection (KKT-Hardnet) likewise
    python benchmarks/layer_tables_mpc_diagnosis.py run 300 '{"layer": {"free_steps": 0, "gradient": "unrolled"}}'

``run`` options (JSON): ``layer`` (HardNetPP keywords), ``kind`` ("kkt" for KKTHardNet), ``lr``, ``batch``,
``seed``, ``lambda_d`` (displacement penalty), ``log`` (evaluate every so many steps). One thread; seed 0's
untrained backbone on the first 16 training states for the checks.
"""

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
torch.set_num_threads(1)
from problems.output_tasks.mpc import LearnedMPC, mpc_cost  # noqa: E402
from sqpoptim.layers import HardNetPP  # noqa: E402


def make(seed=0, kind="hpp", **layer_kw):
    p = LearnedMPC("paper")
    net = p.make_model(seed)
    if kind == "kkt":
        from sqpoptim.layers import KKTHardNet

        layer = KKTHardNet(p.output_constraints(), **layer_kw)
    else:
        layer = HardNetPP(p.output_constraints(), **layer_kw)
    return p, net, layer


def subopt(p, net, layer, x=None, z=None):
    x = p.x0_test if x is None else x
    z = p.z_test if z is None else z
    with torch.no_grad():
        y = layer(x, net(x))
    s = torch.relu(mpc_cost(y.double()) - z) / z
    return float(s.mean()), float(s.max())


def train(p, net, layer, iters, lr=1e-3, batch=16, seed=0, lambda_d=0.0, log=100, tag=""):
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    n = p.x0_train.shape[0]
    t0 = time.process_time()
    hist = []
    for it in range(1, iters + 1):
        idx = torch.randperm(n, generator=g)[: min(batch, n)]
        x = p.x0_train[idx]
        yh = net(x)
        y = layer(x, yh)
        loss = mpc_cost(y).mean()
        if lambda_d:
            loss = loss + lambda_d * (yh - y).square().sum(-1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if it % log == 0 or it == iters:
            s = subopt(p, net, layer)
            with torch.no_grad():
                yh_t = net(p.x0_test)
                disp = float((layer(p.x0_test, yh_t) - yh_t).norm(dim=-1).mean())
            hist.append((it, loss.item(), *s, disp))
            print(
                f"{tag} it {it} loss {float(loss):.1f} test subopt {s[0]:.4f}/{s[1]:.3f} |yhat-y| {disp:.2f} "
                f"cpu {time.process_time() - t0:.0f}s",
                flush=True,
            )
    return hist


def untrained_batch(p, net):
    """The first 16 training states and the untrained backbone's raw outputs for them, in float64."""
    x = p.x0_train[:16].double()
    with torch.no_grad():
        return x, net(p.x0_train[:16]).double()


def unit_direction(like):
    """A seeded random direction of unit norm."""
    torch.manual_seed(0)
    d = torch.randn_like(like)
    return d / d.norm()


def timed_projection(label, layer, x, yh):
    """One projection of ``yh`` without a graph: print its CPU time, iterations and largest residual."""
    t0 = time.process_time()
    with torch.no_grad():
        res = layer.project(x, yh)
    cpu = time.process_time() - t0
    print(label, "forward cpu", f"{cpu:.2f}s", "iters", res.iterations, "max r", float(res.residual.max()), flush=True)


def gradient_against_fd(label, layer, x, yh, directions, steps):
    """Central differences of the summed MPC cost through ``layer`` at ``yh`` along each named direction (``None``:
    the normalised backward gradient itself), beside the backward gradient's directional derivative."""
    v = yh.clone().requires_grad_(True)
    mpc_cost(layer(x, v)).sum().backward()
    g = v.grad
    for name, d in directions.items():
        d = g / g.norm() if d is None else d
        fds = [
            (float(mpc_cost(layer(x, yh + h * d)).sum()) - float(mpc_cost(layer(x, yh - h * d)).sum())) / (2 * h)
            for h in steps
        ]
        print(
            label, name, f"FD(h={', '.join(f'{h:g}' for h in steps)})", [f"{v:.6g}" for v in fds],
            "backward", f"{float((g * d).sum()):.6g}", flush=True,
        )  # fmt: skip


if __name__ == "__main__":
    which = sys.argv[1]
    iters = int(sys.argv[2]) if len(sys.argv) > 2 else 0
    if which == "run":
        import json

        cfg = json.loads(sys.argv[3])
        layer_kw = cfg.pop("layer", {})
        p, net, layer = make(cfg.pop("seed", 0), cfg.pop("kind", "hpp"), **layer_kw)
        train(p, net, layer, iters, tag=sys.argv[3], **cfg)
    if which == "jumps":
        p, net, _ = make()
        x, yh = untrained_batch(p, net)
        d = unit_direction(yh)
        for kw in (dict(tol=1e-11), dict(tol=1e-6), dict(method="paper"), dict(method="paper", max_iter=2000)):
            layer = HardNetPP(p.output_constraints(), **kw)
            with torch.no_grad():
                outs = {h: layer(x, yh + h * d) for h in (-1e-6, 1e-6)}
                res = layer.project(x, yh)
            dy = (outs[1e-6] - outs[-1e-6]).norm(dim=-1)
            dz = mpc_cost(outs[1e-6]) - mpc_cost(outs[-1e-6])
            print(kw, "iters", res.iterations, "max resid", float(res.residual.max()))
            print("  |dy| per sample for |dyhat|=2e-6:", [f"{v:.1e}" for v in dy.tolist()])
            print("  dZ per sample:", [f"{v:.1e}" for v in dz.tolist()], flush=True)
    if which == "paper_check":
        p, net, _ = make()
        x, yh = untrained_batch(p, net)
        for kw in (
            dict(method="paper"),
            dict(method="paper", early_stop=True, max_iter=3000),
            dict(method="paper", early_stop=True, max_iter=3000, tol=1e-9),
        ):
            timed_projection(str(kw), HardNetPP(p.output_constraints(), **kw), x, yh)
        layer = HardNetPP(p.output_constraints(), method="paper", early_stop=True, max_iter=3000, tol=1e-9)
        gradient_against_fd(
            "paper implicit", layer, x, yh, {"grad": None, "rand": unit_direction(yh)}, (1e-4, 1e-3, 1e-2)
        )
    if which == "kkt_check":
        from sqpoptim.layers import KKTHardNet

        p, net, _ = make()
        x, yh = untrained_batch(p, net)
        layer = KKTHardNet(p.output_constraints())
        timed_projection("kkt", layer, x, yh)
        d = unit_direction(yh)
        with torch.no_grad():
            dy = (layer(x, yh + 1e-6 * d) - layer(x, yh - 1e-6 * d)).norm(dim=-1)
        print("  |dy| per sample:", [f"{v:.1e}" for v in dy.tolist()])
        v = yh.clone().requires_grad_(True)
        t0 = time.process_time()
        mpc_cost(layer(x, v)).sum().backward()
        print("fwd+bwd cpu", f"{time.process_time() - t0:.2f}s")
        gradient_against_fd("kkt implicit", layer, x, yh, {"grad": None, "rand": d}, (1e-4, 1e-3, 1e-2))
    if which == "lm_sources":
        from sqpoptim.layers._gauss_newton import gauss_newton
        from sqpoptim.layers._system import StackedSystem

        p, net, _ = make()
        x, yh = untrained_batch(p, net)
        d = unit_direction(yh)
        oc = p.output_constraints()
        for kw in (
            dict(damping=True, free_steps=10),
            dict(damping=True, free_steps=0),
            dict(damping=False, free_steps=0),
        ):
            outs = []
            for h in (-1e-6, 1e-6):
                s = StackedSystem(oc, x, yh + h * d, jacobian=True)
                res, _, _ = gauss_newton(s, yh + h * d, tol=1e-10, max_iter=200, jacobian="exact", **kw)
                outs.append(res.y)
            dy = (outs[1] - outs[0]).norm(dim=-1)
            print(
                kw,
                "iters",
                res.iterations,
                "conv",
                bool(res.converged.all()),
                "|dy|:",
                [f"{v:.0e}" for v in dy.tolist()],
                flush=True,
            )
    if which == "fd3":
        p, net, _ = make()
        x, yh = untrained_batch(p, net)
        r = unit_direction(yh)
        for kw in (dict(free_steps=0, tol=1e-11), dict(free_steps=0, tol=1e-11, gradient="unrolled")):
            layer = HardNetPP(p.output_constraints(), **kw)
            gradient_against_fd(kw, layer, x, yh, {"grad": None, "rand": r}, (1e-5, 1e-4, 1e-3))
