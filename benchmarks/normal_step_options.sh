#!/usr/bin/env bash
# The normal-step options of benchmarks/normal_step_options.py on the PINN problems (RESULTS.md, "Defaults for a
# first problem"): the --quick run of each problem, Darcy at 300 iterations and spring at 1,500 with three model
# seeds (the budgets of RESULTS.md section 5). Results under results/normal_step_options/<option>; resumable.
#   bash benchmarks/normal_step_options.sh OPTION [METHODS]   OPTION: paper | lm<nu0> | cap:<K> | tr:<K>
set -euo pipefail
O=$1
M=${2:-sqp-adam}
R=${RESULTS:-results/normal_step_options}/$O
case $O in
  paper) S=":normal_damping=None" ;;
  lm*) S=":normal_damping=${O#lm}" ;;
  *) S="" ;;  # a prototype: normal_damping=None underneath
esac
MS=$(echo "$M" | sed "s/\([^,]*\)/\1$S/g")
run() { PYTHONPATH=. python benchmarks/normal_step_options.py run "$O" run "$@" --threads 1 --no-plot --quiet; }
for p in spring chemistry burgers darcy; do
  run $p --quick --methods "$MS" --results "$R"
done
run darcy --size small --iterations 300 --lr 5e-3 --batch full --seeds 0 --methods "sqp-adam$S" --results "$R/darcy300"
for ms in 0 1 2; do
  run spring --size small --iterations 1500 --lr 5e-4 --batch full --seeds 0 --model-seed $ms --methods "sqp-adam$S" \
    --results "$R/spring_m$ms"
done
