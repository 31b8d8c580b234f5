#!/usr/bin/env bash
# The PINN claims of RESULTS.md re-measured with the default globalised normal step (normal_damping = 1e-6; the
# section "Defaults for a first problem"). Plain method names are the new default; ":normal_damping=None" is the
# paper's step the earlier sections used. Results under results/defaults. Resumable: finished runs are loaded.
#  1. the --quick run of each PINN problem for the paper's four methods (Adam(unc) has no normal step: unchanged);
#  2. the full-batch runs of RESULTS section 2 (A1-A4) for the three constrained methods at both learning rates.
set -euo pipefail
R=${RESULTS:-results/defaults}
CON="sqp-adam,sqp-hb,adam-con"
for p in spring chemistry burgers darcy; do
  python -m problems run $p --quick --methods "$CON,adam-unc" --threads 1 --results "$R/quick" --no-plot --quiet
done
COMMON="--threads 1 --results $R --no-plot --quiet --seeds 0 --batch full"
python -m problems run spring --size paper --iterations 3000 --methods "$CON" $COMMON
python -m problems run darcy --size small --iterations 300 --methods "$CON" $COMMON
python -m problems run burgers --size small --iterations 1000 --methods "$CON" $COMMON
python -m problems run chemistry --size small --iterations 2000 --methods "$CON" $COMMON
