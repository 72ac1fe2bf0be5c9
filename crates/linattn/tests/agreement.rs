//! Every fast path against the f64 reference, on fresh random inputs of awkward shapes:
//! full, causal chunked and causal parallel, f32 and f64.

mod common;

use common::{SHAPES, Shape, applies, attention, methods, relative_error};
use linattn::{CausalForm, Element, reference};

/// Error of the f64 fast paths against the f64 reference: rounding only.
const F64_TOLERANCE: f64 = 1e-12;
/// Error of the f32 fast paths against the f64 reference, relative to the output's
/// largest magnitude: a few hundred f32 roundings (ε = 6e-8) at these lengths.
const F32_TOLERANCE: f64 = 1e-5;

fn check_all<T: Element>(tolerance: f64, seed: u64) {
    let mut worst = Vec::new();
    let settings = [
        (false, CausalForm::Chunked),
        (true, CausalForm::Chunked),
        (true, CausalForm::Parallel),
    ];
    for method in methods() {
        for (causal, form) in settings {
            for (n, shape) in SHAPES.iter().enumerate() {
                if !applies(&method, shape, causal) {
                    continue;
                }
                let attention = attention(&method, causal).causal_form(form);
                let [q, k, v] = shape.inputs::<f64>(seed + 10 * n as u64);
                let expected = reference::forward(&attention, &q, &k, &v).unwrap();
                let fast = attention
                    .forward(&q.cast::<T>(), &k.cast::<T>(), &v.cast::<T>())
                    .unwrap_or_else(|e| {
                        panic!("{method:?} causal={causal} {form:?} {shape:?}: {e}")
                    });
                let error = relative_error(&fast, &expected);
                worst.push((
                    error,
                    format!("{method:?} causal={causal} {form:?} {shape:?}"),
                ));
                assert!(
                    error <= tolerance,
                    "{} error {error:e} > {tolerance:e}: {method:?} causal={causal} {form:?} {shape:?}",
                    T::NAME
                );
            }
        }
    }
    worst.sort_by(|a, b| b.0.total_cmp(&a.0));
    eprintln!("{} worst errors: {:?}", T::NAME, &worst[..3]);
}

#[test]
fn f64_fast_paths_match_the_reference() {
    check_all::<f64>(F64_TOLERANCE, 1000);
}

#[test]
fn f32_fast_paths_match_the_reference() {
    check_all::<f32>(F32_TOLERANCE, 2000);
}

/// The fused non-causal kernels for φ = elu + 1 in f32 (widths multiples of 64, every
/// head in one call): grouped heads, more keys than queries, tiles and key blocks cut
/// short at the end of the sequence, one batch split across threads.
#[test]
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
