#!/usr/bin/env bash
# The layer papers' headline tables with the fast layers (implicit gradients, globalised iterations), at the
# budgets RESULTS.md reports (2 shared CPU cores; about 70 minutes of runs for seeds 0-2, 20 more for seeds 3-4 two
# at a time, and about 90 for pooling): KKT-Hardnet on ENFORCE's C1 (where the unrolled paper iteration diverged
# to NaN), HardNet++ Table I (learned MPC), ENFORCE Table 3 (C3) and KKT-Hardnet Table 6 (pooling).
# Seed k initialises the network with k and draws the mini-batches from k (`--model-seed k --seeds k`).
# Sequential and resumable (the runner keeps finished runs and resumes interrupted ones); results under
# results/layer_tables, tables by `python benchmarks/layer_tables.py results/layer_tables mpc nonconvex_quadratic
# enforce_fitting pooling` (and `results/layer_tables_pooling_mini pooling`). On a shared machine:
#   nohup nice -n 5 bash benchmarks/layer_tables.sh > results/layer_tables.log 2>&1 &
set -euo pipefail
R=${RESULTS:-results/layer_tables}
run() {  # run <seeds> <problem> <size> <iterations> <methods> <batch> <eval-every>  (results under $R)
  for k in $1; do
    python -m problems run "$2" --size "$3" --iterations "$4" --methods "$5" --batch "$6" --eval-every "$7" \
      --seeds $k --model-seed $k --threads 1 --results "$R" --no-plot --quiet
  done
}
# Evaluations (the layer projects every test input) every 10-50 % of the budget: on the shared CPU they would
# otherwise cost more than the training.
# HardNet++ Table I: the paper's data (800/100/100 initial states), batch 16, 1,000 iterations = 20 epochs (the
# paper states no budget; one step costs 0.25 s wall here under load), the layer's defaults (Levenberg-Marquardt
# to 1e-6, implicit gradient; the paper unrolls 500 damped iterations), beside the MLP and the soft penalty.
# Five seeds (the paper reports one model).
run "0 1 2 3 4" mpc paper 1000 hardnet-pp,adam-unc,soft mini 250
# The same HardNet++ row with the layer's iteration as a continuous function of the raw output (free_steps=0: the
# free steps' best-point pick makes the default's output jump) and the gradient unrolled through it (the exact
# derivative; the implicit one, the tangent projector at the output, holds only where the raw output is on the
# constraint set, and the backbone's raw output here is ~30 away from it): ~0.35 s CPU per step.
run "0 1 2 3 4" mpc paper 1000 hardnet-pp:gradient=unrolled:free_steps=0 mini 250
# ENFORCE Table 3 (C3: 200 variables, 150 quadratic equalities): the paper's program at size small (2,000
# training / 100 test instances), batch 200, 100 iterations (0.24 % of the paper's 1,000 epochs of 8,334
# instances = 42,000 iterations: one ENFORCE step from an untrained backbone costs 3.5 s on this CPU,
# BENCHMARKS.md 3c), beside the MLP and the soft penalty. Five seeds (the paper: five).
run "0 1 2 3 4" nonconvex_quadratic small 100 enforce,adam-unc,soft mini 50
# KKT-Hardnet on C1 (ENFORCE's function fitting, full batch; the paper iteration's unrolled gradient went NaN at
# epoch 116): no NaN. Seeds 0-2 at 1,000 epochs (2 % of the paper's 50,000); all five seeds at 200 epochs, past
# epoch 116, in a folder of their own (one epoch costs 0.1-0.35 s here, growing as the network trains).
run "0 1 2" enforce_fitting small 1000 kkt-hardnet full 100
R=${RESULTS_C1_SHORT:-results/layer_tables_c1_200} run "0 1 2 3 4" enforce_fitting small 200 kkt-hardnet full 100
# KKT-Hardnet Table 6 (E4 pooling): the paper's data and network with the paper's warm start, beside the MLP and
# the soft penalty; 1,200 full-batch epochs (4 % of the paper's iterations, ~3 min per KKT-Hardnet run) and the
# paper's own budget, 1,200 epochs of mini-batches of 64 (30,000 iterations, ~15-20 min per KKT-Hardnet run).
run "0 1 2 3 4" pooling paper 1200 kkt-hardnet:eta=75,adam-unc,soft full 300
R=${RESULTS_POOLING_MINI:-results/layer_tables_pooling_mini} run "0 1 2 3 4" pooling paper 30000 kkt-hardnet:eta=75,adam-unc,soft mini 7500
