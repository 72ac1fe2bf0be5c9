#!/usr/bin/env bash
# The command line's `--device cuda` paths on the GPU machine, as a user runs them:
# `run` against the same call on the CPU, `bench`, `decode`, and `explore`'s API.
# Usage: bench/gpu_cli_check.sh DIR (DIR holds the `linattn` binary; see gpu_run.sh).
set -euo pipefail
bin=$(realpath "${1:-.gpu}")/linattn
work=$(mktemp -d)
cd "$work"
python3 - <<'PY'
import numpy as np
rng = np.random.default_rng(0)
for name, shape in [("q", (2, 300, 4, 128)), ("k", (2, 300, 2, 128)), ("v", (2, 300, 2, 128))]:
    np.save(f"{name}.npy", rng.standard_normal(shape).astype(np.float32))
PY
for method in "linear --causal" "linear" "softmax --causal" "window --window 40,0"; do
    tag=$(echo "$method" | tr -d ' ,-')
    "$bin" run --method $method --q q.npy --k k.npy --v v.npy --out "cpu_$tag.npy"
    "$bin" run --method $method --q q.npy --k k.npy --v v.npy --out "gpu_$tag.npy" \
        --device cuda --gpu-dtype bf16
    python3 -c "
import numpy as np
a, b = np.load('cpu_$tag.npy'), np.load('gpu_$tag.npy')
error = np.linalg.norm(a - b) / np.linalg.norm(a)
print(f'cli run $method: bf16 GPU against CPU f32 relative error {error:.2e}')
assert error < 1.5e-2, error"
done
"$bin" bench --device cuda --methods linear,softmax,performer --causal --seq 4096,16384 \
    --heads 16 --dim 128 --gpu-dtype bf16
"$bin" decode --device cuda --method linear --prompt-len 1000 --tokens 64 --heads 16 --dim 128
"$bin" decode --device cuda --method softmax --prompt-len 1000 --tokens 64 --heads 16 --dim 128
port=8765
"$bin" explore --device cuda --port $port > explore.log 2>&1 &
server=$!
trap 'kill $server 2>/dev/null || true' EXIT
for _ in $(seq 50); do curl -sf "http://127.0.0.1:$port/api/info" > /dev/null && break; sleep 0.2; done
job=$(curl -sf -X POST "http://127.0.0.1:$port/api/measure" -H 'content-type: application/json' \
    -d '{"methods":["linear","softmax"],"min_seq":1024,"max_seq":4096,"heads":16,"dim":128,"causal":true}')
id=$(python3 -c "import json,sys; print(json.loads(sys.argv[1])['id'])" "$job")
for _ in $(seq 100); do
    state=$(curl -sf "http://127.0.0.1:$port/api/jobs/$id")
    python3 -c "import json,sys; sys.exit(json.loads(sys.argv[1])['state'] in ('queued','running'))" "$state" && break
    sleep 0.5
done
python3 -c "
import json, sys
job = json.loads(sys.argv[1])
print('explore job', job['state'])
for r in job['records']:
    print('explore', r['method'], r['seq'], r.get('median_ms'), r.get('skipped'))
assert job['state'] == 'done' and all(r.get('median_ms') for r in job['records'])" "$state"
echo "cli checks: ok"
