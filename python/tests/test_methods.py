"""linattn's own methods from Python: exact softmax and its window against NumPy's
softmax, FNet against NumPy's FFT, a hybrid's local heads against the window alone, and
refusals; the rest of the catalogue runs through the same binding."""

import numpy as np
import pytest

import linattn
from linattn import LinattnError


def softmax_reference(q, k, v, mask, scale=None):
    """Exact attention in float64, query head h reading key head h // (H / H_kv)."""
    b, t, h, d = q.shape
    group = h // k.shape[2]
    scale = d ** -0.5 if scale is None else scale
    out = np.zeros((b, t, h, v.shape[3]))
    for i in range(h):
        scores = np.einsum("btd,bsd->bts", q[:, :, i], k[:, :, i // group]) * scale
        scores = np.where(mask, scores, -np.inf)
        weights = np.exp(scores - scores.max(-1, keepdims=True))
        weights /= weights.sum(-1, keepdims=True)
        out[:, :, i] = np.einsum("bts,bsd->btd", weights, v[:, :, i // group])
    return out


def relative(got, want):
    return np.linalg.norm(got - want) / np.linalg.norm(want)


def arrays(b, t, h, h_kv, d, seed):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((b, t, h, d)), rng.standard_normal((b, t, h_kv, d)), rng.standard_normal((b, t, h_kv, d))


def test_exact_softmax_and_its_window():
    q, k, v = arrays(2, 37, 4, 2, 8, seed=0)
    t = q.shape[1]
    i, j = np.arange(t)[:, None], np.arange(t)[None, :]
    everything = np.ones((t, t), bool)
    assert relative(linattn.softmax_attn(q, k, v), softmax_reference(q, k, v, everything)) < 1e-12
    assert relative(linattn.softmax_attn(q, k, v, causal=True, scale=0.2),
                    softmax_reference(q, k, v, j <= i, scale=0.2)) < 1e-12
    window = (j >= i - 5) & (j <= i + 3)
    assert relative(linattn.window_attn(q, k, v, window_size=(5, 3)), softmax_reference(q, k, v, window)) < 1e-12
    causal_window = (j >= i - 5) & (j <= i)
    assert relative(linattn.window_attn(q, k, v, window_size=(5, -1), causal=True),
                    softmax_reference(q, k, v, causal_window)) < 1e-12


def test_fnet_is_the_real_part_of_the_2d_fourier_transform():
    q, k, v = arrays(2, 19, 3, 3, 4, seed=1)
    b, t, h, d = v.shape
    want = np.fft.fft2(v.reshape(b, t, h * d)).real.reshape(v.shape)
    assert relative(linattn.fnet(q, k, v), want) < 1e-12


def test_a_hybrid_s_local_heads_are_its_window():
    q, k, v = arrays(1, 40, 4, 4, 8, seed=2)
    hybrid = linattn.hybrid_attn(q, k, v, causal=True, local_heads=2, window_size=(7, 0))
    window = linattn.window_attn(q[:, :, :2], k[:, :, :2], v[:, :, :2], window_size=(7, 0), causal=True)
    assert np.allclose(hybrid[:, :, :2], window, rtol=0, atol=1e-12)
    performer = linattn.hybrid_attn(q, k, v, causal=True, local_heads=2, window_size=(7, 0), global_method="performer",
                                    nb_features=16)
    assert np.allclose(performer[:, :, :2], window, rtol=0, atol=1e-12)
    assert not np.allclose(performer[:, :, 2:], hybrid[:, :, 2:])


@pytest.mark.parametrize("call", [
    lambda q, k, v: linattn.performer_attn(q, k, v, causal=True, nb_features=32, seed=3),
    lambda q, k, v: linattn.performer_attn(q, k, v, nb_features=32, seed=3),
    lambda q, k, v: linattn.cosformer_attn(q, k, v, causal=True),
    lambda q, k, v: linattn.linformer_attn(q, k, v, k_proj=8),
])
def test_the_approximations_keep_float32_near_float64(call):
    q, k, v = arrays(1, 30, 2, 2, 8, seed=4)
    wide = call(q, k, v)
    narrow = call(*(x.astype(np.float32) for x in (q, k, v)))
    assert wide.shape == v.shape and narrow.dtype == np.float32
    assert relative(narrow, wide) < 1e-4


def test_refusals_name_the_option():
    q, k, v = arrays(1, 10, 2, 2, 8, seed=5)
    with pytest.raises(LinattnError, match="global"):
        linattn.hybrid_attn(q, k, v, global_method="cosformer")
    with pytest.raises(LinattnError):
        linattn.softmax_attn(q, k[:, :, :, :4], v)
