#!/usr/bin/env bash
# The whole GPU run in one command, on the GPU machine: linattn's correctness checks and
# benchmarks (examples/cuda_check.rs), then the peers (PyTorch SDPA, flash-linear-attention)
# through ../shared/anchors/gpu_anchors.py, in the same session on the same device.
#
# The GPU machine has no Rust toolchain and no network. Prepare DIR here:
#   cargo build --release --example cuda_check -p linattn --features cuda
#   cargo build --release -p linattn-cli       # for bench/gpu_cli_check.sh DIR
#   cargo test --release --no-run -p linattn --features cuda --test cuda   # tests/cuda.rs
#   mkdir -p DIR && cp target/release/examples/cuda_check target/release/linattn \
#       ../shared/anchors/gpu_anchors.py DIR   # and the test binary as DIR/cuda_tests
#   pip download --no-deps --only-binary=:all: --python-version 3.12 -d DIR/whl \
#       flash-linear-attention==0.6.0 fla-core==0.6.0 einops
# then run `bench/gpu_run.sh DIR [--quick]` there (DIR defaults to .gpu, git-ignored).
# LINATTN_ANCHOR_SHAPES="(4, 8192, 16, 128)" limits the peers to those [B, T, H, D] shapes
# (all of them, 128k exact attention included, take about seven minutes).
set -euo pipefail
dir=${1:-.gpu}
shift || true
log=${OUT:-/tmp}
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu --format=csv
"$dir/cuda_check" "$@" 2>&1 | tee "$log/linattn.txt"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "$dir"/whl/*.whl
anchors=/tmp/gpu_anchors.py
cp "$dir/gpu_anchors.py" "$anchors"
if [ -n "${LINATTN_ANCHOR_SHAPES:-}" ]; then
    sed -i "s/^shapes = .*/shapes = [${LINATTN_ANCHOR_SHAPES}]/" "$anchors"
fi
PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 python3 "$anchors" 2>&1 | tee "$log/peers.txt"
echo "--- linattn"
grep -E "^(device|ceiling|bench|checks)" "$log/linattn.txt"
echo "--- peers"
grep -E "^(device|ceiling|bench)" "$log/peers.txt" | grep -E "ceiling|B=4,T=8192|B=32|131072|linear" || true
