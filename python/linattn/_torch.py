"""The package's functions on torch tensors: each call is a ``torch.autograd.Function``
whose backward is the library's. CPU tensors of float32 or float64 for now, read and
returned without copies (``Tensor.numpy`` and ``torch.from_numpy`` share the memory)."""

import torch

from . import _linattn
from ._linattn import LinattnError


def _host_array(name, x):
    if x is None:
        return None
    if x.device.type != "cpu":
        raise LinattnError(
            f"{name} is on {x.device}: linattn's Python package runs on the CPU for now, "
            "and does not copy GPU tensors to the host"
        )
    if x.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"{name} must be float32 or float64 on the CPU, not {x.dtype}")
    return x.detach().numpy()


class GatedAttention(torch.autograd.Function):
    """One call of the gated family: ``call`` holds the method's name and options (see
    ``_linattn.gated_forward``), the tensors are in linattn's layout."""

    @staticmethod
    def forward(ctx, call, q, k, v, g, beta, initial_state):
        names = ("q", "k", "v", "g", "beta", "initial_state")
        arrays = [_host_array(n, x) for n, x in zip(names, (q, k, v, g, beta, initial_state))]
        o, final_state = _linattn.gated_forward(
            call["method"], *arrays[:3], g=arrays[3], beta=arrays[4], initial_state=arrays[5],
            cu_seqlens=call["cu_seqlens"], scale=call["scale"], l2norm_qk=call["l2norm_qk"],
        )
        ctx.call = call
        ctx.save_for_backward(q, k, v, g, beta, initial_state)
        return torch.from_numpy(o), torch.from_numpy(final_state)

    @staticmethod
    def backward(ctx, d_out, d_final_state):
        q, k, v, g, beta, initial_state = ctx.saved_tensors
        call = ctx.call
        array = lambda x: None if x is None else x.detach().contiguous().numpy()  # noqa: E731
        dq, dk, dv, dg, dbeta, d_initial = _linattn.gated_backward(
            call["method"], array(q), array(k), array(v), array(d_out), g=array(g), beta=array(beta),
            initial_state=array(initial_state), d_final_state=array(d_final_state),
            cu_seqlens=call["cu_seqlens"], scale=call["scale"], l2norm_qk=call["l2norm_qk"],
        )
        tensor = lambda x: None if x is None else torch.from_numpy(x)  # noqa: E731
        return (None, tensor(dq), tensor(dk), tensor(dv), tensor(dg), tensor(dbeta),
                tensor(d_initial) if initial_state is not None else None)


def gated(call, q, k, v, g, beta, initial_state):
    """The output and final states of ``call``, differentiable in every tensor given."""
    return GatedAttention.apply(call, q, k, v, g, beta, initial_state)


class AnyAttention(torch.autograd.Function):
    """One call of a method of the catalogue by name (``call``: its name, causality and
    options, as ``_linattn.attention_forward`` takes them) on q, k and v."""

    @staticmethod
    def forward(ctx, call, q, k, v):
        arrays = [_host_array(n, x) for n, x in zip(("q", "k", "v"), (q, k, v))]
        o = _linattn.attention_forward(call["method"], *arrays, causal=call["causal"], options=call["options"])
        ctx.call = call
        ctx.save_for_backward(q, k, v)
        return torch.from_numpy(o)

    @staticmethod
    def backward(ctx, d_out):
        q, k, v = ctx.saved_tensors
        call = ctx.call
        array = lambda x: x.detach().contiguous().numpy()  # noqa: E731
        dq, dk, dv = _linattn.attention_backward(call["method"], array(q), array(k), array(v), array(d_out),
                                                 causal=call["causal"], options=call["options"])
        return None, torch.from_numpy(dq), torch.from_numpy(dk), torch.from_numpy(dv)


def attend(call, q, k, v):
    """The output of ``call``, differentiable in q, k and v."""
    return AnyAttention.apply(call, q, k, v)
