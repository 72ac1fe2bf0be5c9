//! The f64 reference of Linformer.

use crate::base::Tensor;
use crate::methods::reference::{dot, kv_head, max_of, row};

/// The output row of query i of head h: softmax over `Eᵀ K` of `Fᵀ V`, projected length
/// `projected`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn linformer_row(
    q: &Tensor<f64>,
    k: &Tensor<f64>,
    v: &Tensor<f64>,
    e: &[f64],
    f: &[f64],
    projected: usize,
    scale: f64,
    b: usize,
    h: usize,
    i: usize,
) -> Vec<f64> {
    let g = kv_head(q, k, h);
    let n = k.seq_len();
    // Column c of Eᵀ K: Σₜ E[t, c] kₜ.
    let project = |x: &Tensor<f64>, p: &[f64], c: usize| -> Vec<f64> {
        let mut acc = vec![0.0; x.head_dim()];
        for t in 0..n {
            for (d, a) in acc.iter_mut().enumerate() {
                *a += p[t * projected + c] * x.at(b, t, g, d);
            }
        }
        acc
    };
    let qi = row(q, b, i, h);
    let scores: Vec<f64> = (0..projected)
        .map(|c| scale * dot(&qi, &project(k, e, c)))
        .collect();
    let max = max_of(&scores);
    let weights: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
    let total: f64 = weights.iter().sum();
    let mut out = vec![0.0; v.head_dim()];
    for (c, w) in weights.iter().enumerate() {
        for (o, x) in out.iter_mut().zip(project(v, f, c)) {
            *o += w * x / total;
        }
    }
    out
}
