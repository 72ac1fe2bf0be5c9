//! The f64 reference of the Linear Transformer (hybrid's linear heads use it too).

use super::LINEAR_EPSILON;
use crate::base::Tensor;
use crate::methods::reference::{dot, keys_seen, kv_head, row, weighted_values};

fn elu_plus_one(x: &[f64]) -> Vec<f64> {
    x.iter()
        .map(|&x| if x > 0.0 { x + 1.0 } else { x.exp() })
        .collect()
}

/// `Σⱼ φ(qᵢ)·φ(kⱼ) vⱼ / (Σⱼ φ(qᵢ)·φ(kⱼ) + ε)` over the keys query i of head h sees.
pub(crate) fn linear_row(
    q: &Tensor<f64>,
    k: &Tensor<f64>,
    v: &Tensor<f64>,
    b: usize,
    h: usize,
    i: usize,
    causal: bool,
) -> Vec<f64> {
    let g = kv_head(q, k, h);
    let phi_q = elu_plus_one(&row(q, b, i, h));
    let weights: Vec<(usize, f64)> = keys_seen(i, k.seq_len(), causal)
        .map(|j| (j, dot(&phi_q, &elu_plus_one(&row(k, b, j, g)))))
        .collect();
    let total: f64 = weights.iter().map(|w| w.1).sum();
    weighted_values(v, b, g, &weights, total + LINEAR_EPSILON)
}
