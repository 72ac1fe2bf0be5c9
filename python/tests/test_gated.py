"""The package's gated family against recurrences written here in NumPy from the
definitions (float64), on awkward shapes; packed sequences; the types and errors."""

import numpy as np
import pytest

import linattn
from linattn import LinattnError


def recurrence(q, k, v, *, g=None, beta=None, scale=None, h0=None, l2norm=False):
    """o_t = scale S_tᵀ q_t with S_t = exp(g_t) S_{t-1} (per channel where g has K
    columns), then, with beta, the delta rule: u = beta (v_t - S_tᵀ k_t), S_t += k_t uᵀ;
    without it, S_t += k_t v_tᵀ. Value head hv reads q, k head hv // (HV / H)."""
    b, t, h, dk = q.shape
    hv, dv = v.shape[2], v.shape[3]
    scale = dk ** -0.5 if scale is None else scale
    if l2norm:
        q = q / np.sqrt((q * q).sum(-1, keepdims=True) + 1e-6)
        k = k / np.sqrt((k * k).sum(-1, keepdims=True) + 1e-6)
    out = np.zeros((b, t, hv, dv))
    states = np.zeros((b, hv, dk, dv)) if h0 is None else h0.astype(np.float64).copy()
    for n in range(b):
        for j in range(hv):
            i = j // (hv // h)
            s = states[n, j]
            for step in range(t):
                if g is not None:
                    decay = np.exp(g[n, step, j])
                    s = (decay[:, None] if np.ndim(decay) else decay) * s
                kt, vt = k[n, step, i], v[n, step, j]
                if beta is not None:
                    s = s + np.outer(kt, beta[n, step, j] * (vt - s.T @ kt))
                else:
                    s = s + np.outer(kt, vt)
                out[n, step, j] = scale * (s.T @ q[n, step, i])
            states[n, j] = s
    return out, states


def inputs(b, t, h, hv, dk, dv, seed=0, channel=False):
    rng = np.random.default_rng(seed)
    q, k = rng.standard_normal((b, t, h, dk)), rng.standard_normal((b, t, h, dk))
    v = rng.standard_normal((b, t, hv, dv))
    g_shape = (b, t, hv, dk) if channel else (b, t, hv)
    g = np.log(1 / (1 + np.exp(-rng.standard_normal(g_shape)))) / (16 if channel else 1)
    beta = 1 / (1 + np.exp(-rng.standard_normal((b, t, hv))))
    h0 = rng.standard_normal((b, hv, dk, dv))
    return q, k, v, g, beta, h0


def relative(got, want):
    return np.linalg.norm(got - want) / np.linalg.norm(want)


SHAPES = [(1, 1, 1, 1, 8, 8), (2, 77, 2, 4, 16, 12), (1, 130, 1, 2, 32, 32)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype,tolerance", [(np.float64, 1e-10), (np.float32, 1e-4)])
def test_every_member_matches_the_recurrence(shape, dtype, tolerance):
    q, k, v, g, beta, h0 = inputs(*shape)
    cast = [x.astype(dtype) for x in (q, k, v, g, beta, h0)]
    # Values as the library sees them, so both start from the same numbers.
    q, k, v, g, beta, h0 = [x.astype(np.float64) for x in cast]
    qc, kc, vc, gc, bc, hc = cast
    calls = {
        "gated_delta_rule": (
            linattn.chunk_gated_delta_rule(qc, kc, vc, gc, bc, initial_state=hc, output_final_state=True,
                                           use_qk_l2norm_in_kernel=True),
            recurrence(q, k, v, g=g, beta=beta, h0=h0, l2norm=True),
        ),
        "delta_rule": (
            linattn.chunk_delta_rule(qc, kc, vc, bc, initial_state=hc, output_final_state=True,
                                     use_qk_l2norm_in_kernel=True),
            recurrence(q, k, v, beta=beta, h0=h0, l2norm=True),
        ),
        "simple_gla": (
            linattn.chunk_simple_gla(qc, kc, vc, gc, initial_state=hc, output_final_state=True, scale=0.5),
            recurrence(q, k, v, g=g, h0=h0, scale=0.5),
        ),
    }
    retention_g = np.broadcast_to(np.log(1 - 2.0 ** (-5 - np.arange(v.shape[2]))), g.shape)
    calls["retention"] = (
        linattn.chunk_retention(qc, kc, vc, initial_state=hc, output_final_state=True),
        recurrence(q, k, v, g=retention_g, h0=h0),
    )
    for name, ((o, state), (want_o, want_state)) in calls.items():
        assert o.dtype == dtype and state.dtype == dtype, name
        assert relative(o, want_o) < tolerance, (name, relative(o, want_o))
        assert relative(state, want_state) < tolerance, (name, relative(state, want_state))


def test_a_gate_per_key_channel():
    q, k, v, g, beta, h0 = inputs(2, 50, 2, 2, 16, 8, seed=3, channel=True)
    o, state = linattn.chunk_gla(q, k, v, g, initial_state=h0, output_final_state=True)
    want_o, want_state = recurrence(q, k, v, g=g, h0=h0)
    assert relative(o, want_o) < 1e-10 and relative(state, want_state) < 1e-10
    o, _ = linattn.chunk_gated_delta_rule(q, k, v, g, beta, use_qk_l2norm_in_kernel=True)
    want_o, _ = recurrence(q, k, v, g=g, beta=beta, l2norm=True)
    assert relative(o, want_o) < 1e-10


def test_packed_sequences_are_each_their_own():
    q, k, v, g, beta, _ = inputs(1, 90, 2, 2, 16, 16, seed=5)
    cu = np.array([0, 1, 40, 90])
    h0 = np.random.default_rng(6).standard_normal((3, 2, 16, 16))
    o, state = linattn.chunk_gated_delta_rule(q, k, v, g, beta, initial_state=h0, output_final_state=True,
                                              cu_seqlens=cu, use_qk_l2norm_in_kernel=True)
    for n in range(3):
        part = slice(cu[n], cu[n + 1])
        want_o, want_state = recurrence(q[:, part], k[:, part], v[:, part], g=g[:, part], beta=beta[:, part],
                                        h0=h0[n:n + 1], l2norm=True)
        assert relative(o[:, part], want_o) < 1e-10
        assert relative(state[n:n + 1], want_state) < 1e-10


def test_the_recurrent_entry_point_defaults_to_no_decay_and_unit_steps():
    q, k, v, _, _, _ = inputs(1, 20, 1, 1, 8, 8, seed=7)
    o, state = linattn.fused_recurrent_gated_delta_rule(q, k, v, use_qk_l2norm_in_kernel=True)
    want_o, _ = recurrence(q, k, v, beta=np.ones(v.shape[:3]), l2norm=True)
    assert state is None
    assert relative(o, want_o) < 1e-10


def test_strided_arrays_are_read_in_their_logical_order():
    q, k, v, g, beta, _ = inputs(1, 30, 2, 2, 8, 8, seed=8)
    transposed = np.ascontiguousarray(q.transpose(0, 2, 1, 3)).transpose(0, 2, 1, 3)
    assert not transposed.flags.c_contiguous
    o, _ = linattn.chunk_simple_gla(transposed, k, v, g)
    want, _ = linattn.chunk_simple_gla(q, k, v, g)
    assert np.array_equal(o, want)


def test_refusals_raise_with_the_library_message():
    q, k, v, g, beta, _ = inputs(1, 10, 1, 1, 8, 8, seed=9)
    bad = g.copy()
    bad[0, 4, 0] = 0.5
    with pytest.raises(LinattnError, match="g"):
        linattn.chunk_gated_delta_rule(q, k, v, bad, beta)
    with pytest.raises(LinattnError, match="beta"):
        linattn.chunk_delta_rule(q, k, v, beta + 2.0)
    with pytest.raises(LinattnError):
        linattn.chunk_gated_delta_rule(q, k[:, :5], v, g, beta)
    with pytest.raises(LinattnError, match="cu_seqlens"):
        linattn.chunk_retention(q, k, v, cu_seqlens=np.array([0.0, 10.0]))
    with pytest.raises(TypeError):
        linattn.chunk_retention(q.astype(np.int64), k, v)
    with pytest.raises(TypeError):
        linattn.chunk_retention(q.astype(np.float32), k, v)
    with pytest.raises(TypeError):
        linattn.chunk_retention(q, k, v, head_first=True)


def linear_recurrence(q, k, v, *, scale=None, h0=None, z0=None, normalize=False):
    """o_t = scale q_tᵀ S_t, S_t = S_0 + Σ_{j≤t} k_j v_jᵀ, divided by
    scale q_t·z_t + 1e-10 (z_t = z_0 + Σ_{j≤t} k_j) when normalised."""
    b, t, h, dk = q.shape
    scale = dk ** -0.5 if scale is None else scale
    o = np.zeros(v.shape)
    states = np.zeros((b, h, dk, v.shape[3])) if h0 is None else h0.copy()
    sums = np.zeros((b, h, dk)) if z0 is None else z0[:, 0].copy()
    for step in range(t):
        for n in range(b):
            for i in range(h):
                states[n, i] += np.outer(k[n, step, i], v[n, step, i])
                sums[n, i] += k[n, step, i]
                o[n, step, i] = scale * states[n, i].T @ q[n, step, i]
                if normalize:
                    o[n, step, i] /= scale * q[n, step, i] @ sums[n, i] + 1e-10
    return o, states, sums[:, None]


def test_linear_attention_as_flash_linear_attention_defines_it():
    rng = np.random.default_rng(10)
    q, k, v = (np.abs(rng.standard_normal((2, 33, 2, 8))) for _ in range(3))
    h0, z0 = np.abs(rng.standard_normal((2, 2, 8, 8))), np.abs(rng.standard_normal((2, 1, 2, 8)))
    o, (state, z) = linattn.chunk_linear_attn(q, k, v, initial_state=(h0, z0), output_final_state=True)
    want_o, want_state, want_z = linear_recurrence(q, k, v, h0=h0, z0=z0, normalize=True)
    assert relative(o, want_o) < 1e-10 and relative(state, want_state) < 1e-10 and relative(z, want_z) < 1e-10
    o, state = linattn.fused_recurrent_linear_attn(q, k, v, scale=0.3, initial_state=h0, output_final_state=True)
    want_o, want_state, _ = linear_recurrence(q, k, v, scale=0.3, h0=h0)
    assert relative(o, want_o) < 1e-10 and relative(state, want_state) < 1e-10
    # Read from the end: the recurrence over the reversed sequence, reversed back.
    o, _ = linattn.fused_recurrent_linear_attn(q, k, v, reverse=True)
    want_o, _, _ = linear_recurrence(q[:, ::-1], k[:, ::-1], v[:, ::-1])
    assert relative(o, want_o[:, ::-1]) < 1e-10


def test_reversed_packed_sequences_keep_their_states():
    rng = np.random.default_rng(11)
    q, k, v = (rng.standard_normal((1, 30, 1, 4)) for _ in range(3))
    cu = [0, 7, 30]
    h0 = rng.standard_normal((2, 1, 4, 4))
    o, state = linattn.fused_recurrent_linear_attn(q, k, v, initial_state=h0, output_final_state=True,
                                                   reverse=True, cu_seqlens=cu)
    for n in range(2):
        part = slice(cu[n], cu[n + 1])
        flipped = [x[:, part][:, ::-1] for x in (q, k, v)]
        want_o, want_state, _ = linear_recurrence(*flipped, h0=h0[n:n + 1])
        assert relative(o[:, part], want_o[:, ::-1]) < 1e-10
        assert relative(state[n:n + 1], want_state) < 1e-10
