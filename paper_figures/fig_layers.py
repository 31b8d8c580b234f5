"""The layer papers' tasks, from the committed exports ``layers_<problem>``: final test error and constraint
violation per method (output layers, the soft penalty, the plain network and training-time SQP side by side),
objective curves and predictions (best run of each method). ``enforce_fitting`` (ENFORCE C1) is the figure that
compares training-time constraints with the output layers on a task where both apply."""

from __future__ import annotations

from pathlib import Path

from _data import DATA, load

from problems.plots import make_figures

PROBLEMS = (
    "enforce_fitting",
    "kkt_e1",
    "kkt_e2",
    "kkt_e3",
    "pooling",
    "mpc",
    "nonconvex_linear",
    "nonconvex_quadratic",
)
KINDS = ("objective", "final_metrics", "prediction")


def main(out: Path) -> list[Path]:
    written, missing = [], []
    for name in PROBLEMS:
        if not (DATA / f"layers_{name}.json.gz").exists():
            missing.append(name)
            continue
        problem, runs = load(f"layers_{name}")
        for kind, fig in make_figures(runs, problem).items():
            if kind in KINDS:
                path = out / f"layers_{name}_{kind}.png"
                fig.savefig(path, dpi=110)
                written.append(path)
    if missing:
        print(f"fig_layers.py: no export yet for {', '.join(missing)}")
    return written


if __name__ == "__main__":
    for p in main(Path(__file__).resolve().parent):
        print(p)
