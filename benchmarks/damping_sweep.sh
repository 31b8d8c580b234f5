#!/usr/bin/env bash
# The globalised normal step (normal_damping = nu0; RESULTS.md section 5): SQP-Adam(con) with nu0 in {1e-6, 0.1, 1}
# on the tasks where the undamped Gauss-Newton step fails (C1, E2, E4) or works (E1, spring with three model
# seeds, Darcy, the quick budgets of chemistry and Burgers), against the undamped step. CPU budgets as in
# layer_sweep.sh / paper_sweep.sh. Results under results/damping_base (undamped) and results/damping_nu<nu0>.
# One nu0 per invocation if given (bash benchmarks/damping_sweep.sh 0.1), else all three in turn.
set -euo pipefail
run_set() {  # $1: results folder, $2: method spec
  local R=$1 M=$2
  local C="--threads 1 --results $R --no-plot --quiet --seeds 0 --batch full"
  python -m problems run enforce_fitting --size small --iterations 5000 --methods "$M" $C
  for p in kkt_e1 kkt_e2 pooling; do
    python -m problems run $p --size paper --iterations 1200 --methods "$M" $C
  done
  python -m problems run darcy --size small --iterations 300 --lr 5e-3 --methods "$M" $C
  for p in chemistry burgers; do
    python -m problems run $p --quick --methods "$M" --threads 1 --results "$R" --no-plot --quiet
  done
  for ms in 0 1 2; do
    python -m problems run spring --size small --iterations 1500 --lr 5e-4 --methods "$M" --model-seed $ms \
      --batch full --seeds 0 --threads 1 --results "$R/spring_m$ms" --no-plot --quiet
  done
}
if [ $# -eq 0 ]; then
  run_set results/damping_base sqp-adam
  for NU in 1e-6 0.1 1; do run_set "results/damping_nu$NU" "sqp-adam:normal_damping=$NU"; done
elif [ "$1" = base ]; then
  run_set results/damping_base sqp-adam
else
  run_set "results/damping_nu$1" "sqp-adam:normal_damping=$1"
fi
