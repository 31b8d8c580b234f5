"""The layout of the ``problems`` package: no import cycle, every module importable on its own, modules of one
concern and a readable size, docstrings that speak of the code, one table of method names, problems that
declare how their predictions are drawn."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import problems
import problems.methods as methods_module
from problems import problem_class, problem_names
from problems.core.problem import PREDICTION_KINDS
from problems.methods import METHODS, method_table

from ..package_layout import find_cycle, import_graph, module_name, notes_in

ROOT = Path(problems.__file__).resolve().parent
MODULES = sorted(ROOT.rglob("*.py"))


def _module_name(path: Path) -> str:
    return module_name(ROOT, path)


def test_the_import_graph_has_no_cycle():
    """Explicit imports only: a package's ``__init__`` runs before its submodules, which is a cycle only where a
    submodule imports from its package what the package imports from it (that would be an explicit edge)."""
    graph = import_graph(ROOT)
    assert graph["problems.runner.loop"] >= {"problems", "problems.methods", "problems.runner.spec"}
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph) or [])


@pytest.mark.slow  # one interpreter importing each module afresh: ~5 s of CPU; the import-graph test stays
def test_every_module_imports_alone():
    names = [_module_name(p) for p in MODULES]
    script = (
        "import importlib, sys\n"
        "for name in sys.argv[1:]:\n"
        "    for loaded in [m for m in sys.modules if m == 'problems' or m.startswith('problems.')]:\n"
        "        del sys.modules[loaded]\n"
        "    importlib.import_module(name)\n"
    )
    out = subprocess.run([sys.executable, "-c", script, *names], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]


def test_modules_are_of_a_readable_size():
    sizes = {_module_name(p): len(p.read_text().splitlines()) for p in MODULES}
    assert max(sizes.values()) <= 400, {k: v for k, v in sizes.items() if v > 400}


def test_docstrings_speak_of_the_code():
    assert not notes_in(ROOT)


def test_one_table_of_method_names():
    """The module docstring's table is the registry's, and every name, label and class is unique."""
    assert method_table("rst") in methods_module.__doc__
    rows = [(m.name, m.label) for m in METHODS.values()]
    assert len({n for n, _ in rows}) == len({label for _, label in rows}) == len(rows)
    markdown = method_table().splitlines()
    assert len(markdown) == 2 + len(METHODS) and all(f"`{name}`" in markdown[i + 2] for i, name in enumerate(METHODS))


@pytest.mark.parametrize("name", problem_names())
def test_every_problem_declares_its_prediction_kind_and_family(name):
    cls = problem_class(name)
    assert cls.name == name and cls.prediction_kind in PREDICTION_KINDS
    family = cls.__module__.split(".")[1]
    assert family in ("pinn", "output_tasks"), cls.__module__
    layer_methods = [m for m in METHODS.values() if m.needs_output_constraints]
    for method in layer_methods:  # the output-layer methods refuse a problem without output constraints
        if family == "pinn":
            with pytest.raises(ValueError, match="output constraints"):
                method.check_problem(cls)
        else:
            method.check_problem(cls)


def test_plots_dispatch_on_the_declared_kind(monkeypatch):
    """A series whose arrays look like a field (2-D truth and an ``x`` key) is drawn as a series."""
    from problems import plots

    drawn = []
    for kind in PREDICTION_KINDS:
        monkeypatch.setitem(plots.PREDICTION_FIGURES, kind, lambda *a, kind=kind: drawn.append(kind))
    pred = {"t": np.arange(4.0), "x": np.arange(3.0), "u_true": np.ones((4, 3)), "u_pred": np.ones((4, 3))}
    run = {
        "status": "complete",
        "config": {"method": "adam-unc", "method_label": "Adam(unc)", "options": {}, "lr": 1e-3, "batch": "full"},
        "curves": {k: [1.0, 0.5] for k in ("objective", "test_mse", "max_abs_c")} | {"iteration": [0, 1]},
        "final": {"objective": 0.5, "test_mse": 0.5, "max_abs_c": 0.1},
        "prediction": pred,
    }
    for problem, kind in (("mpc", "series"), ("burgers", "field"), ("manifold_toy", "manifold")):
        plots.make_figures([run], problem)
        assert drawn[-1] == kind == problem_class(problem).prediction_kind
    with pytest.raises(ValueError, match="cannot tell"):
        plots.make_figures([run], "not_a_problem")
