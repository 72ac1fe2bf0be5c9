#!/usr/bin/env python3
"""linattn against its PyTorch peers on this CPU, side by side in one run.

Measures each peer as ../shared/anchors/cpu_anchors.py does (torch SDPA; elu+1 linear
attention in torch, non-causal and chunked causal; performer-pytorch's FAVOR+ with 256
features, non-causal and its causal form), then runs `linattn bench --json` on the same
problems (f32, B=1, H=8, D=64), and prints times, the ratio, the target of issue 4 and
the fraction of the machine's floor linattn reaches (ceilings measured by linattn in the
same run).

Usage: python3 bench/cpu_compare.py [--linattn target/release/linattn] [--quick]
Needs torch, einops and performer-pytorch==1.1.4 (the install line is in
../shared/anchors/README.md). --quick uses 4x shorter sequences (no targets apply).
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

H, D = 8, 64


def median_ms(fn, reps):
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    times.sort()
    return times[len(times) // 2] * 1e3


def elu1(x):
    return F.elu(x) + 1


def linear_full(q, k, v):
    q, k = elu1(q), elu1(k)
    kv = torch.einsum("bthd,bthe->bhde", k, v)
    z = k.sum(1)
    num = torch.einsum("bthd,bhde->bthe", q, kv)
    return num / (torch.einsum("bthd,bhd->bth", q, z).unsqueeze(-1) + 1e-6)


def linear_causal(q, k, v, chunk=64):
    q, k = elu1(q), elu1(k)
    b, t, h, d = q.shape
    qc, kc, vc = (x.view(b, t // chunk, chunk, h, d).permute(0, 3, 1, 2, 4) for x in (q, k, v))
    kv = torch.einsum("bhncd,bhnce->bhnde", kc, vc)
    kv_before = kv.cumsum(2) - kv
    z = kc.sum(3)
    z_before = z.cumsum(2) - z
    att = torch.einsum("bhncd,bhnsd->bhncs", qc, kc) * torch.tril(torch.ones(chunk, chunk))
    num = torch.einsum("bhncd,bhnde->bhnce", qc, kv_before) + att @ vc
    den = torch.einsum("bhncd,bhnd->bhnc", qc, z_before) + att.sum(-1)
    out = num / (den.unsqueeze(-1) + 1e-6)
    return out.permute(0, 2, 3, 1, 4).reshape(b, t, h, d)


def favor(q, k, v, causal):
    from performer_pytorch.performer_pytorch import (
        causal_linear_attention_noncuda,
        gaussian_orthogonal_random_matrix,
        linear_attention,
        softmax_kernel,
    )

    if not hasattr(favor, "projection"):
        favor.projection = gaussian_orthogonal_random_matrix(256, D)
    qh, kh, vh = (x.transpose(1, 2) for x in (q, k, v))
    qp = softmax_kernel(qh, projection_matrix=favor.projection, is_query=True)
    kp = softmax_kernel(kh, projection_matrix=favor.projection, is_query=False)
    if causal:
        return causal_linear_attention_noncuda(qp, kp, vh)
    return linear_attention(qp, kp, vh)


def comparisons(scale):
    """(name, seq, causal, peer, reps) for every comparison."""
    return [
        (16384 // scale, "sdpa", "softmax", False, 3),
        (16384 // scale, "sdpa", "softmax", True, 3),
        (65536 // scale, linear_full, "linear", False, 5),
        (65536 // scale, linear_causal, "linear", True, 3),
        (65536 // scale, "favor", "performer", False, 3),
        (65536 // scale, "favor-causal", "performer", True, 1),
    ]


def peer_ms(seq, fn, name, causal, reps):
    """The torch peer's median time on fresh random inputs."""
    q, k, v = (torch.randn(1, seq, H, D) for _ in range(3))
    if fn == "sdpa":
        qh, kh, vh = (x.transpose(1, 2).contiguous() for x in (q, k, v))
        run = lambda: F.scaled_dot_product_attention(qh, kh, vh, is_causal=causal)  # noqa: E731
    elif fn in ("favor", "favor-causal"):
        run = lambda: favor(q, k, v, fn == "favor-causal")  # noqa: E731
    else:
        run = lambda: fn(q, k, v)  # noqa: E731
    with torch.no_grad():
        ms = median_ms(run, reps)
    print(f"torch {name:<10} {'causal' if causal else 'full':<6} T={seq:<7} {ms:10.1f} ms", file=sys.stderr, flush=True)
    return ms


def linattn(binary, name, seq, causal, extra=()):
    args = [binary, "bench", "--json", "--methods", name, "--seq", str(seq), "--batch", "1", "--heads", str(H), "--dim", str(D), *extra]
    if causal:
        args.append("--causal")
    record = json.loads(subprocess.run(args, check=True, capture_output=True, text=True).stdout)[0]
    print(f"linattn {name:<8} {'causal' if causal else 'full':<6} T={seq:<7} {record['median_ms']:10.1f} ms", file=sys.stderr, flush=True)
    return record


TARGETS = {
    ("softmax", False): ("≥ 1x SDPA", 1.0),
    ("softmax", True): ("≥ 1x SDPA", 1.0),
    ("linear", False): ("≥ 5x torch einsum", 5.0),
    ("linear", True): ("≥ 10x torch chunked", 10.0),
    ("performer", False): ("≥ 5x performer-pytorch", 5.0),
    ("performer", True): ("≥ 5x performer-pytorch", 5.0),
}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--linattn", default="target/release/linattn")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    torch.manual_seed(0)
    scale = 4 if args.quick else 1

    print(f"# {time.strftime('%Y-%m-%d %H:%M')} {platform.node()} {os.cpu_count()} cpus, torch {torch.__version__} ({torch.get_num_threads()} threads)")
    rows = []
    # Each pair back to back, so that both see the machine in the same state.
    for seq, fn, name, causal, reps in comparisons(scale):
        torch_ms = peer_ms(seq, fn, name, causal, reps)
        record = linattn(args.linattn, name, seq, causal)
        rows.append((name, seq, causal, torch_ms, record))
    million = linattn(args.linattn, "linear", 1048576 // scale, True)

    ceilings = rows[0][4]
    print(f"ceilings (measured by linattn): copy {ceilings['copy_bytes_per_s'] / 1e9:.1f} GB/s, matmul {ceilings['matmul_flops_per_s'] / 1e9:.1f} GFLOP/s")
    print(f"| op | T | torch ms | linattn ms | speedup | target | linattn / floor |")
    print(f"|---|---|---|---|---|---|---|")
    for name, seq, causal, torch_ms, record in rows:
        ours = record["median_ms"]
        label, needed = TARGETS[(name, causal)]
        verdict = "" if args.quick else (" ✓" if torch_ms / ours >= needed else " ✗")
        print(
            f"| {name} {'causal' if causal else 'full'} | {seq} | {torch_ms:.1f} | {ours:.1f} | "
            f"{torch_ms / ours:.2f}x | {label}{verdict} | {record['fraction_of_floor']:.2f} |"
        )
    verdict = "" if args.quick else (" ✓" if million["median_ms"] < 2000 else " ✗")
    print(
        f"| linear causal | {million['seq']} | — | {million['median_ms']:.1f} | — | < 2000 ms{verdict} | "
        f"{million['fraction_of_floor']:.2f} |"
    )


if __name__ == "__main__":
    main()
