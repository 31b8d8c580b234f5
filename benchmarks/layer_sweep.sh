#!/usr/bin/env bash
# The layer papers' tasks (ENFORCE C1-C3, HardNet++ D, KKT-Hardnet E1-E4) at the budgets this project's CPU
# machine affords (2 shared cores, no GPU). Results under results/layers; RESULTS.md has the tables.
# One seed, full batch where the paper trains full batch, mini-batch (200) on C2/C3 and D.
# Measured per-step costs on one core (ms): C1 small: adam-unc 2, enforce 6, kkt-hardnet 41, sqp-adam 9,
# hardnet-pp 1400; C2 small (batch 200): adam-unc 9, enforce 370, hardnet 356, kkt-hardnet 12900,
# sqp-adam 1870; D small: adam-unc 4, hardnet-pp 16300; E1 small: hardnet-pp 2200, kkt-hardnet 3800.
# The layers whose steps cost seconds on a CPU (HardNet++'s 500 unrolled iterations, KKT-Hardnet's Newton
# solves) are left out of the first part; the second part runs KKT-Hardnet on pooling at a short budget.
set -euo pipefail
R=${RESULTS:-results/layers}
COMMON="--threads 1 --results $R --no-plot --quiet --seeds 0"
# sqp-adam:normal_damping=0.1 is the globalised normal step (Levenberg-Marquardt with step rejection);
# RESULTS.md section 5 compares it with the undamped step and other nu0
# (benchmarks/damping_sweep.sh).
DAMPED="sqp-adam:normal_damping=0.1"
python -m problems run enforce_fitting --size small --iterations 5000 --methods adam-unc,soft,enforce,kkt-hardnet,sqp-adam,$DAMPED --batch full $COMMON
for p in kkt_e1 kkt_e2 pooling; do
  python -m problems run $p --size paper --iterations 1200 --methods adam-unc,soft,sqp-adam,$DAMPED --batch full $COMMON
done
python -m problems run kkt_e3 --size paper --iterations 1200 --methods adam-unc,soft --batch full $COMMON
python -m problems run mpc --size small --iterations 1000 --methods adam-unc,soft,sqp-adam --batch mini $COMMON
python -m problems run nonconvex_linear --size small --iterations 1000 --methods adam-unc,soft,enforce,hardnet --batch mini $COMMON
# C3's ENFORCE step costs about 2 s on one core (150 quadratic rows per instance, 200 instances per batch):
# 1,000 iterations did not fit the session; the short runs below are what RESULTS.md reports.
R2=${RESULTS_SHORT:-results/layers_short}
SHORT="--threads 1 --results $R2 --no-plot --quiet --seeds 0"
python -m problems run nonconvex_quadratic --size small --iterations 200 --methods adam-unc,soft,enforce --batch mini $SHORT
# The expensive layers at a shortened budget: KKT-Hardnet on pooling with the paper's warm start (1 s per step).
# (HardNet++: 1.4-16 s per step on these tasks; not run.)
python -m problems run pooling --size small --iterations 300 --methods adam-unc,kkt-hardnet:eta=75 --batch full $SHORT
