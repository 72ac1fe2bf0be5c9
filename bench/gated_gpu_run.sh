#!/usr/bin/env bash
# One device run of the gated family on a GPU (issue 16), from the repository root of the
# device machine, with results under $OUT:
#   bench/gated_gpu_run.sh [TEST_FILTER [BENCH_FILTER]]
# `.gpu/` (git-ignored, carried) holds the stripped `tests/cuda.rs` binary as cuda_tests,
# the `cuda_bench` example and a copy of `../shared/anchors/gpu_gated_anchors.py`; with
# PEERS=SECONDS, `.whl/` (carried) holds the flash-linear-attention and fla-core wheels
# and the peers' script runs under that limit; with NCU=REGEX, Nsight Compute profiles two
# launches of the matching kernels at B4 T8192 H16 D128.
export LINATTN_CACHE_DIR=/tmp/ptx PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader | tee "$OUT/device.txt"
.gpu/cuda_tests "${1:-gated}" > "$OUT/tests.txt" 2>&1
grep -E "^test |test result|panicked|assert" "$OUT/tests.txt" | head -30
.gpu/cuda_bench --gated ${2:+--only "$2"} 2>&1 | tee "$OUT/bench.txt"
if [ -n "$NCU" ]; then
  ncu --kernel-name regex:"$NCU" --launch-skip 6 --launch-count 2 --section SpeedOfLight \
    --section WarpStateStats --section LaunchStats --section Occupancy .gpu/cuda_bench --gated \
    --only "gated-delta-rule forward,bf16,B=4 T=8192 H=16 HV=16 D=128" > "$OUT/ncu.txt" 2>&1
  grep -E "gated_|Duration|Registers Per|Achieved Occupancy|Warp Cycles Per Issued|Theoretical Occ" "$OUT/ncu.txt"
fi
if [ -n "$PEERS" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl &&
    export PYTHONPATH=/tmp/site
  timeout "$PEERS" python3 .gpu/gpu_gated_anchors.py 2>&1 | tee "$OUT/peers.txt" |
    grep -E "^bench|^ceiling|^device|rror" | head -40
fi
