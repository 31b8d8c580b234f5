"""The layout of the ``sqpoptim`` package: no import cycle, and docstrings and comments that speak of the code
and cite papers by title or arXiv id."""

from pathlib import Path

import sqpoptim

from .package_layout import find_cycle, import_graph, notes_in

ROOT = Path(sqpoptim.__file__).resolve().parent


def test_the_import_graph_has_no_cycle():
    graph = import_graph(ROOT)
    # the graph is read, not empty: the orchestration imports the modules of its phases
    assert graph["sqpoptim._optimizer"] >= {"sqpoptim._step_inputs", "sqpoptim._rejection", "sqpoptim._feasibility"}
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph) or [])


def test_a_cycle_is_found():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_docstrings_speak_of_the_code():
    assert not notes_in(ROOT)
