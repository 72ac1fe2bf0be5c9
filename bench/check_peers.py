#!/usr/bin/env python3
"""Runs `linattn run` and the authors' implementations on the same inputs, side by side.

Each method is computed by the peer a PyTorch user runs today, with the same parameters
(the same omega for Performer, the same E and F for Linformer), and by `linattn run` on
the same .npy files; the script prints the largest difference relative to the peer's
largest output. Peers: torch SDPA (exact softmax, sliding window through a mask),
performer-pytorch 1.1.4 `FastAttention`, linformer 0.2.3 `LinformerSelfAttention` (its
projections set to the identity), `torch.fft` for FNet. The Linear Transformer's
reference (fast-transformers) and cosFormer's (OpenNLPLab) are not on PyPI: their
published forward formulas are written out below in torch, line for line.

Usage: python3 bench/check_peers.py [--linattn target/release/linattn]
Needs torch, numpy, einops, performer-pytorch==1.1.4, linformer==0.2.3 (see
../shared/anchors/README.md for the install line).
"""

import argparse
import math
import os
import subprocess
import tempfile

import numpy as np
import torch
import torch.nn.functional as F

B, T, H, D = 2, 77, 4, 32
FEATURES, K_PROJ, WINDOW = 64, 16, 9


def run_linattn(binary, workdir, method_args, q, k, v, extra_files=None):
    paths = {}
    for name, array in [("q", q), ("k", k), ("v", v), *(extra_files or {}).items()]:
        paths[name] = os.path.join(workdir, f"{name}.npy")
        np.save(paths[name], array)
    out = os.path.join(workdir, "out.npy")
    args = [binary, "run", *method_args, "--q", paths["q"], "--k", paths["k"], "--v", paths["v"], "--out", out]
    for flag, name in [("--omega", "omega"), ("--proj-k", "e"), ("--proj-v", "f")]:
        if name in paths:
            args += [flag, paths[name]]
    subprocess.run(args, check=True)
    return np.load(out)


def heads_first(x):
    return torch.from_numpy(x).transpose(1, 2)  # [B, T, H, D] -> [B, H, T, D]


def heads_last(x):
    return x.transpose(1, 2).contiguous().numpy()


def sdpa(q, k, v, causal, window=None):
    qt, kt, vt = map(heads_first, (q, k, v))
    mask = None
    if window is not None:
        i = torch.arange(T)[:, None]
        j = torch.arange(T)[None, :]
        mask = (j <= i) & (j >= i - window)
    return heads_last(F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, is_causal=causal and mask is None))


def linear_transformer(q, k, v, causal):
    """fast-transformers' LinearAttention / CausalLinearAttention, eps = 1e-6."""
    phi_q, phi_k = (F.elu(heads_first(x)) + 1 for x in (q, k))
    vt = heads_first(v)
    if causal:
        kv = torch.einsum("bhnd,bhnm->bhndm", phi_k, vt).cumsum(2)
        z = 1 / (torch.einsum("bhnd,bhnd->bhn", phi_q, phi_k.cumsum(2)) + 1e-6)
        out = torch.einsum("bhnd,bhndm,bhn->bhnm", phi_q, kv, z)
    else:
        kv = torch.einsum("bhnd,bhnm->bhdm", phi_k, vt)
        z = 1 / (torch.einsum("bhnd,bhd->bhn", phi_q, phi_k.sum(2)) + 1e-6)
        out = torch.einsum("bhnd,bhdm,bhn->bhnm", phi_q, kv, z)
    return heads_last(out)


def cosformer(q, k, v, causal):
    """OpenNLPLab cosFormer's forward: ReLU, sin/cos reweighting with M = max length."""
    qt, kt, vt = (heads_first(x) for x in (q, k, v))
    qt, kt = torch.relu(qt), torch.relu(kt)
    index = math.pi / 2 * torch.arange(1, T + 1).reshape(1, 1, -1, 1) / T
    q_ = torch.cat([qt * torch.sin(index), qt * torch.cos(index)], dim=-1)
    k_ = torch.cat([kt * torch.sin(index), kt * torch.cos(index)], dim=-1)
    if causal:
        kv = torch.einsum("bhnd,bhnm->bhndm", k_, vt).cumsum(2)
        z = 1 / torch.clamp_min(torch.einsum("bhnd,bhnd->bhn", q_, k_.cumsum(2)), 1e-6)
        out = torch.einsum("bhnd,bhndm,bhn->bhnm", q_, kv, z)
    else:
        kv = torch.einsum("bhnd,bhnm->bhdm", k_, vt)
        z = 1 / torch.clamp_min(torch.einsum("bhnd,bhd->bhn", q_, k_.sum(2)), 1e-6)
        out = torch.einsum("bhnd,bhdm,bhn->bhnm", q_, kv, z)
    return heads_last(out)


def performer(q, k, v, omega, causal):
    from performer_pytorch import FastAttention

    attn = FastAttention(dim_heads=D, nb_features=FEATURES, causal=causal)
    attn.projection_matrix.copy_(torch.from_numpy(omega))
    with torch.no_grad():
        return heads_last(attn(*(heads_first(x) for x in (q, k, v))))


def linformer(q, kv, e, f):
    from linformer import LinformerSelfAttention

    attn = LinformerSelfAttention(dim=H * D, seq_len=T, k=K_PROJ, heads=H, dim_head=D)
    with torch.no_grad():
        for layer in (attn.to_q, attn.to_k, attn.to_v, attn.to_out):
            layer.weight.copy_(torch.eye(H * D))
        attn.to_out.bias.zero_()
        attn.proj_k.copy_(torch.from_numpy(e))
        attn.proj_v.copy_(torch.from_numpy(f))
        flat = lambda x: torch.from_numpy(x).reshape(B, T, H * D)  # noqa: E731
        return attn(flat(q), context=flat(kv)).reshape(B, T, H, D).numpy()


def fnet(v):
    return torch.fft.fftn(torch.from_numpy(v).reshape(B, T, H * D), dim=(-2, -1)).real.reshape(B, T, H, D).numpy()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--linattn", default="target/release/linattn")
    args = parser.parse_args()
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((B, T, H, D), dtype=np.float32) for _ in range(3))
    omega = rng.standard_normal((FEATURES, D)).astype(np.float32)
    e, f = (rng.uniform(-K_PROJ**-0.5, K_PROJ**-0.5, (T, K_PROJ)).astype(np.float32) for _ in range(2))

    rows = []
    with tempfile.TemporaryDirectory() as work:
        def compare(name, peer, ours, note=""):
            error = np.abs(ours - peer).max() / np.abs(peer).max()
            rows.append((name, error, note))

        for causal in (False, True):
            flag = ["--causal"] if causal else []
            tag = "causal" if causal else "full"
            compare(f"softmax {tag}", sdpa(q, k, v, causal), run_linattn(args.linattn, work, ["--method", "softmax", *flag], q, k, v))
            compare(f"linear {tag}", linear_transformer(q, k, v, causal), run_linattn(args.linattn, work, ["--method", "linear", *flag], q, k, v))
            compare(f"cosformer {tag}", cosformer(q, k, v, causal), run_linattn(args.linattn, work, ["--method", "cosformer", *flag], q, k, v))
            ours = run_linattn(args.linattn, work, ["--method", "performer", *flag], q, k, v, {"omega": omega})
            peer = performer(q, k, v, omega, causal)
            note = ""
            if causal:
                # The peer's key stabiliser is a max over all keys, future ones included:
                # scaling the last key moves outputs of the first half of the sequence.
                k_future = k.copy()
                k_future[:, -1] *= 3
                moved = np.abs(performer(q, k_future, v, omega, True)[:, : T // 2] - peer[:, : T // 2]).max()
                note = f"peer's early outputs move by {moved / np.abs(peer).max():.1e} when the last key changes"
            compare(f"performer {tag}", peer, ours, note)
        compare(
            "window causal",
            sdpa(q, k, v, True, window=WINDOW),
            run_linattn(args.linattn, work, ["--method", "window", "--causal", "--window", f"{WINDOW},0"], q, k, v),
        )
        compare("linformer full", linformer(q, k, e, f), run_linattn(args.linattn, work, ["--method", "linformer"], q, k, k, {"e": e, "f": f}))
        compare("fnet full", fnet(v), run_linattn(args.linattn, work, ["--method", "fnet"], q, k, v))

    print(f"linattn vs peers, f32, B={B} T={T} H={H} D={D}; error = max|ours - peer| / max|peer|")
    print(f"{'method':<18} {'error':>10}  note")
    for name, error, note in rows:
        print(f"{name:<18} {error:>10.2e}  {note}")


if __name__ == "__main__":
    main()
