#!/usr/bin/env bash
# The [design] comparison of ProjectedAdamSQP (projection x bias correction x normal step size) on the problem
# suite at CPU-affordable budgets; results under results/design (see RESULTS.md for the outcome).
set -euo pipefail
R=${RESULTS:-results/design}
V=""
for proj in euclidean scaled; do
  for bc in defossez standard; do
    for g in None 1; do
      V="$V,sqp-adam:projection=$proj:bias_correction=$bc:normal_lr=$g"
    done
  done
done
V=${V#,}
COMMON="--threads 1 --results $R --no-plot --quiet --batch full,mini --seeds 0-1"
python -m problems run spring --size small --iterations 1500 --methods "$V" $COMMON
python -m problems run manifold_toy --size small --iterations 2000 --methods "$V" $COMMON
python -m problems run darcy --size small --iterations 300 --methods "$V" $COMMON
python -m problems run burgers --size small --iterations 1000 --methods "$V" $COMMON
