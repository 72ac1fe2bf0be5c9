#!/usr/bin/env python3
"""The table of ratios that closes bench/gpu_run.sh: each linattn timing beside the peer
it is measured against in the same run, with issue 5's target where it sets one.

Usage: python3 bench/ratios.py LINATTN_TXT PEERS_TXT
(the outputs of examples/cuda_bench.rs and ../shared/anchors/gpu_anchors.py).
"""

import sys

# (linattn op, dtype, shape) -> (peer rows, what the target asks)
# peer rows: the anchors' names; where a name appears several times (the decode step is
# timed beside each context length) the fastest is the peer's figure.
PAIRS = [
    (("linear causal", "bf16", "B=4 T=8192 H=16 D=128"),
     ["fla_chunk_linear_attn_norm_fwd", "fla_chunk_linear_attn_nonorm_fwd"], "<= 0.40 ms"),
    (("linear causal", "bf16", "B=4 T=8192 H=16 D=64"),
     ["fla_chunk_linear_attn_norm_fwd", "fla_chunk_linear_attn_nonorm_fwd"], ""),
    (("linear full", "bf16", "B=4 T=8192 H=16 D=128"), ["torch_linear_noncausal_elu"], ""),
    (("linear causal forward+backward", "bf16", "B=4 T=8192 H=16 D=128"),
     ["fla_chunk_linear_attn_fwdbwd"], "< fla"),
    (("softmax causal", "bf16", "B=4 T=8192 H=16 D=128"),
     ["sdpa_flash_fwd_causal", "sdpa_cudnn_fwd_causal"], ">= 0.8x FA2"),
    (("softmax full", "bf16", "B=4 T=8192 H=16 D=128"),
     ["sdpa_flash_fwd_full", "sdpa_cudnn_fwd_full"], ""),
    (("linear decode step", "bf16 tokens f32 state", "B=32 H=16 D=128"),
     ["fla_fused_recurrent_decode_step"], "<= 50 us"),
]


def milliseconds(field):
    value, unit = field.split()
    return float(value) * {"ms": 1.0, "us": 1e-3}[unit]


def linattn_rows(path):
    rows = {}
    for line in open(path):
        parts = line.strip().split(",")
        if parts[0] == "bench" and len(parts) >= 5:
            rows[(parts[1], parts[2], parts[3])] = milliseconds(parts[4])
    return rows


def peer_rows(path):
    rows = {}
    for line in open(path):
        parts = line.strip().split(",")
        if parts[0] == "bench" and len(parts) >= 7 and parts[6].endswith(" ms"):
            shape = " ".join(parts[2:6]).replace("T=1 ", "")
            key = (parts[1], shape)
            rows[key] = min(rows.get(key, float("inf")), milliseconds(parts[6]))
    return rows


def main():
    ours, peers = linattn_rows(sys.argv[1]), peer_rows(sys.argv[2])
    print(f"{'linattn op':<34} {'shape':<22} {'linattn ms':>10}  {'peer':<34} {'peer ms':>9} {'peer/linattn':>12}  target")
    for (op, dtype, shape), names, target in PAIRS:
        mine = ours.get((op, dtype, shape))
        if mine is None:
            continue
        for index, name in enumerate(names):
            theirs = peers.get((name, shape))
            if theirs is None:
                continue
            # The target is set against the first peer named.
            goal = target if index == 0 else ""
            print(f"{op:<34} {shape:<22} {mine:>10.4f}  {name:<34} {theirs:>9.4f} {theirs / mine:>11.2f}x  {goal}")


if __name__ == "__main__":
    main()
