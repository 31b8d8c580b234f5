"""Every committed figure regenerates from the committed exports with one command."""

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # ~10 s of CPU: every figure of paper_figures/
def test_make_all_regenerates_every_figure(tmp_path):
    sys.path.insert(0, str(ROOT / "paper_figures"))
    try:
        import make_all
    finally:
        sys.path.remove(str(ROOT / "paper_figures"))
    written = make_all.run_all(tmp_path)
    committed = sorted(p.name for p in (ROOT / "paper_figures").glob("*.png"))
    assert sorted(p.name for p in written) == committed
    assert all(p.stat().st_size > 5000 for p in written)
