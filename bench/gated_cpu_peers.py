"""The gated and delta-rule family on the CPU beside flash-linear-attention's own PyTorch
implementations (what its users get without a GPU): first outputs one to one on a small
problem through `linattn run`, then times at the issue's shape.

Usage: python3 bench/gated_cpu_peers.py LINATTN [T]
(flash-linear-attention 0.6.0, fla-core, einops and torch installed; T defaults to 65536.)
Prints `agree,<method>,<max relative error>` and `bench,<method>,<peer function>,<ms>`.
"""

import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F

torch.set_num_threads(os.cpu_count() or 1)

from fla.ops.delta_rule.naive import delta_rule_chunkwise
from fla.ops.gated_delta_rule.naive import naive_chunk_gated_delta_rule
from fla.ops.gla.naive import naive_recurrent_gla
from fla.ops.kda.naive import naive_chunk_kda
from fla.ops.simple_gla.naive import naive_chunk_simple_gla


def inputs(B, T, H, D, seed=0):
    """q, k L2-normalised (what the delta rule needs), v, and gates as fla's tests draw
    them: g = logsigmoid(x) per head, logsigmoid(x) / 16 per channel, beta = sigmoid."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)
    q, k = F.normalize(r(B, T, H, D), dim=-1), F.normalize(r(B, T, H, D), dim=-1)
    v = r(B, T, H, D)
    return dict(
        q=q, k=k, v=v,
        g=F.logsigmoid(r(B, T, H)),
        gk=F.logsigmoid(r(B, T, H, D)) / 16,
        beta=torch.sigmoid(r(B, T, H)),
    )


def retention_g(B, T, H):
    gamma = 1 - 2.0 ** (-5.0 - torch.arange(H, dtype=torch.float32))
    return gamma.log().expand(B, T, H).contiguous()


def peers(x, B, T, H):
    """Each method as (linattn name, options, the inputs it reads, fla function, call)."""
    t = lambda a: a.transpose(1, 2).contiguous()
    return [
        ("retention", [], {}, "naive_chunk_simple_gla",
         lambda: naive_chunk_simple_gla(x["q"], x["k"], x["v"], retention_g(B, T, H))[0]),
        ("gla", [], {"g": x["gk"]}, "naive_recurrent_gla",
         lambda: naive_recurrent_gla(x["q"], x["k"], x["v"], x["gk"])[0]),
        ("gla", ["head"], {"g": x["g"]}, "naive_chunk_simple_gla",
         lambda: naive_chunk_simple_gla(x["q"], x["k"], x["v"], x["g"])[0]),
        ("delta-rule", [], {"beta": x["beta"]}, "delta_rule_chunkwise",
         lambda: t(delta_rule_chunkwise(t(x["q"]), t(x["k"]), t(x["v"]), t(x["beta"]), chunk_size=32)[0])),
        ("gated-delta-rule", [], {"g": x["g"], "beta": x["beta"]}, "naive_chunk_gated_delta_rule",
         lambda: naive_chunk_gated_delta_rule(x["q"], x["k"], x["v"], x["g"], x["beta"])[0]),
        ("gated-delta-rule", ["kda"], {"g": x["gk"], "beta": x["beta"]}, "naive_chunk_kda",
         lambda: naive_chunk_kda(x["q"], x["k"], x["v"], x["gk"], x["beta"])[0]),
    ]


def agree(linattn):
    B, T, H, D = 2, 128, 2, 16  # fla's chunked naive forms take whole chunks of 64
    x = inputs(B, T, H, D, seed=1)
    with tempfile.TemporaryDirectory() as tmp:
        path = lambda name: os.path.join(tmp, name + ".npy")
        for name in ("q", "k", "v"):
            np.save(path(name), x[name].numpy())
        for method, _, reads, function, call in peers(x, B, T, H):
            args = [linattn, "run", "--method", method, "--causal", "--out", path("o")]
            args += [a for n in ("q", "k", "v") for a in ("--" + n, path(n))]
            for name, value in reads.items():
                np.save(path(name), value.numpy())
                args += ["--" + name, path(name)]
            subprocess.run(args, check=True)
            ours, theirs = np.load(path("o")), call().numpy()
            error = np.abs(ours - theirs).max() / np.abs(theirs).max()
            print(f"agree,{method},{function},{error:.2e}", flush=True)


def bench(T):
    B, H, D = 1, 8, 64
    x = inputs(B, T, H, D)
    for method, _, _, function, call in peers(x, B, T, H):
        times = []
        while len(times) < 3 and sum(times) < 20:
            start = time.perf_counter()
            call()
            times.append(time.perf_counter() - start)
        times.sort()
        ms = times[len(times) // 2] * 1e3
        print(f"bench,{method},{function},B={B} T={T} H={H} D={D} f32,{ms:.1f} ms,{len(times)} runs", flush=True)


if __name__ == "__main__":
    agree(sys.argv[1])
    bench(int(sys.argv[2]) if len(sys.argv) > 2 else 65536)
