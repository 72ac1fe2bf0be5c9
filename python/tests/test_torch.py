"""The package's torch path (CPU): the same results as on NumPy arrays, gradients by
torch.autograd.gradcheck in float64 for every member and input, and refusals. Skipped
where torch is not installed (CI's venv has NumPy and pytest only)."""

import numpy as np
import pytest

import linattn
from linattn import LinattnError

torch = pytest.importorskip("torch")


def inputs(b, t, h, hv, dk, dv, seed, channel=False):
    gen = torch.Generator().manual_seed(seed)
    randn = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float64)  # noqa: E731
    q, k, v = randn(b, t, h, dk), randn(b, t, h, dk), randn(b, t, hv, dv)
    g = torch.nn.functional.logsigmoid(randn(*((b, t, hv, dk) if channel else (b, t, hv))))
    beta = torch.sigmoid(randn(b, t, hv))
    h0 = randn(b, hv, dk, dv)
    return [x.requires_grad_() for x in (q, k, v, g, beta, h0)]


MEMBERS = {
    "chunk_gated_delta_rule": lambda q, k, v, g, beta, h0: linattn.chunk_gated_delta_rule(
        q, k, v, g, beta, initial_state=h0, output_final_state=True, use_qk_l2norm_in_kernel=True),
    "chunk_delta_rule": lambda q, k, v, g, beta, h0: linattn.chunk_delta_rule(
        q, k, v, beta, initial_state=h0, output_final_state=True, use_qk_l2norm_in_kernel=True),
    "chunk_simple_gla": lambda q, k, v, g, beta, h0: linattn.chunk_simple_gla(
        q, k, v, g, initial_state=h0, output_final_state=True),
    "chunk_retention": lambda q, k, v, g, beta, h0: linattn.chunk_retention(
        q, k, v, initial_state=h0, output_final_state=True),
}


@pytest.mark.parametrize("name", sorted(MEMBERS))
def test_gradients_match_finite_differences(name):
    call = MEMBERS[name]
    tensors = inputs(1, 9, 1, 2, 4, 3, seed=1)

    def both(*x):
        o, state = call(*x)
        return o, state

    assert torch.autograd.gradcheck(both, tensors, eps=1e-6, atol=1e-7, rtol=1e-5)


def test_a_gate_per_key_channel_has_gradients_too():
    q, k, v, g, beta, h0 = inputs(1, 7, 1, 1, 4, 3, seed=2, channel=True)
    assert torch.autograd.gradcheck(
        lambda *x: linattn.chunk_gla(x[0], x[1], x[2], x[3], initial_state=x[4], output_final_state=True),
        (q, k, v, g, h0), eps=1e-6, atol=1e-7, rtol=1e-5)


def test_tensors_give_what_arrays_give():
    q, k, v, g, beta, h0 = [x.detach().float() for x in inputs(2, 40, 2, 2, 8, 8, seed=3)]
    o, state = linattn.chunk_gated_delta_rule(q, k, v, g, beta, initial_state=h0, output_final_state=True)
    want_o, want_state = linattn.chunk_gated_delta_rule(
        q.numpy(), k.numpy(), v.numpy(), g.numpy(), beta.numpy(), initial_state=h0.numpy(),
        output_final_state=True)
    assert isinstance(o, torch.Tensor) and o.dtype == torch.float32
    assert np.array_equal(o.numpy(), want_o) and np.array_equal(state.numpy(), want_state)


def test_tensors_off_the_cpu_or_of_other_types_are_refused():
    q, k, v, g, beta, _ = [x.detach() for x in inputs(1, 5, 1, 1, 4, 4, seed=4)]
    with pytest.raises(LinattnError, match="meta"):
        linattn.chunk_gated_delta_rule(q.to("meta"), k, v, g, beta)
    with pytest.raises(TypeError, match="bfloat16"):
        linattn.chunk_retention(q.bfloat16(), k.bfloat16(), v.bfloat16())


def test_normalised_linear_attention_has_gradients():
    gen = torch.Generator().manual_seed(12)
    q, k, v = (torch.rand(1, 8, 1, 4, generator=gen, dtype=torch.float64).requires_grad_() for _ in range(3))
    h0 = torch.rand(1, 1, 4, 3, generator=gen, dtype=torch.float64)
    v = v[..., :3].detach().requires_grad_()
    z0 = torch.rand(1, 1, 1, 4, generator=gen, dtype=torch.float64).requires_grad_()
    h0.requires_grad_()

    def call(q, k, v, h0, z0):
        o, (state, z) = linattn.chunk_linear_attn(q, k, v, initial_state=(h0, z0), output_final_state=True)
        return o, state, z

    assert torch.autograd.gradcheck(call, (q, k, v, h0, z0), eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("name,call", [
    ("softmax", lambda q, k, v: linattn.softmax_attn(q, k, v, causal=True)),
    ("window", lambda q, k, v: linattn.window_attn(q, k, v, window_size=(3, 2))),
    ("performer", lambda q, k, v: linattn.performer_attn(q, k, v, causal=True, nb_features=8)),
    ("cosformer", lambda q, k, v: linattn.cosformer_attn(q, k, v, causal=True)),
    ("fnet", lambda q, k, v: linattn.fnet(q, k, v)),
])
def test_the_catalogue_s_methods_have_gradients(name, call):
    gen = torch.Generator().manual_seed(13)
    tensors = [torch.randn(1, 7, 2, 4, generator=gen, dtype=torch.float64).requires_grad_() for _ in range(3)]
    assert torch.autograd.gradcheck(call, tensors, eps=1e-6, atol=1e-7, rtol=1e-5), name
