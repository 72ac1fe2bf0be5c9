//! Every fast path against the f64 reference, on fresh random inputs of awkward shapes:
//! each method of the catalogue (with each of its example options) × form (full, causal
//! chunked, causal parallel) × element type × shape is a test of its own, named like
//! `performer[features=16,seed=9]::causal_chunked::f32::B2-T7x7-H4x2-D32x32`, so that
//! one failure hides no other and `cargo test --test agreement performer` selects cases.
//! A custom harness (libtest-mimic): the cases come from the catalogue at run time.

mod common;

use common::{SHAPES, Shape, applies, attention, named_methods, relative_error};
use libtest_mimic::{Arguments, Failed, Trial};
use linattn::{CausalForm, Element, Tensor, reference};
use std::process::ExitCode;

/// Error of the f64 fast paths against the f64 reference: rounding only.
const F64_TOLERANCE: f64 = 1e-12;
/// Error of the f32 fast paths against the f64 reference: a few hundred f32 roundings
/// (ε = 6e-8) at these lengths.
const F32_TOLERANCE: f64 = 1e-5;

/// The forms, as the cases name them.
const FORMS: [(&str, bool, CausalForm); 3] = [
    ("full", false, CausalForm::Chunked),
    ("causal_chunked", true, CausalForm::Chunked),
    ("causal_parallel", true, CausalForm::Parallel),
];

fn main() -> ExitCode {
    let arguments = Arguments::from_args();
    let mut trials = Vec::new();
    for (index, (name, method)) in named_methods().into_iter().enumerate() {
        for (form, causal, causal_form) in FORMS {
            for (n, shape) in SHAPES.iter().enumerate() {
                if !applies(&method, shape, causal) {
                    continue;
                }
                let seed = 10_000 * index as u64 + 10 * n as u64;
                let shape_name = shape_name(shape);
                for (dtype, tolerance) in [("f64", F64_TOLERANCE), ("f32", F32_TOLERANCE)] {
                    let method = method.clone();
                    let shape = *shape;
                    trials.push(Trial::test(
                        format!("{name}::{form}::{dtype}::{shape_name}"),
                        move || {
                            let attention = attention(&method, causal).causal_form(causal_form);
                            if dtype == "f64" {
                                check::<f64>(&attention, &shape, seed, tolerance)
                            } else {
                                check::<f32>(&attention, &shape, seed, tolerance)
                            }
                        },
                    ));
                }
            }
        }
    }
    trials.push(Trial::test(
        "fused_non_causal_linear_matches_the_reference",
        || {
            fused_non_causal_linear_matches_the_reference();
            Ok(())
        },
    ));
    libtest_mimic::run(&arguments, trials).exit_code()
}

/// `B2-T5x9-H2x2-D4x4`: batch, query and key lengths, query and kv heads, dims.
fn shape_name(shape: &Shape) -> String {
    format!(
        "B{}-T{}x{}-H{}x{}-D{}x{}",
        shape.batch,
        shape.len_q,
        shape.len_k,
        shape.heads_q,
        shape.heads_kv,
        shape.dim,
        shape.dim_v
    )
}

/// The fast path in `T` against the f64 reference on fresh inputs of `shape`.
fn check<T: Element>(
    attention: &linattn::Attention,
    shape: &Shape,
    seed: u64,
    tolerance: f64,
) -> Result<(), Failed> {
    let [q, k, v] = shape.inputs::<f64>(seed);
    let expected = reference::forward(attention, &q, &k, &v).map_err(|e| e.to_string())?;
    let cast = |x: &Tensor<f64>| x.cast::<T>();
    let fast = attention
        .forward(&cast(&q), &cast(&k), &cast(&v))
        .map_err(|e| e.to_string())?;
    let error = relative_error(&fast, &expected);
    if error > tolerance {
        return Err(format!("{} error {error:e} > {tolerance:e}", T::NAME).into());
    }
    Ok(())
}

/// The fused non-causal kernels for φ = elu + 1 in f32 (widths multiples of 64, every
/// head in one call): grouped heads, more keys than queries, tiles and key blocks cut
/// short at the end of the sequence, one batch split across threads.
fn fused_non_causal_linear_matches_the_reference() {
    let shapes = [
        Shape::new(1, 5, 1, 1, 64, 64),
        Shape::new(2, 301, 4, 2, 64, 128),
        Shape::new(1, 1000, 2, 2, 128, 64),
        Shape {
            batch: 3,
            len_q: 49,
            len_k: 97,
            heads_q: 6,
            heads_kv: 3,
            dim: 64,
            dim_v: 64,
        },
    ];
    for (n, shape) in shapes.iter().enumerate() {
        let attention = attention(&linattn::Method::linear(), false);
        let [q, k, v] = shape.inputs::<f64>(3000 + n as u64);
        let expected = reference::forward(&attention, &q, &k, &v).unwrap();
        let fast = attention
            .forward(&q.cast::<f32>(), &k.cast::<f32>(), &v.cast::<f32>())
            .unwrap();
        let error = relative_error(&fast, &expected);
        assert!(error <= F32_TOLERANCE, "{shape:?}: error {error:e}");
    }
}
