r"""Measure globalisations of the normal step: the undamped Gauss–Newton step, Levenberg–Marquardt damping from
several ν0 (``normal_damping``, the package's), and two alternatives that are *not* in the package, implemented
here as prototypes for the measurement only:

``cap:K``
    the normal displacement γv is shortened to at most K·max(‖θ‖, 1) (θ the parameters; stateless);
``tr:K``
    a trust region on the normal displacement, ‖γv‖ ≤ Δ_k with Δ_0 = K·max(‖θ‖, 1): the Gauss–Newton direction
    shortened to Δ_k, the ratio ρ of actual to predicted decrease of ‖c‖ judged at the next closure as the
    package's damping does (only when the normal part dominated the step); ρ < 0: the step is undone and
    retaken from the old point with Δ = ‖γv‖/4; ρ < 1/4: Δ = ‖γv‖/4; ρ > 3/4 at the boundary: Δ doubles; Δ grows
    by 10 % per step while the tangential part dominates.

Both act by wrapping ``DenseSolver.scaled_normal_step`` (the dense constraint solver, the one these problems use)
and ``ConstrainedOptimizer.step``
(monkeypatching, selected by the environment variable ``NORMAL_STEP_PROTOTYPE``); they replace the damping
(``normal_damping=None`` underneath). Options are named ``paper`` (undamped), ``lm<ν0>`` (e.g. ``lm1e-6``),
``cap:<K>``, ``tr:<K>``.

    # the user-style problems of tests/user_problems.py (JSON lines, resumable), then the table
    PYTHONPATH=. python benchmarks/normal_step_options.py user results/normal_step_options.jsonl \
        --options paper,lm1e-6,lm1e-4,lm1e-3,lm1e-2,lm1e-1,cap:0.1,tr:0.1 --seeds 0
    PYTHONPATH=. python benchmarks/normal_step_options.py table results/normal_step_options.jsonl
    # the problem runner under a prototype (benchmarks/normal_step_options.sh runs the PINN problems)
    PYTHONPATH=. python benchmarks/normal_step_options.py run tr:0.1 spring --quick --methods sqp-adam
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import warnings
from pathlib import Path

import torch

import sqpoptim
from sqpoptim._dense_solver import DenseSolver
from sqpoptim._optimizer import ConstrainedOptimizer

ENV = "NORMAL_STEP_PROTOTYPE"
_original_normal_step = DenseSolver.scaled_normal_step
_original_init = ConstrainedOptimizer.__init__
_original_step = ConstrainedOptimizer.step
_current: dict[str, float | None] = {"radius": None, "predicted": None, "length": None}


def _shortened_normal_step(self, c, gamma, damping=None):
    delta_n, v = _original_normal_step(self, c, gamma, damping)
    radius = _current["radius"]
    if radius is not None and self.op.m:
        length = torch.linalg.vector_norm(delta_n)
        delta_n = delta_n * torch.clamp(radius / length.clamp_min(1e-300), max=1.0).to(delta_n.dtype)
        _current["predicted"] = float(torch.linalg.vector_norm(c.double() + self.op.mv(delta_n).double()))
        _current["length"] = float(torch.linalg.vector_norm(delta_n))
    return delta_n, v


def _init(self, params, defaults, **kw):
    spec = os.environ.get(ENV)
    if spec:
        kw["normal_damping"] = None
    _original_init(self, params, defaults, **kw)
    self._prototype = spec or None
    self._prototype_state = {}


def _trainable(opt):
    return [p for g in opt.param_groups for p in g["params"] if p.requires_grad]


def _step(self, closure=None):
    spec = getattr(self, "_prototype", None)
    if not spec:
        return _original_step(self, closure)
    kind, k = spec.split(":")
    params = _trainable(self)
    with torch.no_grad():
        theta = math.sqrt(sum(float((p.double() ** 2).sum()) for p in params))
    if kind == "cap":
        _current["radius"] = float(k) * max(theta, 1.0)
        try:
            return _original_step(self, closure)
        finally:
            _current["radius"] = None
    assert kind == "tr", spec
    st = self._prototype_state
    st.setdefault("delta", float(k) * max(theta, 1.0))
    st.setdefault("rejected", 0)

    def judged():
        out = closure()
        model = st.pop("model", None)
        if model is not None:
            c_new = float(torch.linalg.vector_norm(out[1].detach().double()))
            before, predicted, length, u_norm = model
            if not (length > u_norm and before - predicted > 0):
                st["delta"] *= 1.1
            else:
                rho = (before - c_new) / (before - predicted) if math.isfinite(c_new) else -1.0
                if rho < 0:
                    with torch.no_grad():
                        for p, x in zip(params, st["x"]):
                            p.copy_(x)
                    st["delta"] = length / 4
                    st["rejected"] += 1
                    out = closure()
                elif rho < 0.25:
                    st["delta"] = length / 4
                elif rho > 0.75 and length >= 0.99 * st["delta"]:
                    st["delta"] *= 2
        with torch.no_grad():
            st["x"] = [p.detach().clone() for p in params]
        st["c_before"] = float(torch.linalg.vector_norm(out[1].detach().double()))
        _current["radius"] = st["delta"]
        return out

    _current["predicted"] = None
    try:
        out = _original_step(self, judged)
    finally:
        _current["radius"] = None
    if _current["predicted"] is not None:
        u_norm = float(self._diagnostics["u_norm"])
        st["model"] = (st["c_before"], _current["predicted"], _current["length"], u_norm)
    self._diagnostics["rejected_steps"] = st["rejected"]
    return out


def install_prototypes() -> None:
    """Patch the package for the prototypes (the optimizers behave as before unless ``ENV`` is set)."""
    DenseSolver.scaled_normal_step = _shortened_normal_step
    ConstrainedOptimizer.__init__ = _init
    ConstrainedOptimizer.step = _step


def option_kwargs(option: str) -> dict:
    """Constructor keywords for ``option`` (and ``ENV`` set or cleared for the prototypes)."""
    os.environ.pop(ENV, None)
    if option == "paper":
        return {"normal_damping": None}
    if option.startswith("lm"):
        return {"normal_damping": float(option[2:])}
    os.environ[ENV] = option
    return {}


def user_sweep(args: argparse.Namespace) -> None:
    from tests.user_problems import PROBLEMS, train

    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    out = Path(args.out)
    done = set()
    if out.exists():
        for line in out.read_text().splitlines():
            r = json.loads(line)
            done.add((r["problem"], r["optimizer"], r["dtype"], r["option"], r["seed"]))
    classes = [sqpoptim.ProjectedAdamSQP, sqpoptim.ProjectedHeavyBallSQP]
    for name in args.problems.split(","):
        for cls in classes:
            for dtype in (torch.float32, torch.float64):
                for option in args.options.split(","):
                    for seed in (int(s) for s in args.seeds.split(",")):
                        rec = dict(problem=name, optimizer=cls.__name__, dtype=str(dtype)[6:], option=option, seed=seed)
                        if tuple(rec.values()) in done:
                            continue
                        t = time.process_time()
                        try:
                            o = train(PROBLEMS[name], cls, dtype, seed=seed, **option_kwargs(option))
                            rec.update(error=o.error, c_inf=o.c_inf, first=o.first_step, theta=o.theta)
                            rec.update(rejected=o.rejected)
                        except (ValueError, FloatingPointError, RuntimeError) as err:
                            rec.update(error=math.nan, failure=str(err)[:120])
                        rec["cpu_s"] = time.process_time() - t
                        with out.open("a") as f:
                            f.write(json.dumps(rec) + "\n")
                        print(rec, flush=True)


def table(args: argparse.Namespace) -> None:
    from tests.user_problems import PROBLEMS

    rows = [json.loads(line) for f in args.files for line in Path(f).read_text().splitlines()]
    options = list(dict.fromkeys(r["option"] for r in rows))
    problems = list(dict.fromkeys(r["problem"] for r in rows))

    def passed(r):
        return math.isfinite(r["error"]) and r["error"] < PROBLEMS[r["problem"]].tolerance and r["c_inf"] < 1e-3

    print("| option | " + " | ".join(problems) + " | passed | geometric mean of the error |")
    print("|---|" + "---|" * (len(problems) + 2))
    for option in options:
        cells, n_pass, n_all, logs = [], 0, 0, []
        for p in problems:
            sel = [r for r in rows if r["option"] == option and r["problem"] == p]
            if not sel:
                cells.append("–")
                continue
            k = sum(passed(r) for r in sel)
            n_pass, n_all = n_pass + k, n_all + len(sel)
            errors = [r["error"] if math.isfinite(r["error"]) else math.inf for r in sel]
            logs += [math.log10(min(max(e, 1e-12), 1e6)) for e in errors]
            cells.append(f"{k}/{len(sel)} (worst {max(errors):.1e})")
        print(f"| {option} | " + " | ".join(cells) + f" | {n_pass}/{n_all} | {10 ** (sum(logs) / len(logs)):.1e} |")


def run(args: argparse.Namespace) -> None:
    from problems.cli import main

    if args.option != "paper":
        os.environ[ENV] = args.option
    sys.exit(main(args.rest))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    u = sub.add_parser("user", help="the user-style problems under each option (JSON lines, resumable)")
    u.add_argument("out")
    u.add_argument("--problems", default="poisson,heat,advection,stiff,oscillator,mass_balance")
    u.add_argument("--options", default="paper,lm1e-6,lm1e-4,lm1e-3,lm1e-2,lm1e-1,cap:0.1,tr:0.1")
    u.add_argument("--seeds", default="0")
    t = sub.add_parser("table", help="Markdown table of a user sweep")
    t.add_argument("files", nargs="+")
    r = sub.add_parser("run", help="python -m problems ... under a prototype (cap:K or tr:K)")
    r.add_argument("option")
    r.add_argument("rest", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    install_prototypes()
    {"user": user_sweep, "table": table, "run": run}[args.command](args)


if __name__ == "__main__":
    main()
