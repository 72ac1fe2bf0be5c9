//! Every class of bad input is a typed error with a clear message, never a panic.

use linattn::{
    Attention, Error, Fnet, Linformer, Method, Performer, Softmax, SoftmaxAlgorithm, Tensor, Window,
};

fn zeros(shape: [usize; 4]) -> Tensor<f32> {
    Tensor::zeros(shape).unwrap()
}

fn forward(method: Method, causal: bool, q: [usize; 4], k: [usize; 4], v: [usize; 4]) -> Error {
    Attention::new(method)
        .causal(causal)
        .forward(&zeros(q), &zeros(k), &zeros(v))
        .unwrap_err()
}

#[test]
fn mismatched_shapes_name_the_dimensions() {
    let cases = [
        (
            [2, 8, 4, 16],
            [3, 8, 4, 16],
            [3, 8, 4, 16],
            "batch sizes differ: q 2, k 3, v 3",
        ),
        (
            [1, 8, 4, 16],
            [1, 8, 4, 16],
            [1, 9, 4, 16],
            "k has 8 positions but v has 9",
        ),
        (
            [1, 8, 4, 16],
            [1, 8, 4, 16],
            [1, 8, 2, 16],
            "k has 4 heads but v has 2",
        ),
        (
            [1, 8, 4, 16],
            [1, 8, 4, 32],
            [1, 8, 4, 16],
            "q head_dim 16 differs from k head_dim 32",
        ),
    ];
    for (q, k, v, message) in cases {
        let err = forward(Method::linear(), false, q, k, v);
        assert!(matches!(err, Error::ShapeMismatch { .. }), "{err:?}");
        assert!(err.to_string().contains(message), "{err}");
    }
    let err = forward(
        Method::softmax(),
        true,
        [1, 8, 2, 4],
        [1, 9, 2, 4],
        [1, 9, 2, 4],
    );
    assert!(
        err.to_string()
            .contains("causal attention needs as many queries as keys"),
        "{err}"
    );
    let err = forward(
        Method::Window(Window::new(Some(2), Some(2))),
        false,
        [1, 8, 2, 4],
        [1, 9, 2, 4],
        [1, 9, 2, 4],
    );
    assert!(matches!(err, Error::ShapeMismatch { .. }), "{err:?}");
}

#[test]
fn query_heads_must_be_a_multiple_of_kv_heads() {
    let err = forward(
        Method::softmax(),
        false,
        [1, 4, 3, 8],
        [1, 4, 2, 8],
        [1, 4, 2, 8],
    );
    assert_eq!(
        err,
        Error::HeadMismatch {
            q_heads: 3,
            kv_heads: 2
        }
    );
    assert!(err.to_string().contains("multiple"));
}

#[test]
fn zero_sized_dimensions_are_refused() {
    for (q, k, name) in [
        ([1, 0, 2, 8], [1, 4, 2, 8], "q"),
        ([1, 4, 2, 8], [1, 0, 2, 8], "k"),
        ([0, 4, 2, 8], [0, 4, 2, 8], "q"),
        ([1, 4, 2, 0], [1, 4, 2, 0], "q"),
    ] {
        let err = forward(Method::linear(), false, q, k, k);
        assert!(
            matches!(err, Error::Empty { tensor, .. } if tensor == name),
            "{err:?}"
        );
    }
}

/// Where `attention` says the non-finite input is, for zero inputs of `shape` with `bad`
/// at `at` in `tensor` ("q", "k" or "v"); any other outcome is returned as it came.
fn locate_bad_input(
    attention: &Attention,
    shape: [usize; 4],
    tensor: &str,
    at: [usize; 4],
    bad: f32,
) -> Result<(&'static str, Vec<usize>), linattn::Result<Tensor<f32>>> {
    let mut inputs = [zeros(shape), zeros(shape), zeros(shape)];
    let which = ["q", "k", "v"].iter().position(|&t| t == tensor).unwrap();
    let [_, seq, heads, dim] = shape;
    inputs[which].as_mut_slice()[((at[0] * seq + at[1]) * heads + at[2]) * dim + at[3]] = bad;
    match attention.forward(&inputs[0], &inputs[1], &inputs[2]) {
        Err(Error::NonFinite { tensor, index, .. }) => Ok((tensor, index)),
        other => Err(other),
    }
}

#[test]
fn non_finite_inputs_are_located() {
    // Exact methods scan inputs first; the kernelized ones check them as they read.
    let methods = [
        Method::softmax(),
        Method::linear(),
        Method::Performer(Performer::new(8, 0)),
        Method::Cosformer(linattn::Cosformer::default()),
        Method::Window(Window::new(Some(1), None)),
    ];
    for (method, causal) in methods.iter().flat_map(|m| [(m, false), (m, true)]) {
        let attention = Attention::new(method.clone()).causal(causal);
        for (bad, tensor) in [
            (f32::NAN, "q"),
            (f32::INFINITY, "k"),
            (f32::NEG_INFINITY, "v"),
        ] {
            let found = locate_bad_input(&attention, [1, 5, 2, 3], tensor, [0, 3, 1, 2], bad);
            assert_eq!(
                found.unwrap(),
                (tensor, vec![0, 3, 1, 2]),
                "{method:?} causal={causal}"
            );
        }
    }
}

#[test]
fn non_finite_inputs_are_located_on_the_fused_linear_path() {
    // Widths of 64 in f32 take the fused AVX-512 kernels where the machine has them; the
    // last row of the second batch.
    let attention = Attention::new(Method::linear());
    for (bad, tensor) in [
        (f32::NAN, "q"),
        (f32::NEG_INFINITY, "k"),
        (f32::NAN, "k"),
        (f32::INFINITY, "v"),
    ] {
        let found = locate_bad_input(&attention, [2, 70, 2, 64], tensor, [1, 69, 0, 63], bad);
        assert_eq!(
            found.unwrap(),
            (tensor, vec![1, 69, 0, 63]),
            "{bad} in {tensor}"
        );
    }
}

#[test]
fn overflowing_scores_are_an_error_not_a_nan_output() {
    // Linear attention of huge values: φ(k)ᵀv overflows f32.
    let huge = Tensor::from_vec(vec![3e30f32; 2 * 4], [1, 2, 1, 4]).unwrap();
    for causal in [false, true] {
        let err = Attention::new(Method::linear())
            .causal(causal)
            .forward(&huge, &huge, &huge)
            .unwrap_err();
        assert!(
            matches!(
                err,
                Error::NonFiniteOutput {
                    method: "linear",
                    ..
                }
            ),
            "{err:?}"
        );
    }
    let big = Tensor::from_vec(vec![1e20f32; 2 * 4], [1, 2, 1, 4]).unwrap();
    let err = Attention::new(Method::softmax())
        .forward(&big, &big, &big)
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::NonFiniteOutput {
                method: "softmax",
                ..
            }
        ),
        "{err:?}"
    );
}

#[test]
fn linformer_refuses_sequences_past_its_length_and_causal_requests() {
    let method = Method::Linformer(Linformer::new(16, 4, 0));
    let err = forward(
        method.clone(),
        false,
        [1, 17, 1, 4],
        [1, 17, 1, 4],
        [1, 17, 1, 4],
    );
    assert_eq!(
        err,
        Error::SequenceTooLong {
            method: "linformer",
            len: 17,
            max_len: 16
        }
    );
    let err = forward(method, true, [1, 8, 1, 4], [1, 8, 1, 4], [1, 8, 1, 4]);
    assert!(matches!(
        err,
        Error::CausalUnsupported {
            method: "linformer",
            ..
        }
    ));
    let err = forward(
        Method::Fnet(Fnet),
        true,
        [1, 8, 1, 4],
        [1, 8, 1, 4],
        [1, 8, 1, 4],
    );
    assert!(matches!(
        err,
        Error::CausalUnsupported { method: "fnet", .. }
    ));
}

#[test]
fn inconsistent_options_are_invalid_configurations() {
    let shape = [1, 8, 2, 4];
    let wrong_omega = Method::Performer(Performer::with_omega(vec![0.5; 10], 4));
    let err = forward(wrong_omega, false, shape, shape, shape);
    assert!(err.to_string().contains("omega has 10 elements"), "{err}");
    let no_features = Method::Performer(Performer::new(0, 0));
    assert!(matches!(
        forward(no_features, false, shape, shape, shape),
        Error::InvalidConfig(_)
    ));
    let wrong_e = Method::Linformer(Linformer::with_projections(
        vec![0.0; 7],
        vec![0.0; 32],
        8,
        4,
    ));
    assert!(
        forward(wrong_e, false, shape, shape, shape)
            .to_string()
            .contains("linformer E has 7 elements")
    );
    let nan_scale = Method::Softmax(Softmax {
        scale: Some(f64::NAN),
        ..Softmax::default()
    });
    assert!(matches!(
        forward(nan_scale, false, shape, shape, shape),
        Error::InvalidConfig(_)
    ));
    let no_chunk = Method::Linear(linattn::Linear { chunk: 0 });
    assert!(matches!(
        forward(no_chunk, true, shape, shape, shape),
        Error::InvalidConfig(_)
    ));
    let hybrid = Method::Hybrid(linattn::Hybrid {
        local_heads: 3,
        window: Window::new(Some(2), None),
        global: linattn::GlobalHeads::Linear(linattn::Linear::default()),
    });
    assert!(
        forward(hybrid, false, shape, shape, shape)
            .to_string()
            .contains("3 local heads but q has 2")
    );
}

#[test]
fn requests_larger_than_memory_say_how_much_they_need() {
    // Naive softmax at 200k tokens holds a 200k × 200k score matrix: 149 GiB per thread.
    let x = zeros([1, 200_000, 1, 1]);
    let naive = Method::Softmax(Softmax {
        algorithm: SoftmaxAlgorithm::Naive,
        ..Softmax::default()
    });
    let err = Attention::new(naive).forward(&x, &x, &x).unwrap_err();
    let Error::OutOfMemory {
        needed_bytes,
        available_bytes,
        ..
    } = err.clone()
    else {
        panic!("{err:?}");
    };
    assert!(needed_bytes >= 200_000u128 * 200_000 * 4, "{needed_bytes}");
    assert!(needed_bytes > available_bytes);
    assert!(err.to_string().contains("GiB"), "{err}");
    // The tiled algorithm needs a copy of k and v (1.6 MB at 200k tokens), its task list
    // and per-thread tiles: 200k more tokens add under 2 MiB.
    let tiled = |n: usize| {
        let shape = [1, n, 1, 1];
        Attention::new(Method::softmax())
            .workspace_bytes(shape, shape, shape, 4)
            .unwrap()
    };
    let growth = tiled(400_000) - tiled(200_000);
    assert!(growth < 2 << 20, "{growth}");

    // Shapes whose size does not even fit in usize, and ones larger than any machine.
    let err = Tensor::<f32>::zeros([usize::MAX, 2, 1, 1]).unwrap_err();
    assert!(matches!(err, Error::OutOfMemory { .. }), "{err:?}");
    let err = Tensor::<f64>::zeros([1 << 16, 1 << 16, 1 << 8, 1]).unwrap_err();
    assert!(err.to_string().contains("8.00 TiB"), "{err}");
}

#[test]
fn tensors_must_hold_as_many_elements_as_their_shape() {
    let err = Tensor::from_vec(vec![0.0f32; 7], [1, 2, 2, 2]).unwrap_err();
    assert!(
        err.to_string()
            .contains("7 elements given for shape [1, 2, 2, 2]"),
        "{err}"
    );
}

#[test]
fn an_output_tensor_of_the_wrong_shape_is_refused() {
    let x = zeros([1, 6, 2, 4]);
    let mut out = zeros([1, 6, 2, 5]);
    let err = Attention::new(Method::linear())
        .forward_into(&x, &x, &x, &mut out)
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("the output tensor has shape [1, 6, 2, 5]"),
        "{err}"
    );
}
