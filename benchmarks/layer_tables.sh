#!/usr/bin/env bash
# The layer papers' headline tables with the fast layers (implicit gradients, globalised iterations):
# KKT-Hardnet on ENFORCE's C1 (where the unrolled paper iteration diverged to NaN), HardNet++ Table I (learned
# MPC), ENFORCE Table 3 (C3) and KKT-Hardnet Table 6 (pooling). Five seeds: seed k initialises the network
# with k and draws the mini-batches from k (`--model-seed k --seeds k`). Sequential and resumable (the runner
# keeps finished runs and resumes interrupted ones); results under results/layer_tables. On a shared machine:
#   nohup nice -n 10 bash benchmarks/layer_tables.sh > results/layer_tables.log 2>&1 &
set -euo pipefail
R=${RESULTS:-results/layer_tables}
COMMON="--threads 1 --results $R --no-plot --quiet"
seeds() {  # seeds <problem> <size> <iterations> <methods> <batch> <eval-every>
  for k in 0 1 2 3 4; do
    python -m problems run "$1" --size "$2" --iterations "$3" --methods "$4" --batch "$5" --eval-every "$6" \
      --seeds $k --model-seed $k $COMMON
  done
}
# Evaluations (the layer projects every test input) every 5-10 % of the budget: on the shared CPU they would
# otherwise cost more than the training.
# KKT-Hardnet on C1 (ENFORCE's function fitting, full batch, 1,000 epochs = 2 % of the paper's; the paper
# iteration's unrolled gradient went NaN at epoch 116): no NaN.
seeds enforce_fitting small 1000 kkt-hardnet full 100
# HardNet++ Table I: the paper's data (800/100/100 initial states), batch 16, 5,000 iterations (the paper states
# no budget); the layer's defaults (Levenberg-Marquardt to 1e-6, implicit gradient), beside the MLP and the
# soft penalty.
seeds mpc paper 5000 hardnet-pp,adam-unc,soft mini 250
# ENFORCE Table 3 (C3: 200 variables, 150 quadratic equalities): the paper's program at size small (2,000
# training / 100 test instances), batch 200, 1,000 iterations (2.4 % of the paper's 42,000: one ENFORCE step from
# an untrained backbone costs 3.5 s on this CPU, BENCHMARKS.md 3c), beside the MLP and the soft penalty.
seeds nonconvex_quadratic small 1000 enforce,adam-unc,soft mini 100
# KKT-Hardnet Table 6: the paper's budget (1,200 epochs of mini-batches of 64 = 30,000 iterations) and warm
# start (eta = 75), beside the MLP and the PINN (omega = 1).
seeds pooling paper 30000 kkt-hardnet:eta=75,adam-unc,soft mini 1500
