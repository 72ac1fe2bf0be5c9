#!/usr/bin/env bash
# CI: compiles every CUDA kernel with NVRTC for sm_90a (Hopper), with no GPU or driver.
# NVRTC and the headers the kernels include (cuda_bf16.h, cuda_fp16.h, mma.h and what
# they include) come from CUDA 13.0's wheels on PyPI, in a venv under target/; the GPU
# machine runs CUDA 13.0 (driver 580), so this is the compiler its kernels meet.
set -euo pipefail
cd "$(dirname "$0")/.."

venv=target/nvrtc-venv
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
# nvrtc: libnvrtc.so.13 and its builtin headers; runtime: cuda_bf16.h, cuda_fp16.h and
# mma.h; crt: crt/mma.h and the rest of crt/. The kernels read nothing else from disk
# (NVRTC has the headers those include built in); should one include CCCL (cuda/std,
# cub), add nvidia-cuda-cccl==13.0.85, which fills include/cccl.
"$venv/bin/pip" install --quiet --disable-pip-version-check \
    nvidia-cuda-nvrtc==13.0.88 \
    nvidia-cuda-runtime==13.0.96 \
    nvidia-cuda-crt==13.0.88

site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
cuda="$site/nvidia/cu13"
# cudarc tries `libnvrtc.so` before `libnvrtc.so.13`: the link keeps a system NVRTC of
# another version, should there be one, from being found first.
ln -sf libnvrtc.so.13 "$cuda/lib/libnvrtc.so"

# The kernels' include dir is $CUDA_HOME/include (and its cccl/); cudarc loads NVRTC
# from the library path.
export CUDA_HOME="$cuda"
# An empty module cache: every kernel is compiled, none loaded from an earlier run.
LINATTN_CACHE_DIR=$(mktemp -d)
export LINATTN_CACHE_DIR
trap 'rm -rf "$LINATTN_CACHE_DIR"' EXIT
export LD_LIBRARY_PATH="$cuda/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
# The test profile: the library the tests built is reused, only the example is linked.
cargo run --profile test --example nvrtc_check -p linattn --features cuda -- sm_90a
