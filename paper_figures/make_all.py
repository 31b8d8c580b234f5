"""Regenerate every figure in ``paper_figures/`` from the committed exports in ``paper_figures/data/``.

    python paper_figures/make_all.py            # writes the PNGs next to this file
    python paper_figures/make_all.py --out DIR  # somewhere else (the test suite uses a temporary folder)

Each ``fig_*.py`` script is one figure family with a ``main(out: Path) -> list[Path]``; figures whose data
have not been exported yet are skipped with a message (never silently).
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def scripts() -> list[Path]:
    return sorted(HERE.glob("fig_*.py"))


def run_all(out: Path) -> list[Path]:
    sys.path.insert(0, str(HERE))
    written: list[Path] = []
    for script in scripts():
        spec = importlib.util.spec_from_file_location(script.stem, script)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        try:
            written += module.main(out)
        except FileNotFoundError as err:
            print(f"{script.name}: skipped ({err})")
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(HERE))
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for path in run_all(out):
        print(path)


if __name__ == "__main__":
    main()
