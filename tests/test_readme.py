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
    text = README.read_text()
    assert "python -m pytest\n" in text
    ci = (README.parent / ".ci" / "run").read_text()
    assert "\npython -m pytest\n" in ci
    assert "python -m problems run spring --quick --methods sqp-adam,adam-unc,adam-con" in text
