#!/usr/bin/env bash
# The gated and delta-rule family on this machine's CPU, linattn and flash-linear-
# attention's PyTorch forms in one command: `linattn bench` at B=1 T=65536 H=8 D=64 f32
# (its floor measured in the same run), `linattn decode` (a step against its state), then
# bench/gated_cpu_peers.py (outputs compared one to one, then timed). Raw outputs go to
# OUT (default bench/results) with the date in their names.
# Usage: bench/gated_cpu_run.sh LINATTN PYTHON [OUT]
set -euo pipefail
linattn=$1
python=$2
out=${3:-$(dirname "$0")/results}
stamp=cpu_2core_$(date +%F)_gated
grep -m1 "model name" /proc/cpuinfo | tee "$out/$stamp.txt"
# Each layer's own gate (gla per channel, gated-delta-rule per head), then the other:
# simple GLA (gla, one gate per head) and KDA (gated-delta-rule per key channel).
shape=(--causal --seq 65536 --batch 1 --heads 8 --dim 64)
"$linattn" bench --methods retention,gla,delta-rule,gated-delta-rule,linear "${shape[@]}" \
    --json > "$out/${stamp}_bench.records"
"$linattn" bench --methods gla --gate head "${shape[@]}" --json >> "$out/${stamp}_bench.records"
"$linattn" bench --methods gated-delta-rule --gate channel "${shape[@]}" \
    --json >> "$out/${stamp}_bench.records"
"$linattn" bench --methods retention,gla,delta-rule,gated-delta-rule,linear "${shape[@]}" \
    2>&1 | tail -8 | tee -a "$out/$stamp.txt"
decode=(--prompt-len 1000 --tokens 256 --heads 8 --dim 64)
"$linattn" decode --method retention,gla,delta-rule,gated-delta-rule,linear "${decode[@]}" \
    2>/dev/null | tail -7 | tee -a "$out/$stamp.txt"
"$linattn" decode --method gla --gate head "${decode[@]}" 2>/dev/null | tail -1 | tee -a "$out/$stamp.txt"
"$linattn" decode --method gated-delta-rule --gate channel "${decode[@]}" 2>/dev/null \
    | tail -1 | tee -a "$out/$stamp.txt"
"$python" "$(dirname "$0")/gated_cpu_peers.py" "$linattn" 2>/dev/null | tee -a "$out/$stamp.txt"
