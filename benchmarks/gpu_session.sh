#!/usr/bin/env bash
# Everything the GPU performance issue needs from one lease of a CUDA machine (sized to about 11 minutes of a lease, which is 15 minutes in all with the machine's start):
# the CUDA tests (parity with the CPU, no host synchronisation inside step(), deferred non-finite reporting), the
# per-problem iteration ratios to Adam(unc) with peak memory, the m x n scaling sweep, and the output layers'
# projection benchmark at batch 4096. Logs go to $OUT (or ./gpu_logs); paste the tables into BENCHMARKS.md.
#   bash benchmarks/gpu_session.sh            # on the GPU machine, from the repository root
set -uo pipefail
OUT=${OUT:-gpu_logs}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$(pwd)
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/device.txt"
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$OUT/device.txt"
timeout 200 python3 -m pytest -q -m "cuda" tests 2>&1 | tee "$OUT/cuda_tests.log" | tail -5
timeout 150 python3 benchmarks/problem_step_time.py --device cuda --problems spring,chemistry,burgers,darcy \
    --methods sqp-adam,sqp-hb,adam-con,adam-unc --rounds 3 --min-time 0.5 2>&1 | tee "$OUT/problem_step_time.md" | tail -40
timeout 150 python3 benchmarks/step_time.py --device cuda --params 1e5,1e6,1e7 --constraints 10,100,1000 \
    --optimizers sqp-adam,adam-unc --batch 4096 --rounds 3 --min-time 0.3 2>&1 | tee "$OUT/scaling.md" | tail -20
timeout 100 python3 benchmarks/layer_projection.py --device cuda --batch 256 1024 4096 2>&1 | tee "$OUT/layers.md" | tail -20
