//! Packed variable-length batches (`cu_seqlens`): each sequence is attended alone.

mod common;

use common::{Shape, attention, methods};
use linattn::{Attention, Error, Method, Tensor};

const OFFSETS: [usize; 5] = [0, 1, 30, 95, 100];

fn packed() -> [Tensor<f64>; 3] {
    Shape::new(1, 100, 4, 2, 8, 6).inputs::<f64>(12)
}

#[test]
fn packed_sequences_equal_separate_calls_forward_and_backward() {
    let [q, k, v] = packed();
    for method in methods() {
        for causal in [false, true] {
            let attention = attention(&method, causal);
            let Ok(out) = attention.forward_varlen(&q, &k, &v, &OFFSETS) else {
                // Methods that refuse a form refuse it for each sequence too.
                assert!(
                    attention.forward(&q, &k, &v).is_err(),
                    "{method:?} causal={causal}"
                );
                continue;
            };
            let d_out = Tensor::<f64>::randn(out.shape(), 3).unwrap();
            let grads = attention
                .backward_varlen(&q, &k, &v, &d_out, &OFFSETS)
                .unwrap();
            for range in OFFSETS.windows(2).map(|w| w[0]..w[1]) {
                let slice = |x: &Tensor<f64>| x.slice_seq(range.clone()).unwrap();
                let (qs, ks, vs) = (slice(&q), slice(&k), slice(&v));
                assert_eq!(
                    slice(&out),
                    attention.forward(&qs, &ks, &vs).unwrap(),
                    "{method:?}"
                );
                let alone = attention.backward(&qs, &ks, &vs, &slice(&d_out)).unwrap();
                assert_eq!(slice(&grads.dq), alone.dq, "{method:?}");
                assert_eq!(slice(&grads.dk), alone.dk, "{method:?}");
                assert_eq!(slice(&grads.dv), alone.dv, "{method:?}");
            }
        }
    }
}

#[test]
fn nothing_crosses_a_sequence_boundary() {
    let [q, k, v] = packed();
    // Change everything in the third sequence (30..95).
    let noisy = |x: &Tensor<f64>, seed| {
        let noise = Tensor::<f64>::randn(x.shape(), seed).unwrap();
        let [_, _, h, d] = x.shape();
        let mut data = x.as_slice().to_vec();
        data[30 * h * d..95 * h * d].copy_from_slice(&noise.as_slice()[30 * h * d..95 * h * d]);
        Tensor::from_vec(data, x.shape()).unwrap()
    };
    let (q2, k2, v2) = (noisy(&q, 7), noisy(&k, 8), noisy(&v, 9));
    for method in methods() {
        for causal in [false, true] {
            let attention = attention(&method, causal);
            let Ok(before) = attention.forward_varlen(&q, &k, &v, &OFFSETS) else {
                continue;
            };
            let after = attention.forward_varlen(&q2, &k2, &v2, &OFFSETS).unwrap();
            for range in [0..30, 95..100] {
                assert_eq!(
                    before.slice_seq(range.clone()).unwrap(),
                    after.slice_seq(range).unwrap(),
                    "{method:?} causal={causal}"
                );
            }
            assert_ne!(before, after);
        }
    }
}

#[test]
fn bad_offsets_are_errors() {
    let [q, k, v] = packed();
    let attention = Attention::new(Method::linear()).causal(true);
    for offsets in [
        &[0, 50][..],
        &[1, 100],
        &[0, 50, 50, 100],
        &[0],
        &[0, 60, 40, 100],
    ] {
        let err = attention.forward_varlen(&q, &k, &v, offsets).unwrap_err();
        assert!(
            matches!(err, Error::InvalidConfig(_)),
            "{offsets:?}: {err:?}"
        );
        assert!(err.to_string().contains("cu_seqlens"));
    }
    let batched = Tensor::<f64>::zeros([2, 50, 4, 8]).unwrap();
    let err = attention
        .forward_varlen(&batched, &batched, &batched, &[0, 50])
        .unwrap_err();
    assert!(matches!(err, Error::ShapeMismatch { .. }), "{err:?}");
}
