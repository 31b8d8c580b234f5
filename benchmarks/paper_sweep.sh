#!/usr/bin/env bash
# The SQP paper's comparison on the four PINN problems at the budgets this project's CPU machine affords
# (2 shared cores, no GPU; the paper's full budgets need a GPU: see RESULTS.md for the budgets and why).
# Methods: the paper's four at this package's defaults (normal_lr = 1), SQP-Adam with the authors' normal step
# (normal_lr = None: scaled by the learning rate), plain stochastic SQP, the penalty method and primal-dual.
# Both of the paper's learning rates; full batch and mini-batch (seeds 0-2). Results under results/paper.
set -euo pipefail
R=${RESULTS:-results/paper}
M="sqp-adam,sqp-hb,adam-unc,adam-con,sqp-adam:normal_lr=None,sqp,penalty,primal-dual"
COMMON="--threads 1 --results $R --no-plot --quiet --batch full,mini --seeds 0-2"
python -m problems run spring --size paper --iterations 3000 --methods "$M" $COMMON
python -m problems run darcy --size small --iterations 300 --methods "$M" $COMMON
python -m problems run burgers --size small --iterations 1000 --methods "$M" $COMMON
python -m problems run chemistry --size small --iterations 2000 --methods "$M" $COMMON
