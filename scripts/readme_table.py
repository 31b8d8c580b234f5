"""Re-run README's main job in a fresh results folder and print README's table, with the time the run took.

    python scripts/readme_table.py                 # prints the Markdown table and the timing line
    python scripts/readme_table.py --figure        # also copies the overview figure to docs/images/

The command is README's, word for word, plus ``--results <temporary folder>`` (so finished runs in ./results are
not reused). The timing line gives the wall time of the whole command (start-up, data, training, plots) and
the CPU time of its process, the machine's core count, torch's version and the date.
"""

from __future__ import annotations

import argparse
import datetime
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

COMMAND = ["-m", "problems", "run", "spring", "--quick", "--methods", "sqp-adam,adam-unc,adam-con"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--figure", action="store_true", help="copy the overview figure to docs/images/")
    args = parser.parse_args()
    import torch

    from problems.runner import load_results

    with tempfile.TemporaryDirectory() as tmp:
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        subprocess.run([sys.executable, *COMMAND, "--results", tmp, "--quiet"], check=True, cwd=ROOT)
        wall = time.perf_counter() - start
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        runs = sorted(load_results(tmp, "spring"), key=lambda r: COMMAND[-1].split(",").index(r["config"]["method"]))
        print("| method | objective | test MSE | max \\|c\\| | ms/iteration |")
        print("|---|---:|---:|---:|---:|")
        for r in runs:
            f = r["final"]
            print(
                f"| {r['config']['method_label']} | {f['objective']:.1e} | {f['test_mse']:.1e} | "
                f"{f['max_abs_c']:.1e} | {r['timing']['ms_per_iteration']:.1f} |"
            )
        print(
            f"\n`python {' '.join(COMMAND)}`: {wall:.0f} s wall, {cpu:.0f} s CPU on {os.cpu_count()} cores, "
            f"torch {torch.__version__}, {datetime.date.today().isoformat()}"
        )
        if args.figure:
            target = ROOT / "docs" / "images" / "quick_spring.png"
            shutil.copy(Path(tmp) / "spring" / "figures" / "overview.png", target)
            print(f"figure: {target.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
