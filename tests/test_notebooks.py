"""The notebooks under ``notebooks/`` execute top to bottom at the CI budget (``SQPOPTIM_NOTEBOOK_BUDGET=ci``) and
show what their text claims; the committed files carry no outputs; ruff reads them.

The kernel runs with this interpreter, so the notebooks see the package installed in the test's environment.
To clear a notebook's outputs before committing it::

    python -c "from tests.test_notebooks import strip_outputs; strip_outputs('notebooks/01_quickstart.ipynb')"
"""

import re
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from jupyter_client import KernelManager
from jupyter_client.kernelspec import KernelSpecManager
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
NUMBER = r"([-+0-9.e]+|nan|inf)"


def strip_outputs(path: str | Path) -> None:
    """Remove outputs, execution counts and nbclient's timing metadata from a notebook file, in place."""
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        cell.metadata.pop("execution", None)
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    nbformat.write(nb, path)


def _execute(path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> nbformat.NotebookNode:
    monkeypatch.setenv("SQPOPTIM_NOTEBOOK_BUDGET", "ci")
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # the notebooks' temporary folders land under pytest's
    monkeypatch.setenv("IPYTHONDIR", str(tmp_path / "ipython"))
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path / "runtime"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    nb = nbformat.read(path, as_version=4)
    # An empty kernel_dirs leaves only ipykernel's built-in "python3" spec, whose command is this interpreter
    # (sys.executable -m ipykernel_launcher). Otherwise a "python3" kernelspec installed in the user's or the
    # system's Jupyter folders, possibly for another Python without sqpoptim, would take precedence.
    km = KernelManager(kernel_name="python3", kernel_spec_manager=KernelSpecManager(kernel_dirs=[]))
    # Any cell error raises CellExecutionError (with the cell's traceback) and fails the test.
    NotebookClient(nb, km=km, timeout=300, resources={"metadata": {"path": str(tmp_path)}}).execute()
    return nb


def _cell(nb: nbformat.NotebookNode, cell_id: str) -> nbformat.NotebookNode:
    return next(c for c in nb.cells if c.get("id") == cell_id)


def _text(cell: nbformat.NotebookNode) -> str:
    return "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream" and o.name == "stdout")


def _images(cell: nbformat.NotebookNode) -> int:
    return sum("image/png" in o.get("data", {}) for o in cell.outputs)


def _table(text: str, names: list[str], columns: int) -> dict[str, list[float]]:
    rows = {}
    for name in names:
        match = re.search(rf"^{re.escape(name)}\s+" + r"\s+".join([NUMBER] * columns) + r"\s*$", text, re.M)
        assert match, f"no row {name!r} in:\n{text}"
        rows[name] = [float(x) for x in match.groups()]
    return rows


def _check_quickstart(nb: nbformat.NotebookNode, tmp_path: Path) -> None:
    names = ["Adam (data only)", "Adam + penalty (w = 1)", "SQP-Adam, normal_lr=1.0", "SQP-Adam, normal_lr=None"]
    rows = _table(_text(_cell(nb, "plot")), names, 3)  # data loss, max|c|, test MSE
    max_c = {name: row[1] for name, row in rows.items()}
    # The claims of the text: the full normal step drives c to round-off level, orders of magnitude below the
    # soft penalty; normal_lr=None (γ = lr) shrinks it only geometrically, so it is still far from zero.
    assert max_c["SQP-Adam, normal_lr=1.0"] < 1e-3
    assert max_c["SQP-Adam, normal_lr=1.0"] < 1e-2 * max_c["Adam + penalty (w = 1)"]
    assert max_c["SQP-Adam, normal_lr=None"] > 100 * max_c["SQP-Adam, normal_lr=1.0"]
    assert _images(_cell(nb, "plot")) == 1
    diag = _cell(nb, "diag").outputs[0]["data"]["text/plain"]
    assert "'c_inf'" in diag and "'rank': 6" in diag  # six independent constraints
    assert "identical to the uninterrupted run after" in _text(_cell(nb, "resume"))
    assert _text(_cell(nb, "resume")).rstrip().endswith("True")
    sched = re.search(r"normal_lr=1\.0: final lr .* max\|c\| " + NUMBER, _text(_cell(nb, "sched")))
    assert sched and float(sched.group(1)) < 1e-3


def _check_pinn_suite(nb: nbformat.NotebookNode, tmp_path: Path) -> None:
    setup = _text(_cell(nb, "setup"))
    assert f"writing under {tmp_path}" in setup  # results under the temporary folder, not the repository
    methods = ["sqp-adam", "sqp-adam:normal_lr=1", "adam-unc", "adam-con"]
    rows = _table(_text(_cell(nb, "sweep")), methods, 5)  # objective, test MSE, max|c| at 0, max|c|, ms/it
    c0, c_end = rows["sqp-adam:normal_lr=1"][2], rows["sqp-adam:normal_lr=1"][3]
    assert c_end < 1e-3 * c0  # the full normal step (see test_runner for the same oracle)
    assert _images(_cell(nb, "plots")) == 5  # overview, objective, violation, final metrics, prediction
    assert "finished runs found by load_results: 4" in _text(_cell(nb, "files"))
    assert _images(_cell(nb, "curves")) == 1
    resume = _text(_cell(nb, "resume"))
    assert "{'status': 'interrupted'" in resume and "identical to the uninterrupted one: True" in resume
    cli = _text(_cell(nb, "cli"))
    assert "runs trained by this call: 0" in cli  # the CLI loaded the API's finished runs ...
    for method in ("sqp-adam", "adam-unc", "adam-con"):  # ... and reports the same numbers
        row = re.search(rf"^{method}\s+{NUMBER}\s+full\s+0\s+{NUMBER}\s+{NUMBER}\s+{NUMBER}\s+{NUMBER}$", cli, re.M)
        assert row, f"no row {method!r} in:\n{cli}"
        objective, test_mse, max_c = (float(x) for x in row.groups()[1:4])
        assert objective == pytest.approx(rows[method][0], rel=1e-3)  # printed to 4 and 5 digits
        assert test_mse == pytest.approx(rows[method][1], rel=1e-2)
        assert max_c == pytest.approx(rows[method][3], rel=1e-2)
    assert not list(tmp_path.glob("sqpoptim-suite-*"))  # the last cell removed its folder


def _check_layers(nb: nbformat.NotebookNode, tmp_path: Path) -> None:
    names = ["Adam", "Adam + ENFORCE layer", "ProjectedAdamSQP (h = 0 at 5 points)"]
    # test MSE, max|h| in [1, 2], max|h| outside, max|h| at the points x_k, ms per forward pass of the test set
    rows = _table(_text(_cell(nb, "compare")), names, 5)
    plain, layer, sqp = (rows[n] for n in names)
    assert min(plain[1:4]) > 0.1  # the noisy labels: the plain fit is infeasible everywhere
    assert max(layer[1:4]) <= 1e-6  # the layer: every input, in and beyond the training range (eval tolerance)
    assert sqp[3] < 1e-8 < 1e-2 * sqp[1]  # the optimizer: round-off at the chosen points only
    assert "converged: True" in _text(_cell(nb, "layer"))
    assert _images(_cell(nb, "compare")) == 1


CHECKS = {"01_quickstart": _check_quickstart, "02_pinn_suite": _check_pinn_suite, "03_layers": _check_layers}


# Executing a notebook starts a kernel and trains (7-20 s of CPU each): marked slow. The default suite keeps the
# checks that need no kernel (no outputs committed, ruff reads them).
LONG_NOTEBOOKS = {"01_quickstart", "02_pinn_suite", "03_layers"}


@pytest.mark.parametrize(
    "path",
    [pytest.param(p, marks=[pytest.mark.slow] if p.stem in LONG_NOTEBOOKS else []) for p in NOTEBOOKS],
    ids=[p.stem for p in NOTEBOOKS],
)
def test_notebook_executes_at_the_ci_budget(path, tmp_path, monkeypatch):
    assert path.stem in CHECKS, f"{path.name}: add a check of its outputs to CHECKS"
    before = sorted(p.name for p in ROOT.iterdir())
    nb = _execute(path, tmp_path, monkeypatch)
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
    CHECKS[path.stem](nb, tmp_path)
    assert sorted(p.name for p in ROOT.iterdir()) == before  # nothing written into the repository


def test_both_notebooks_exist():
    assert [p.stem for p in NOTEBOOKS] == sorted(CHECKS)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_committed_notebook_has_no_outputs(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    assert nb.metadata.kernelspec.name == "python3"
    hint = f"{path.name} carries outputs; clear them (see the docstring of {Path(__file__).name})"
    for cell in nb.cells:
        assert "execution" not in cell.metadata, hint
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, hint
    assert path.stat().st_size < 20_000, f"{path.name} is {path.stat().st_size} bytes: keep notebooks small"


def test_ruff_reads_the_notebooks():
    # `ruff check .` skips notebooks/ (pyproject: extend-exclude); named explicitly they are linted and
    # format-checked with the project's rules, magics included.
    for command in (["check"], ["format", "--check"]):
        out = subprocess.run(
            [sys.executable, "-m", "ruff", *command, *map(str, NOTEBOOKS)], cwd=ROOT, capture_output=True, text=True
        )
        assert out.returncode == 0, out.stdout + out.stderr
