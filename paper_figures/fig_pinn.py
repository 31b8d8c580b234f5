"""The SQP paper's figures for each PINN problem, from the committed exports ``pinn_<problem>``: objective curves
for both learning rates (full batch, and mean ± std of log10 over the mini-batch seeds), final test MSE and max |c|
per method, constraint violation over iterations, and prediction vs truth (best run of each method)."""

from __future__ import annotations

from pathlib import Path

from _data import DATA, load

from problems.plots import make_figures

PROBLEMS = ("spring", "chemistry", "burgers", "darcy")


def main(out: Path) -> list[Path]:
    written = []
    missing = [p for p in PROBLEMS if not (DATA / f"pinn_{p}.json.gz").exists()]
    for name in PROBLEMS:
        if name in missing:
            continue
        problem, runs = load(f"pinn_{name}")
        for kind, fig in make_figures(runs, problem).items():
            if kind == "overview":
                continue
            path = out / f"{name}_{kind}.png"
            fig.savefig(path, dpi=110)
            written.append(path)
    if missing:
        print(f"fig_pinn.py: no export yet for {', '.join(missing)}")
    return written


if __name__ == "__main__":
    for p in main(Path(__file__).resolve().parent):
        print(p)
