#!/usr/bin/env bash
# Penalty vs Lagrangian vs SQP on the manifold toy (PROBLEMS.md B; RESULTS.md section 3), then the compact
# export that paper_figures/fig_toy.py reads. About 3 minutes on one core.
set -euo pipefail
R=${RESULTS:-results/toy}
COMMON="--size paper --iterations 2000 --batch full --threads 1 --results $R --no-plot --quiet"
python -m problems run manifold_toy --lr 1e-3 $COMMON --methods \
  "sqp-adam,adam-con,adam-unc,penalty:rho=1,penalty:rho=100,penalty:rho=10000,penalty:rho=1000000,primal-dual,primal-dual:dual_lr=0.001,primal-dual:dual_lr=0.1"
python -m problems run manifold_toy --lr 5e-2 $COMMON --methods "primal-dual:inner=SGD:dual_lr=0.05,primal-dual:inner=SGD:dual_lr=0.5"
(cd paper_figures && python -c "from _data import export; print(export('../$R', 'manifold_toy', 'toy'))")
