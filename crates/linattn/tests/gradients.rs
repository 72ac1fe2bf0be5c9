//! Gradients of every method and form against central finite differences: of the f64
//! reference on small problems (every coordinate), and of the f64 fast path on problems
//! long enough to cross chunk and tile boundaries (sampled coordinates).

mod common;

use common::{Shape, attention, relative_error};
use linattn::{
    Attention, Cosformer, GlobalHeads, Hybrid, Linear, Linformer, Method, Performer, Tensor,
    Window, reference,
};

/// Every method of the catalogue, with chunks small enough that a dozen tokens span
/// several and sizes that keep finite differences of the reference cheap.
fn methods() -> Vec<Method> {
    let sizes = [
        ("chunk", "3"),
        ("features", "6"),
        ("window", "2,1"),
        ("max-len", "12"),
        ("k-proj", "4"),
        ("local-heads", "1"),
    ];
    common::shrunk_methods(&sizes)
        .into_iter()
        .map(|(_, method)| method)
        .collect()
}

/// `Σ d_out ∘ f(q, k, v)`.
fn loss(out: &Tensor<f64>, d_out: &Tensor<f64>) -> f64 {
    out.as_slice()
        .iter()
        .zip(d_out.as_slice())
        .map(|(a, b)| a * b)
        .sum()
}

/// Central difference of the loss along `coordinate` of input `which` (0 = q, 1 = k,
/// 2 = v).
fn finite_difference(
    forward: &dyn Fn(&[Tensor<f64>; 3]) -> Tensor<f64>,
    inputs: &[Tensor<f64>; 3],
    d_out: &Tensor<f64>,
    which: usize,
    coordinate: usize,
) -> f64 {
    const STEP: f64 = 1e-5;
    let mut shifted = inputs.clone();
    let mut at = |delta: f64| {
        let mut data = inputs[which].as_slice().to_vec();
        data[coordinate] += delta;
        shifted[which] = Tensor::from_vec(data, inputs[which].shape()).unwrap();
        loss(&forward(&shifted), d_out)
    };
    (at(STEP) - at(-STEP)) / (2.0 * STEP)
}

/// Checks the analytic gradients against finite differences at `coordinates` of each
/// input (all of them when `None`).
fn check(
    method: &Method,
    causal: bool,
    shape: Shape,
    forward: &dyn Fn(&[Tensor<f64>; 3]) -> Tensor<f64>,
    samples: Option<usize>,
    seed: u64,
) {
    let attention = attention(method, causal);
    let inputs = shape.inputs::<f64>(seed);
    let Ok(out) = attention.forward(&inputs[0], &inputs[1], &inputs[2]) else {
        return; // no such form
    };
    let d_out = Tensor::<f64>::randn(out.shape(), seed + 7).unwrap();
    let grads = attention
        .backward(&inputs[0], &inputs[1], &inputs[2], &d_out)
        .unwrap();
    for (which, analytic) in [&grads.dq, &grads.dk, &grads.dv].into_iter().enumerate() {
        let size = analytic.as_slice().len();
        let scale = analytic
            .as_slice()
            .iter()
            .fold(1.0f64, |m, x| m.max(x.abs()));
        let coordinates: Vec<usize> = match samples {
            None => (0..size).collect(),
            Some(n) => (0..n)
                .map(|i| (i * 7919 + seed as usize * 31) % size)
                .collect(),
        };
        for coordinate in coordinates {
            let numeric = finite_difference(forward, &inputs, &d_out, which, coordinate);
            let error = (numeric - analytic.as_slice()[coordinate]).abs() / scale;
            assert!(
                error < 1e-6,
                "{method:?} causal={causal} {shape:?}: d{} at {coordinate}: analytic {} numeric {numeric} (error {error:e})",
                ["q", "k", "v"][which],
                analytic.as_slice()[coordinate]
            );
        }
    }
}

#[test]
fn gradients_match_finite_differences_of_the_reference() {
    let shapes = [
        Shape::new(1, 1, 1, 1, 2, 1),
        Shape::new(1, 7, 2, 1, 3, 2),
        Shape::new(2, 9, 2, 2, 4, 3),
    ];
    for method in methods() {
        for causal in [false, true] {
            let reference_forward = |x: &[Tensor<f64>; 3]| {
                reference::forward(&attention(&method, causal), &x[0], &x[1], &x[2]).unwrap()
            };
            for (n, shape) in shapes.iter().enumerate() {
                check(
                    &method,
                    causal,
                    *shape,
                    &reference_forward,
                    None,
                    40 + n as u64,
                );
            }
        }
    }
}

#[test]
fn gradients_match_finite_differences_across_chunks_and_tiles() {
    // Longer than a tile of queries (64) and of keys (128), several chunks of every
    // default size, GQA.
    let shape = Shape::new(1, 150, 4, 2, 8, 6);
    let long_methods = [
        Method::softmax(),
        Method::Window(Window::new(Some(40), Some(70))),
        Method::linear(),
        Method::Performer(Performer::new(12, 4)),
        Method::Cosformer(Cosformer::default()),
        Method::Linformer(Linformer::new(200, 16, 1)),
        Method::Hybrid(Hybrid {
            local_heads: 1,
            window: Window::new(Some(30), Some(5)),
            global: GlobalHeads::Linear(Linear::default()),
        }),
    ];
    for method in long_methods {
        for causal in [false, true] {
            let fast_forward = |x: &[Tensor<f64>; 3]| {
                attention(&method, causal)
                    .forward(&x[0], &x[1], &x[2])
                    .unwrap()
            };
            check(&method, causal, shape, &fast_forward, Some(24), 5);
        }
    }
}

#[test]
fn linformer_projection_gradients_match_finite_differences() {
    let (max_len, k) = (10, 3);
    let (e, f) = linattn::linformer_projections(max_len, k, 8);
    let shape = Shape::new(2, 8, 2, 1, 3, 2);
    let [q, key, v] = shape.inputs::<f64>(3);
    let d_out = Tensor::<f64>::randn([2, 8, 2, 2], 4).unwrap();
    let run = |e: &[f64], f: &[f64]| {
        let method = Method::Linformer(Linformer::with_projections(
            e.to_vec(),
            f.to_vec(),
            max_len,
            k,
        ));
        Attention::new(method)
    };
    let (d_e, d_f) = run(&e, &f)
        .backward(&q, &key, &v, &d_out)
        .unwrap()
        .projections
        .expect("linformer returns projection gradients");
    for (which, analytic) in [(0, &d_e), (1, &d_f)] {
        for index in 0..max_len * k {
            let at = |delta: f64| {
                let (mut e2, mut f2) = (e.clone(), f.clone());
                if which == 0 {
                    e2[index] += delta
                } else {
                    f2[index] += delta
                }
                loss(
                    &reference::forward(&run(&e2, &f2), &q, &key, &v).unwrap(),
                    &d_out,
                )
            };
            let numeric = (at(1e-5) - at(-1e-5)) / 2e-5;
            assert!(
                (numeric - analytic[index]).abs() < 1e-6 * (1.0 + numeric.abs()),
                "d{} at {index}: analytic {} numeric {numeric}",
                ["E", "F"][which],
                analytic[index]
            );
        }
    }
    // Rows past the sequence (8 of 10) get no gradient.
    assert!(d_e[8 * k..].iter().all(|&x| x == 0.0));
}

#[test]
fn f32_gradients_match_f64_gradients() {
    let shape = Shape::new(2, 200, 4, 2, 32, 16);
    let [q, k, v] = shape.inputs::<f64>(9);
    for method in common::methods() {
        for causal in [false, true] {
            let attention = attention(&method, causal);
            let Ok(out) = attention.forward(&q, &k, &v) else {
                continue;
            };
            let d_out = Tensor::<f64>::randn(out.shape(), 10).unwrap();
            let exact = attention.backward(&q, &k, &v, &d_out).unwrap();
            let single = attention
                .backward(&q.cast(), &k.cast(), &v.cast(), &d_out.cast::<f32>())
                .unwrap();
            for (name, a, b) in [
                ("dq", &single.dq, &exact.dq),
                ("dk", &single.dk, &exact.dk),
                ("dv", &single.dv, &exact.dv),
            ] {
                if b.as_slice().iter().all(|&x| x == 0.0) {
                    assert!(a.as_slice().iter().all(|&x| x == 0.0), "{method:?} {name}");
                    continue;
                }
                let error = relative_error(a, b);
                assert!(error < 1e-4, "{method:?} causal={causal} {name}: {error:e}");
            }
        }
    }
}
