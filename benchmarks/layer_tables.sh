#!/usr/bin/env bash
# The layer papers' headline tables with the fast layers (implicit gradients, globalised iterations):
# HardNet++ Table I (learned MPC), ENFORCE Table 3 (C3), KKT-Hardnet Table 6 (pooling). Five seeds: seed k
# initialises the network with k and draws the mini-batches from k (`--model-seed k --seeds k`). Sequential,
# resumable (the runner keeps finished runs and resumes interrupted ones); results under results/layer_tables.
# Run it in the background on a shared machine:  nohup nice -n 10 bash benchmarks/layer_tables.sh &
set -euo pipefail
R=${RESULTS:-results/layer_tables}
COMMON="--threads 1 --results $R --no-plot --quiet"
seeds() {  # seeds <problem> <size> <iterations> <methods> [batch]
  for k in 0 1 2 3 4; do
    python -m problems run "$1" --size "$2" --iterations "$3" --methods "$4" --batch "${5:-mini}" \
      --seeds $k --model-seed $k $COMMON
  done
}
# HardNet++ Table I: the paper's data (800/100/100 states), batch 16, 5,000 iterations (the paper states no
# budget); the layer's default (Levenberg-Marquardt to 1e-6, implicit gradient), beside the MLP and the soft
# penalty.
seeds mpc paper 5000 hardnet-pp,adam-unc,soft
