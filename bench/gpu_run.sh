#!/usr/bin/env bash
# The whole GPU run in one command, on the GPU machine: linattn's GPU tests (tests/cuda.rs
# with its named checks, and the agreement suite's GPU cases), its timings
# (examples/cuda_bench.rs), the command line's --device cuda
# paths (gpu_cli_check.sh), with LINATTN_NCU=1 an ncu profile of the causal kernels, then
# the peers (PyTorch SDPA, flash-linear-attention) through ../shared/anchors/gpu_anchors.py,
# in the same command on the same device, and last a table of ratios (bench/ratios.py).
# Plan about 8 minutes with one peer shape.
#
# The GPU machine has no Rust toolchain and no network. Prepare DIR here:
#   cargo build --release --example cuda_bench -p linattn --features cuda
#   cargo build --release -p linattn-cli       # for bench/gpu_cli_check.sh DIR
#   cargo test --release --no-run -p linattn --features cuda --test cuda --test agreement
#   mkdir -p DIR && cp target/release/examples/cuda_bench target/release/linattn \
#       ../shared/anchors/gpu_anchors.py DIR   # and the test binaries as DIR/cuda_tests
#                                              # and DIR/agreement_tests
#   pip download --no-deps --only-binary=:all: --python-version 3.12 -d DIR/whl \
#       flash-linear-attention==0.6.0 fla-core==0.6.0 einops
# then run `bench/gpu_run.sh DIR [--quick]` there (DIR defaults to .gpu, git-ignored).
# LINATTN_ANCHOR_SHAPES="(4, 8192, 16, 128)" limits the peers to those [B, T, H, D] shapes
# (all of them, 128k exact attention included, take about seven minutes).
set -uo pipefail
dir=${1:-.gpu}
shift || true
log=${OUT:-/tmp}
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu --format=csv
# Each step is bounded so that one that hangs leaves the others their time.
for tests in cuda_tests agreement_tests; do
    if [ -x "$dir/$tests" ]; then
        timeout 200 "$dir/$tests" 2>&1 | tee "$log/$tests.txt" | grep -E "FAILED|panicked|^test result" | tail -30
    fi
done
timeout 240 "$dir/cuda_bench" "$@" 2>&1 | tee "$log/linattn.txt"
if [ -x "$dir/linattn" ]; then
    timeout 120 "$(dirname "$0")/gpu_cli_check.sh" "$dir" 2>&1 | tee "$log/cli.txt" | tail -30
fi
if [ -n "${LINATTN_NCU:-}" ] && command -v ncu > /dev/null; then
    # The main causal shape's kernels, as bench/notes/gpu_linear.md asks for.
    timeout 120 ncu --kernel-name regex:'linear_(causal|state)_mma' --launch-count 2 \
        --section SpeedOfLight --section ComputeWorkloadAnalysis --section WarpStateStats \
        --section Occupancy "$dir/cuda_bench" --profile > "$log/ncu.txt" 2>&1
    grep -E 'linear_|Throughput|Issue Slots|Stall|Occupancy|Registers' "$log/ncu.txt" | head -60
fi
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "$dir"/whl/*.whl
anchors=/tmp/gpu_anchors.py
cp "$dir/gpu_anchors.py" "$anchors"
if [ -n "${LINATTN_ANCHOR_SHAPES:-}" ]; then
    sed -i "s/^shapes = .*/shapes = [${LINATTN_ANCHOR_SHAPES}]/" "$anchors"
fi
PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 timeout 300 python3 "$anchors" 2>&1 | tee "$log/peers.txt"
echo "--- linattn"
grep -E "^(device|ceiling|bench)" "$log/linattn.txt"
echo "--- peers"
grep -E "^(device|ceiling|bench)" "$log/peers.txt" | grep -E "ceiling|B=4,T=8192|B=32|131072|linear" || true
echo "--- ratios (peer ms / linattn ms, same run)"
python3 "$(dirname "$0")/ratios.py" "$log/linattn.txt" "$log/peers.txt"
