"""The README's swap-in example runs as written and does what it says (constraints driven to zero)."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_example_runs_and_enforces_the_constraints(capsys):
    text = README.read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert len(blocks) == 1
    namespace: dict = {}
    exec(compile(blocks[0], str(README), "exec"), namespace)
    c = namespace["c"]
    assert c.shape == (3,) and c.abs().max().item() < 1e-3
    assert "max |c|" in capsys.readouterr().out


def test_readme_commands_are_the_ones_ci_runs():
    """README's two set-up commands are make targets; CI runs the test one word for word, and the demo target
    runs the main job README quotes."""
    text = README.read_text()
    assert "```bash\nmake test\n```" in text and "```bash\nmake demo\n```" in text
    ci = (README.parent / ".ci" / "run").read_text()
    assert "\nmake test\n" in ci
    main_job = "python -m problems run spring --quick --methods sqp-adam,adam-unc,adam-con"
    assert main_job in text
    makefile = (README.parent / "Makefile").read_text()
    recipes = {}
    for block in re.findall(r"^([a-z-]+): .*\n((?:\t.*\n)+)", makefile, flags=re.M):
        recipes[block[0]] = [line.strip() for line in block[1].splitlines()]
    assert recipes["demo"] == ["$(BIN)/" + main_job]
    assert recipes["test"] == ["$(BIN)/python -m ruff check .", "$(BIN)/python -m pytest"]


def test_readme_method_table_is_the_registry():
    from problems.methods import method_table

    assert method_table() in README.read_text()


def test_every_path_in_the_readme_map_exists():
    """The "Where things live" table names files and folders that exist (first cell of each row, the later names
    in a cell relative to the first one's folder)."""
    text = README.read_text().split("### Where things live", 1)[1].split("\n\n", 2)[1]
    root = README.parent
    rows = [line for line in text.splitlines() if line.startswith("| `")]
    assert len(rows) >= 8
    for row in rows:
        names = re.findall(r"`([^`]+)`", row.split("|")[1])
        folder = (root / names[0]).parent
        assert list(root.glob(names[0])), names[0]
        for name in names[1:]:
            assert list(folder.glob(name)), (row, name)
