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
