"""linattn for Python: linear attention and the gated and delta-rule family with
flash-linear-attention's names, arguments, defaults and return values, so that changing
the import is the port.

    from linattn import chunk_gated_delta_rule        # was: from fla.ops.gated_delta_rule import ...
    o, final_state = chunk_gated_delta_rule(q, k, v, g, beta, output_final_state=True)

These take NumPy arrays, or torch tensors (with autograd), of float32 or float64 on the
CPU: q, k ``[B, T, H, K]``, v
``[B, T, HV, V]`` (HV a multiple of H), g and beta ``[B, T, HV]`` (g per key channel
``[B, T, HV, K]``), states ``[N, HV, K, V]``. Each returns ``(o, final_state)``, the final
state ``None`` unless ``output_final_state``. What linattn refuses (shapes, a positive log
decay, a beta out of range, values that are not finite) raises :class:`LinattnError` with
the library's message; arrays of another type raise ``TypeError``.
"""

import numpy as np

from ._linattn import LinattnError
from ._linattn import attention_forward as _attention_forward
from ._linattn import gated_forward as _gated_forward

__all__ = [
    "LinattnError",
    "chunk_linear_attn",
    "fused_recurrent_linear_attn",
    "chunk_retention",
    "chunk_simple_gla",
    "chunk_gla",
    "chunk_delta_rule",
    "chunk_gated_delta_rule",
    "fused_recurrent_gated_delta_rule",
    "softmax_attn",
    "window_attn",
    "performer_attn",
    "cosformer_attn",
    "linformer_attn",
    "fnet",
    "hybrid_attn",
]


def _offsets(cu_seqlens):
    if cu_seqlens is None:
        return None
    cu = np.asarray(cu_seqlens)
    if cu.ndim != 1 or not np.issubdtype(cu.dtype, np.integer):
        raise LinattnError(f"cu_seqlens must be a 1-D array of integers, not {cu.dtype} of shape {cu.shape}")
    if (cu < 0).any():
        raise LinattnError("cu_seqlens holds a negative offset")
    return [int(x) for x in cu]


def _is_torch(x):
    return type(x).__module__.startswith("torch")


def _like(x, like):
    """x in the array library and element type of ``like`` (torch tensors stay tensors)."""
    if _is_torch(like):
        import torch

        return torch.as_tensor(x).to(like.dtype)
    return np.asarray(x).astype(like.dtype, copy=False)


def _per_token(x, name, like, channels=False):
    """g or beta in linattn's layout and q's type: ``[B, T, HV]`` gains a unit last axis;
    ``[B, T, HV, K]`` passes where a gate per key channel is allowed."""
    if x is None:
        return None
    x = _like(x, like)
    if x.ndim == 3:
        x = x[..., None]
    elif not (channels and x.ndim == 4):
        shapes = "[B, T, HV] or [B, T, HV, K]" if channels else "[B, T, HV]"
        raise LinattnError(f"{name} must be {shapes}, not {list(x.shape)}")
    return x


def _call(method, q, k, v, *, g=None, beta=None, scale=None, initial_state=None,
          output_final_state=False, cu_seqlens=None, l2norm=False, channels=False):
    call = {
        "method": method,
        "cu_seqlens": _offsets(cu_seqlens),
        "scale": None if scale is None else float(scale),
        "l2norm_qk": bool(l2norm),
    }
    g = _per_token(g, "g", q, channels)
    beta = _per_token(beta, "beta", q)
    initial_state = None if initial_state is None else _like(initial_state, q)
    if _is_torch(q):
        from . import _torch

        o, final_state = _torch.gated(call, q, k, v, g, beta, initial_state)
    else:
        o, final_state = _gated_forward(method, q, k, v, g=g, beta=beta, initial_state=initial_state,
                                        cu_seqlens=call["cu_seqlens"], scale=call["scale"],
                                        l2norm_qk=call["l2norm_qk"])
    return o, (final_state if output_final_state else None)


def _flip(x, axis):
    return x.flip(axis) if _is_torch(x) else np.flip(x, axis)


def _reversed_offsets(cu):
    return None if cu is None else [cu[-1] - x for x in reversed(cu)]


def _linear(q, k, v, scale, initial_state, output_final_state, normalize, cu_seqlens, reverse):
    """Causal linear attention as flash-linear-attention defines it: no feature map,
    ``o_t = scale q_tᵀ S_t`` with ``S_t = Σ_{j≤t} k_j v_jᵀ``, and with ``normalize`` divided
    by ``scale q_t · z_t + 1e-10``, ``z_t = Σ_{j≤t} k_j``; states ``S`` or ``(S, z)``. It is
    gated linear attention with no decay; z is the same sum over a value of ones."""
    cu = _offsets(cu_seqlens)
    if normalize and isinstance(initial_state, tuple):
        kv_init, z_init = initial_state
    else:
        kv_init, z_init = initial_state, None
    if reverse:
        # The sequence read backwards; packed sequences (and their states) come in reverse.
        q, k, v = (_flip(x, 1) for x in (q, k, v))
        cu = _reversed_offsets(cu)
        if cu is not None:
            kv_init, z_init = (None if x is None else _flip(x, 0) for x in (kv_init, z_init))
    no_decay = _like(np.zeros(tuple(v.shape[:3])), q)
    o, state = _call("gla", q, k, v, g=no_decay, scale=scale, initial_state=kv_init,
                     output_final_state=True, cu_seqlens=cu)
    if normalize:
        ones = _like(np.ones(tuple(v.shape[:3]) + (1,)), q)
        # z as a state of one value column: [N, 1, H, K] <-> [N, H, K, 1].
        to_state = (lambda z: z.permute(0, 2, 3, 1)) if _is_torch(q) else (lambda z: np.transpose(z, (0, 2, 3, 1)))
        from_state = (lambda z: z.permute(0, 3, 1, 2)) if _is_torch(q) else (lambda z: np.transpose(z, (0, 3, 1, 2)))
        z0 = None if z_init is None else to_state(_like(z_init, q))
        denominator, z = _call("gla", q, k, ones, g=no_decay, scale=scale, initial_state=z0,
                               output_final_state=True, cu_seqlens=cu)
        o = o / (denominator + 1e-10)
        state = (state, from_state(z))
    if reverse:
        o = _flip(o, 1)
        if cu is not None:
            state = tuple(_flip(x, 0) for x in state) if normalize else _flip(state, 0)
    return o, (state if output_final_state else None)


def chunk_linear_attn(q, k, v, scale=None, initial_state=None, output_final_state=False, normalize=True,
                      cu_seqlens=None):
    """Causal linear attention on q and k as given (no feature map), normalised by default;
    the state is ``(S, z)`` when normalised (see :func:`fused_recurrent_linear_attn`)."""
    return _linear(q, k, v, scale, initial_state, output_final_state, normalize, cu_seqlens, reverse=False)


def fused_recurrent_linear_attn(q, k, v, scale=None, initial_state=None, output_final_state=False, reverse=False,
                                normalize=False, cu_seqlens=None):
    """:func:`chunk_linear_attn` as flash-linear-attention's recurrent kernel takes it:
    unnormalised by default, and with ``reverse`` each sequence read from its end."""
    return _linear(q, k, v, scale, initial_state, output_final_state, normalize, cu_seqlens, reverse)


def chunk_retention(q, k, v, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None):
    """RetNet's retention: the state decays by a fixed ``1 - 2^(-5-h)`` per head h."""
    return _call("retention", q, k, v, scale=scale, initial_state=initial_state,
                 output_final_state=output_final_state, cu_seqlens=cu_seqlens)


def chunk_simple_gla(q, k, v, g=None, scale=None, initial_state=None, output_final_state=False,
                     cu_seqlens=None):
    """Gated linear attention with one log decay per token and head, g ``[B, T, H]``
    (none: the plain causal sum)."""
    if g is None:
        g = _like(np.zeros(tuple(v.shape[:3])), q)
    return _call("gla", q, k, v, g=g, scale=scale, initial_state=initial_state,
                 output_final_state=output_final_state, cu_seqlens=cu_seqlens)


def chunk_gla(q, k, v, g, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None):
    """Gated linear attention with a log decay per token, head and key channel, g
    ``[B, T, H, K]``."""
    return _call("gla", q, k, v, g=g, scale=scale, initial_state=initial_state,
                 output_final_state=output_final_state, cu_seqlens=cu_seqlens, channels=True)


def chunk_delta_rule(q, k, v, beta, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None,
                     use_qk_l2norm_in_kernel=False):
    """DeltaNet: the state moves towards each value by the step beta ``[B, T, H]``."""
    return _call("delta-rule", q, k, v, beta=beta, scale=scale, initial_state=initial_state,
                 output_final_state=output_final_state, cu_seqlens=cu_seqlens, l2norm=use_qk_l2norm_in_kernel)


def chunk_gated_delta_rule(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False,
                           cu_seqlens=None, use_qk_l2norm_in_kernel=False):
    """Gated DeltaNet: decay by ``exp(g)``, then the delta rule with step beta; g
    ``[B, T, HV]`` (or per key channel, ``[B, T, HV, K]``: Kimi Delta Attention)."""
    return _call("gated-delta-rule", q, k, v, g=g, beta=beta, scale=scale, initial_state=initial_state,
                 output_final_state=output_final_state, cu_seqlens=cu_seqlens, l2norm=use_qk_l2norm_in_kernel,
                 channels=True)


def fused_recurrent_gated_delta_rule(q, k, v, g=None, beta=None, scale=None, initial_state=None,
                                     output_final_state=False, use_qk_l2norm_in_kernel=False, cu_seqlens=None):
    """:func:`chunk_gated_delta_rule` as flash-linear-attention's recurrent kernel takes
    it: no g is no decay, no beta a step of 1. The result is the chunked form's."""
    if g is None:
        g = _like(np.zeros(tuple(v.shape[:3])), q)
    if beta is None:
        beta = _like(np.ones(tuple(v.shape[:3])), q)
    return chunk_gated_delta_rule(q, k, v, g, beta, scale=scale, initial_state=initial_state,
                                  output_final_state=output_final_state, cu_seqlens=cu_seqlens,
                                  use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel)


# The methods flash-linear-attention lacks, by linattn's names. Each returns the output
# alone, of v's shape (``[B, T, H, V]``; k and v may have fewer heads than q).


def _attend(method, q, k, v, causal, options):
    call = {
        "method": method,
        "causal": bool(causal),
        "options": [(name, str(value)) for name, value in options.items() if value is not None],
    }
    if _is_torch(q):
        from . import _torch

        return _torch.attend(call, q, k, v)
    return _attention_forward(method, q, k, v, causal=call["causal"], options=call["options"])


def _window(window_size):
    left, right = window_size
    return f"{int(left)},{int(right)}"


def softmax_attn(q, k, v, causal=False, scale=None):
    """Exact softmax attention (tiled, O(n) memory), ``scale`` 1/√d by default."""
    return _attend("softmax", q, k, v, causal, {"scale": scale})


def window_attn(q, k, v, window_size=(256, 256), causal=False, scale=None):
    """Exact softmax attention over keys ``i - left <= j <= i + right`` (FlashAttention's
    ``window_size``; -1 is unbounded; causal sets right to 0)."""
    return _attend("window", q, k, v, causal, {"window": _window(window_size), "scale": scale})


def performer_attn(q, k, v, causal=False, nb_features=256, seed=0):
    """FAVOR+ (Performer): positive orthogonal random features, ``nb_features`` of them
    drawn from ``seed``."""
    return _attend("performer", q, k, v, causal, {"features": nb_features, "seed": seed})


def cosformer_attn(q, k, v, causal=False, max_len=None):
    """cosFormer: ReLU features reweighted by cos(π/2 · (i - j) / M), M = ``max_len`` (by
    default each call's longest sequence)."""
    return _attend("cosformer", q, k, v, causal, {"max-len": max_len})


def linformer_attn(q, k, v, k_proj=256, max_len=None, seed=0):
    """Linformer: softmax attention over keys and values projected along the sequence to
    ``k_proj`` rows by E and F drawn from ``seed`` (``max_len`` rows; non-causal)."""
    return _attend("linformer", q, k, v, False, {"k-proj": k_proj, "max-len": max_len, "seed": seed})


def fnet(q, k, v):
    """FNet: the real part of the 2-D Fourier transform of v over (sequence, hidden); q and
    k are checked as attention's, not used."""
    return _attend("fnet", q, k, v, False, {})


def hybrid_attn(q, k, v, causal=False, local_heads=None, window_size=(256, 256), global_method="linear",
                nb_features=256, seed=0):
    """The first ``local_heads`` query heads (half by default) exact within a sliding
    window, the others ``global_method`` (``"linear"`` or ``"performer"``)."""
    options = {"local-heads": local_heads, "window": _window(window_size), "global": global_method}
    if global_method == "performer":
        options.update({"features": nb_features, "seed": seed})
    return _attend("hybrid", q, k, v, causal, options)
