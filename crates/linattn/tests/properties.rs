//! Properties every method must have beyond matching the reference on random inputs:
//! causality, GQA as shared heads, agreement of the two exact algorithms at length, and
//! stability where FAVOR+ would overflow without its stabiliser.

mod common;

use common::{Shape, attention, methods, relative_error};
use linattn::{Attention, Method, Performer, Softmax, SoftmaxAlgorithm, Tensor, reference};

/// Replaces every position after `keep` of `x` with fresh random values.
fn perturb_after(x: &Tensor<f32>, keep: usize, seed: u64) -> Tensor<f32> {
    let noise = Tensor::<f32>::randn(x.shape(), seed).unwrap();
    let [batch, seq, heads, dim] = x.shape();
    let mut data = x.as_slice().to_vec();
    for b in 0..batch {
        for t in keep + 1..seq {
            let start = ((b * seq + t) * heads) * dim;
            let end = start + heads * dim;
            data[start..end].copy_from_slice(&noise.as_slice()[start..end]);
        }
    }
    Tensor::from_vec(data, x.shape()).unwrap()
}

#[test]
fn causal_outputs_do_not_depend_on_future_tokens() {
    let shape = Shape::new(2, 150, 4, 2, 16, 8);
    let keep = 77;
    let [q, k, v] = shape.inputs::<f32>(1);
    let (q2, k2, v2) = (
        perturb_after(&q, keep, 11),
        perturb_after(&k, keep, 12),
        perturb_after(&v, keep, 13),
    );
    let mut checked = 0;
    for method in methods() {
        let attention = attention(&method, true);
        let Ok(before) = attention.forward(&q, &k, &v) else {
            continue; // no causal form; tested with the errors
        };
        let after = attention.forward(&q2, &k2, &v2).unwrap();
        let [batch, seq, heads, dim] = before.shape();
        let row = heads * dim;
        for b in 0..batch {
            let past = b * seq * row..(b * seq + keep + 1) * row;
            assert_eq!(
                before.as_slice()[past.clone()],
                after.as_slice()[past],
                "{method:?}: an output before position {keep} changed with the future"
            );
        }
        // The perturbation must reach the future outputs, or this test proves nothing.
        assert_ne!(before, after, "{method:?}");
        checked += 1;
    }
    assert!(checked >= 8, "only {checked} causal methods checked");
}

/// k and v with every head repeated `group` times: MHA with the heads GQA shares.
fn repeat_heads(x: &Tensor<f64>, group: usize) -> Tensor<f64> {
    let [batch, seq, heads, dim] = x.shape();
    let mut data = Vec::with_capacity(x.as_slice().len() * group);
    for b in 0..batch {
        for t in 0..seq {
            for h in 0..heads * group {
                data.extend((0..dim).map(|d| x.at(b, t, h / group, d)));
            }
        }
    }
    Tensor::from_vec(data, [batch, seq, heads * group, dim]).unwrap()
}

#[test]
fn grouped_query_attention_equals_attention_with_repeated_kv_heads() {
    let shape = Shape::new(2, 45, 6, 2, 8, 8);
    let [q, k, v] = shape.inputs::<f64>(5);
    let (k_full, v_full) = (repeat_heads(&k, 3), repeat_heads(&v, 3));
    // FNet has no queries: its output follows v's heads, so GQA does not apply.
    for method in methods()
        .into_iter()
        .filter(|m| !matches!(m, Method::Fnet(_)))
    {
        for causal in [false, true] {
            let attention = attention(&method, causal);
            let Ok(grouped) = attention.forward(&q, &k, &v) else {
                continue; // no causal form
            };
            let full = attention.forward(&q, &k_full, &v_full).unwrap();
            let error = relative_error(&grouped, &full);
            assert!(error < 1e-12, "{method:?} causal={causal}: {error:e}");
        }
    }
}

#[test]
fn tiled_and_naive_softmax_agree_at_length() {
    let shape = Shape::new(1, 1000, 2, 2, 64, 64);
    let [q, k, v] = shape.inputs::<f32>(3);
    let naive = Method::Softmax(Softmax {
        algorithm: SoftmaxAlgorithm::Naive,
        ..Softmax::default()
    });
    for causal in [false, true] {
        let tiled = Attention::new(Method::softmax())
            .causal(causal)
            .forward(&q, &k, &v)
            .unwrap();
        let dense = Attention::new(naive.clone())
            .causal(causal)
            .forward(&q, &k, &v)
            .unwrap();
        let error = relative_error(&tiled, &dense.cast::<f64>());
        assert!(error < 2e-6, "causal={causal}: {error:e}");
    }
}

#[test]
fn performer_stays_finite_and_exact_for_keys_of_large_norm() {
    let shape = Shape::new(1, 90, 2, 2, 32, 16);
    let [q, k, v] = shape.inputs::<f64>(8);
    // Key norms of about 60: ω·k' reaches hundreds, far past where exp overflows in f32.
    let scaled: Vec<f64> = k.as_slice().iter().map(|x| x * 10.0).collect();
    let k = Tensor::from_vec(scaled, k.shape()).unwrap();
    let smallest_norm = (0..90)
        .map(|t| {
            (0..32)
                .map(|d| k.at(0, t, 0, d).powi(2))
                .sum::<f64>()
                .sqrt()
        })
        .fold(f64::INFINITY, f64::min);
    assert!(smallest_norm > 35.0, "{smallest_norm}");
    for causal in [false, true] {
        let attention = Attention::new(Method::Performer(Performer::new(64, 4))).causal(causal);
        let expected = reference::forward(&attention, &q, &k, &v).unwrap();
        let fast64 = attention.forward(&q, &k, &v).unwrap();
        let fast32 = attention
            .forward(&q.cast::<f32>(), &k.cast::<f32>(), &v.cast::<f32>())
            .unwrap();
        assert!(
            relative_error(&fast64, &expected) < 1e-12,
            "causal={causal}"
        );
        assert!(relative_error(&fast32, &expected) < 1e-5, "causal={causal}");
    }
}

#[test]
fn random_projections_are_reproducible_and_orthogonal() {
    let (m, d) = (80, 32);
    let omega = linattn::orthogonal_random_features(m, d, 12);
    assert_eq!(omega, linattn::orthogonal_random_features(m, d, 12));
    assert_ne!(omega, linattn::orthogonal_random_features(m, d, 13));
    // Within each block of d rows, directions are orthogonal; norms are chi(d)-distributed.
    for block in omega.chunks(d * d) {
        let rows: Vec<&[f64]> = block.chunks_exact(d).collect();
        for (i, a) in rows.iter().enumerate() {
            for b in &rows[..i] {
                let cosine =
                    a.iter().zip(*b).map(|(x, y)| x * y).sum::<f64>() / (norm(a) * norm(b));
                assert!(cosine.abs() < 1e-12);
            }
        }
    }
    let mean_norm = omega.chunks_exact(d).map(norm).sum::<f64>() / m as f64;
    assert!((mean_norm - (d as f64).sqrt()).abs() < 0.5, "{mean_norm}");
}

fn norm(x: &[f64]) -> f64 {
    x.iter().map(|v| v * v).sum::<f64>().sqrt()
}
